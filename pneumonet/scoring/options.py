"""Command-line options of the scoring doors, defined once for ``pneumonet`` and ``jobs/batch_score.py``.

Only argparse here, so building a parser (``--help``) imports nothing heavy.
"""

from __future__ import annotations

import argparse

from pneumonet.commandline import add_overrides

SCORE_HELP = "score an image archive into Parquet with Ray Data (resumable)"
SCORE_DESCRIPTION = (
    "Score every file of a folder, s3:// prefix or manifest with a model artifact into Parquet parts "
    "(uri, probability, prediction, model, scored_at, error), plus _summary.json. Re-running with the "
    "same --output scores only what is missing."
)
SERVE_HELP = "run the online scoring endpoint locally (Ray Serve)"


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pneumonet score`` and ``jobs/batch_score.py`` (one definition, so they cannot drift)."""
    parser.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    parser.add_argument(
        "--input",
        required=True,
        help="folder or s3:// prefix (walked recursively, listed in parallel by sub-prefix), or a .parquet/.csv "
        "manifest with a 'uri' column (for millions of files in one flat prefix)",
    )
    parser.add_argument(
        "--output", required=True, help="folder or s3:// prefix for the Parquet parts; re-running resumes"
    )
    parser.add_argument("--workers", type=int, help="inference actors (default: score.workers = 1)")
    parser.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per inference actor (default: score.gpus_per_worker = 0)"
    )
    parser.add_argument("--batch-size", type=int, help="images per model call (default: score.batch_size = 64)")
    add_overrides(parser, "score.rows_per_file=5000")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``pneumonet serve``."""
    parser.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    parser.add_argument("--host", help="address to listen on (default: serve.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: serve.port = 8000)")
    add_overrides(parser, "serve.max_batch_size=32")
