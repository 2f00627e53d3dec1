"""The command line of a training job, one definition for ``pneumonet train`` and ``jobs/train.py``.

Both doors build their parser with :func:`add_train_arguments` and call :func:`train_from_args`, so
flags cannot drift apart. Nothing heavy is imported at module level: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pneumonet.commandline import add_overrides, parse

VARIANT_CHOICES = ("custom", "transfer", "finetune", "all")
_FLAG_KEYS = (
    ("workers", "distributed.workers"),
    ("cpus_per_worker", "distributed.cpus_per_worker"),
    ("gpus_per_worker", "distributed.gpus_per_worker"),
    ("storage", "distributed.storage"),
    ("epochs", "train.epochs"),
    ("batch_size", "train.batch_size"),
    ("seed", "seed"),
)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options: config + overrides, data, variant, outputs, Ray resources, resume."""
    parser.add_argument("--variant", choices=VARIANT_CHOICES, default="all",
                        help="what to train; all = custom, transfer, then finetune from that transfer model")  # fmt: skip
    parser.add_argument("--data", help="dataset root, a folder or s3:// prefix in the Kaggle layout (default: data.root)")
    parser.add_argument("--out", help="also publish the artifacts as OUT/<variant>/ (and, without --storage, keep the run there)")
    parser.add_argument("--storage", help="run storage, a folder or s3:// prefix: checkpoints and models/<variant>/<run-id>/ "
                        "(default: distributed.storage, else --out)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="Ray Train workers (distributed.workers)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs each worker reserves, fractions allowed (distributed.cpus_per_worker)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs each worker reserves (distributed.gpus_per_worker)")
    parser.add_argument("--run-id", help="name of the run (default: UTC start time + random suffix); with --resume, the run to continue")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run (--run-id, default: the latest under the storage) from its last checkpoints")  # fmt: skip
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="with --run-id: continue that run if the storage has it, else start it (one command line "
                        "for a job and its retries, e.g. a RayJob's backoffLimit)")  # fmt: skip
    parser.add_argument("--epochs", type=int, help="epochs of custom and transfer (train.epochs; finetune: train.finetune_epochs)")
    parser.add_argument("--batch-size", type=int, help="images per step and worker (train.batch_size)")
    parser.add_argument("--seed", type=int, help="seed of the split, the initial weights and the augmentation (seed)")
    add_overrides(parser, "train.learning_rate=5e-4")
    return parser


def config_from_args(args: argparse.Namespace):
    """The config file plus ``KEY=VALUE`` overrides plus the resource flags (flags win)."""
    from pneumonet.config import load_config

    overrides = list(args.overrides)
    for flag, key in _FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: numbers stay numbers, URIs strings
    return load_config(args.config, overrides)


def train_from_args(args: argparse.Namespace) -> dict[str, dict]:
    """Run the training job the arguments describe; returns a summary per variant."""
    from pneumonet.config import VARIANTS
    from pneumonet.errors import ConfigError
    from pneumonet.training.driver import run_training
    from pneumonet.registry import check_run_id
    from pneumonet.training.runs import RunLayout

    config = config_from_args(args)
    storage_root = config.distributed.storage or args.out
    if not storage_root:
        raise ConfigError("nowhere to write: pass --out OUT or --storage URI (or set distributed.storage)")
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    root = args.data or config.data.root
    resume = args.resume
    if args.resume_if_exists:
        if not args.run_id or args.resume:
            raise ConfigError("--resume-if-exists needs --run-id (and replaces --resume): the run to continue or start")
        resume = RunLayout(storage_root, check_run_id(args.run_id)).exists()
    return run_training(config, variants, root, storage_root, out=args.out, run_id=args.run_id, resume=resume)


def print_summaries(summaries: dict[str, dict]) -> None:
    """One line per variant: the headline metrics (test if there is a test split, else validation)."""
    from pneumonet.evaluation.metrics import headline

    for variant, summary in summaries.items():
        which = "test" if "test" in summary else "val"
        print(f"{variant:<9} {which} {headline(summary[which])}  → {summary['artifact']}")


def run_job(argv: Sequence[str] | None = None, prog: str = "train", description: str | None = None) -> int:
    """A complete training command: parse, log, train, print; a user error is one line and exit code 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    args = parse(add_train_arguments(parser), argv)
    from pneumonet import console
    from pneumonet.errors import PneumonetError

    console.configure(args.verbose)  # a job's log is its console: everything stays there

    try:
        print_summaries(train_from_args(args))
    except PneumonetError as exc:
        if args.verbose:
            logging.getLogger("pneumonet").exception("failed")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
