"""vkae-tune's tuner: search spaces, Ray worker pool, Optuna study, MLflow tracking, frozen recipes."""
