"""`vkae-tune serve RECIPE`: check the recipe, load its model with its knobs, serve the OpenAI-compatible API."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Sequence

log = logging.getLogger("vkae.server")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vkae-tune serve",
                                description="Serve a recipe's model with its knobs over an OpenAI-compatible HTTP API.")
    p.add_argument("recipe", help="recipe YAML written by the tuner")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--force", action="store_true",
                   help="serve even if the recipe's hash, GPU or weights do not match (logged as warnings)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="tokens per stream (prompt + output); capped at the model's positions (default 4096)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the recipe's model reference)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def build_state(loaded: Any, served_name: str | None = None) -> Any:
    """The serving state for a loaded recipe: scheduler thread (started), metrics, names, limits."""
    from .app import ServingState
    from .metrics import Metrics
    from .scheduler import Scheduler

    recipe, worker = loaded.recipe, loaded.worker
    names = tuple(dict.fromkeys(n for n in (served_name, recipe.model.reference, recipe.model.name) if n))
    metrics = Metrics(names[0])
    scheduler = Scheduler(worker, metrics)
    t0 = time.perf_counter()
    steps, prefills = scheduler.capture_steps()
    if steps or prefills:
        log.info("captured %d decode/verify step graphs and %d prefill graphs in %.1f s", steps, prefills,
                 time.perf_counter() - t0)
    scheduler.start()
    tok = worker.text_tokenizer  # None: token ids only (no text in or out)
    eos = set(worker.loaded.arch.eos_token_ids) | set(getattr(tok, "eos_ids", ()) or ())
    return ServingState(scheduler=scheduler, metrics=metrics, tokenizer=tok, model_names=names,
                        vocab_size=worker.loaded.arch.vocab_size, max_context=worker.max_context, eos=eos,
                        recipe_sha256=recipe.content_sha256)


def serve_main(argv: Sequence[str]) -> int:
    import uvicorn

    from .app import create_app
    from .recipe_runtime import open_recipe

    a = serve_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    loaded = open_recipe(a.recipe, force=a.force, max_context=a.max_context)
    positions = loaded.worker.loaded.arch.max_position_embeddings
    if a.max_context > positions:  # caches are allocated lazily (worker.generator()), so this is still free
        log.warning("--max-context %d exceeds the model's %d positions; using %d", a.max_context, positions, positions)
        loaded.worker.max_context = positions
    state = build_state(loaded, a.served_model_name)
    r = loaded.recipe
    log.info("recipe %s: %s, knobs %s, %.1f tok/s claimed on %s", a.recipe, r.model.name, r.knobs,
             r.metrics.tps.value, r.hardware.gpu_name)
    mode = ("continuous batching, per-stream speculative decoding for greedy requests"
            if state.scheduler.speculative else "continuous batching")
    log.info("batch rows %d (%s), context %d tokens per stream", state.scheduler.batch, mode, state.max_context)
    config = uvicorn.Config(create_app(state), host=a.host, port=a.port, log_level=a.log_level,
                            access_log=a.log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        state.scheduler.stop()
    return 0
