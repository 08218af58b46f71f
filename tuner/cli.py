"""`vkae-tune`: the console script.

    vkae-tune MODEL --gpu PROFILE [...]   tune MODEL (alias or path): Optuna study over Ray workers
    vkae-tune models                      list model aliases, shipped search spaces and GPU profiles
    vkae-tune bench ... / generate ...    the engine's own commands (engine.commands)

User errors print one line to stderr and exit 2; "no feasible trial" exits 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from engine.errors import UserError

EXIT_USER_ERROR = 2
EXIT_NO_FEASIBLE = 3


def _engine_command(name: str) -> Callable[[list[str]], int | None]:
    def run(argv: list[str]) -> int | None:
        from engine import commands  # owned by the engine; imported lazily (torch is slow to import)

        return getattr(commands, f"{name}_main")(argv)
    return run


def _server_command(module: str, name: str) -> Callable[[list[str]], int | None]:
    def run(argv: list[str]) -> int | None:
        import importlib  # the server package is imported lazily too (torch, fastapi)

        return getattr(importlib.import_module(f"server.{module}"), f"{name}_main")(argv)
    return run


def models_main(argv: list[str]) -> int:
    from .profiles import format_profiles
    from .search_space import shipped_search_spaces

    argparse.ArgumentParser(prog="vkae-tune models", description="List model aliases and GPU profiles.").parse_args(argv)
    spaces = {p.stem: p for p in shipped_search_spaces()}
    print("model aliases:")
    try:
        from engine.registry import list_aliases

        aliases = [(a.name, a.description) for a in list_aliases()]
    except ImportError:  # an engine without a registry: the shipped search spaces are still tunable
        aliases = [(name, "") for name in spaces]
    for name, description in aliases:
        mark = "search space: " + str(spaces[name].relative_to(spaces[name].parent.parent)) if name in spaces else \
            "no search space (pass --search-space)"
        print(f"  {name:<14} {description}  [{mark}]")
    print("GPU profiles (--gpu):")
    print(format_profiles())
    return 0


# Subcommands by first word; anything else is a MODEL reference for the tuning command.
# serve / verify / export are added here by their owners.
COMMANDS: dict[str, Callable[[list[str]], int | None]] = {
    "bench": _engine_command("bench"),
    "generate": _engine_command("generate"),
    "models": models_main,
    "serve": _server_command("serve_cli", "serve"),
    "verify": _server_command("verify", "verify"),
    "export": _server_command("export", "export"),
}


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vkae-tune", description="Tune serving knobs of MODEL on a GPU profile and write a frozen recipe.",
        epilog="other commands: " + ", ".join(COMMANDS) + " (vkae-tune COMMAND --help)")
    p.add_argument("model", metavar="MODEL", help="model alias (vkae-tune models) or a local model folder")
    p.add_argument("--gpu", required=True, metavar="PROFILE", help="GPU profile: a10g, l4, l40s, a100, h100, h200, cpu")
    p.add_argument("--trials", type=int, default=16, help="finished trials the study should have (default 16)")
    p.add_argument("--timeout", type=float, metavar="MIN", help="stop starting new trials after MIN minutes")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--ppl-max", type=float, metavar="X", help="quality limit: PPL <= X")
    q.add_argument("--ppl-max-ratio", type=float, metavar="R",
                   help="quality limit: PPL <= R x the model's own full-window plain-decode PPL")
    p.add_argument("--workers", type=int, metavar="N",
                   help="number of workers (default: one per GPU; on cpu 1, or one per node of a joined cluster)")
    p.add_argument("--ray-address", metavar="ADDR", help="join an existing Ray cluster instead of starting one")
    p.add_argument("--study-dir", type=Path, metavar="DIR", help="study folder (default study/<study name>)")
    p.add_argument("--study-name", metavar="NAME", help="study name (default <model>-<gpu>)")
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default SQLite in the study dir)")
    p.add_argument("--search-space", type=Path, metavar="FILE", help="search space YAML (default search_spaces/<model>.yaml)")
    p.add_argument("--assistant", metavar="REF", help="MTP assistant model (enables the mtp drafter)")
    p.add_argument("--random-weights", action="store_true", help="random weights (speed only; PPL is meaningless)")
    p.add_argument("--out", type=Path, metavar="FILE", help="recipe path (default artifacts/<study name>.recipe.yaml)")
    p.add_argument("--allow-gpu-mismatch", action="store_true", help="run even if the device is not the --gpu profile")
    p.add_argument("--trial-timeout", type=float, metavar="SEC", help="per-trial time limit (default from the search space)")
    return p


def tune_main(argv: list[str]) -> int:
    from .options import StudyOptions

    args = tune_parser().parse_args(argv)
    opts = StudyOptions(
        model=args.model, gpu=args.gpu, trials=args.trials, timeout_min=args.timeout, ppl_max=args.ppl_max,
        ppl_max_ratio=args.ppl_max_ratio, workers=args.workers, ray_address=args.ray_address,
        study_dir=args.study_dir, study_name=args.study_name, resume=args.resume, mlflow_uri=args.mlflow_uri,
        search_space=args.search_space, assistant=args.assistant, random_weights=args.random_weights,
        out=args.out, allow_gpu_mismatch=args.allow_gpu_mismatch, trial_timeout_s=args.trial_timeout)
    if opts.workers is not None and opts.workers < 1:
        raise UserError(f"--workers {opts.workers}: must be at least 1")
    from .study import run_study

    try:
        outcome = run_study(opts)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are saved in {opts.resolved_dir()};"
              " continue with the same command plus --resume", file=sys.stderr)
        return 130
    return 0 if outcome.chosen is not None else EXIT_NO_FEASIBLE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        tune_parser().print_help()
        return 0 if argv else EXIT_USER_ERROR
    handler = COMMANDS.get(argv[0])
    try:
        if handler is not None:
            code = handler(argv[1:])
        else:
            code = tune_main(argv)
    except UserError as exc:
        print(f"vkae-tune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
