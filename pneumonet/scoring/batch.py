"""Score whole image archives with Ray Data: ``pneumonet score`` and ``jobs/batch_score.py``.

The pipeline streams, so memory stays flat whatever the archive size::

    URIs listed on the driver ──► read + decode (Ray tasks, CPU) ──► model (actor pool, one model
    per actor, optional GPUs) ──► result rows back to the driver ──► Parquet parts in the output

Only URIs and result rows (a few dozen bytes each) ever reach the driver; pixels live in Ray's
object store between the two stages, under Ray Data's backpressure. Each file is decoded by the
one shared decoder (:func:`pneumonet.data.images.load_image`) and a file that cannot be read or
decoded becomes a row with an ``error`` instead of failing the job. Parts are written atomically
and already-scored URIs are skipped, so a killed job re-run with the same output finishes the
rest with no duplicates and no gaps (see :mod:`pneumonet.scoring.parts`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pneumonet import storage
from pneumonet.config import Config, load_config
from pneumonet.errors import DataError, PneumonetError
from pneumonet.scoring import parts
from pneumonet.scoring.inputs import list_inputs, not_image_reason
from pneumonet.scoring.predict import decide
from pneumonet.scoring.summary import summarize_output, write_summary

log = logging.getLogger(__name__)

# URIs per input block: enough blocks for parallel decode tasks on a cluster, few enough that a
# ten-million-file archive stays a manageable number of Ray objects.
BLOCK_ROWS = 1024
# Files read concurrently inside one decode task (S3 latency); decoding itself stays on the
# task's one CPU so Ray's CPU accounting holds.
READ_THREADS = 8


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pneumonet score`` and ``jobs/batch_score.py`` (one definition, so they cannot drift)."""
    parser.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    parser.add_argument(
        "--input", required=True, help="folder or s3:// prefix (walked recursively), or a .parquet/.csv manifest with a 'uri' column"
    )  # fmt: skip
    parser.add_argument(
        "--output", required=True, help="folder or s3:// prefix for the Parquet parts; re-running resumes"
    )
    parser.add_argument("--workers", type=int, help="inference actors (default: score.workers, 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per inference actor (default: score.gpus_per_worker, 0)")
    parser.add_argument("--batch-size", type=int, help="images per model call (default: score.batch_size, 64)")
    parser.add_argument("--config", help="YAML config file (pneumonet/config.py is the schema)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. score.rows_per_file=5000"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file plus overrides, with the command-line flags applied last (validated like overrides)."""
    flags = {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "batch_size": args.batch_size}
    extra = [f"score.{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(args.config, [*args.overrides, *extra])


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (a RayJob), or start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)


def _read_or_error(uri: str) -> bytes | str:
    """The file's bytes, or an error message when it is skipped or unreadable."""
    reason = not_image_reason(uri)
    if reason:
        return reason
    try:
        return storage.read_bytes(uri)
    except PneumonetError as exc:
        return str(exc)


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data stage 1: URIs → model-ready pixels; a file that fails gets zeros and its ``error``."""
    from pneumonet.data.images import load_image

    uris = [str(uri) for uri in batch["uri"]]
    images = np.zeros((len(uris), size, size, 1), np.uint8)
    errors = [""] * len(uris)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="pneumonet-read") as pool:
        # Windows of READ_THREADS files: concurrent reads, bounded raw bytes in memory.
        for start in range(0, len(uris), READ_THREADS):
            window = uris[start : start + READ_THREADS]
            for index, data in enumerate(pool.map(_read_or_error, window), start):
                if isinstance(data, str):
                    errors[index] = data
                    continue
                try:
                    images[index] = load_image(data, uris[index], size, max_pixels)
                except PneumonetError as exc:
                    errors[index] = str(exc)
                except Exception as exc:  # a decoder bug must cost one row, not an overnight job
                    log.exception("unexpected error decoding %s", uris[index])
                    errors[index] = f"{uris[index]}: unexpected {type(exc).__name__} while decoding: {exc}"
    return {"uri": np.asarray(uris, dtype=object), "image": images, "error": np.asarray(errors, dtype=object)}


class Scorer:
    """Ray Data stage 2 (an actor): loads the model once, then scores batches of decoded images."""

    def __init__(self, model_uri: str) -> None:
        import tensorflow as tf

        from pneumonet.artifact import load_artifact

        # Actors sharing a GPU (fractional --gpus-per-worker) must not each grab all of its memory.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.artifact = load_artifact(model_uri)
        self.model_id = f"{self.artifact.name}:{self.artifact.version}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(error) for error in batch["error"]]
        ok = np.array([not error for error in errors], dtype=bool)
        images = batch["image"]
        probs = np.full(len(errors), np.nan)
        if ok.any():
            chosen = images if ok.all() else images[ok]
            probs[ok] = self.artifact.predict_proba(chosen, batch_size=len(chosen))
        threshold = self.artifact.threshold
        now = datetime.now(timezone.utc)
        return pa.table(
            {
                "uri": pa.array([str(uri) for uri in batch["uri"]], pa.string()),
                "probability": pa.array(probs, pa.float64(), mask=~ok),
                "prediction": pa.array([decide(p, threshold) if good else None for p, good in zip(probs, ok)], pa.string()),
                "model": pa.array([self.model_id] * len(errors), pa.string()),
                "scored_at": pa.array([now] * len(errors), pa.timestamp("us", tz="UTC")),
                "error": pa.array([error or None for error in errors], pa.string()),
            },
            schema=parts.SCHEMA,
        )


@dataclass
class RunStats:
    """What this run did (the summary covers the whole output)."""

    run_id: str
    inputs: int
    already_scored: int
    scored_this_run: int = 0
    failed_this_run: int = 0
    parts_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        rate = self.scored_this_run / self.seconds if self.seconds > 0 else None
        return {**self.__dict__, "seconds": round(self.seconds, 3), "images_per_second": rate and round(rate, 2)}


@contextmanager
def _tracking(config: Config, run_id: str, settings: dict[str, Any]) -> Iterator[Any]:
    """A W&B run of job type "score" (offline, online or disabled as the tracking config says)."""
    from pneumonet.tracking import start_run

    with start_run(config.tracking, job_type="score", name=f"score-{run_id}", config=settings) as run:
        yield run


def _pipeline(todo: list[str], model_uri: str, image_size: int, config: Config) -> Any:
    """The lazy Ray Dataset of result rows for ``todo``."""
    import ray

    score = config.score
    blocks = [pd.DataFrame({"uri": todo[i : i + BLOCK_ROWS]}) for i in range(0, len(todo), BLOCK_ROWS)]
    dataset = ray.data.from_pandas(blocks)
    dataset = dataset.map_batches(
        decode_batch,
        batch_size=score.batch_size,
        batch_format="numpy",
        fn_kwargs={"size": image_size, "max_pixels": config.data.max_image_pixels},
    )
    return dataset.map_batches(
        Scorer,
        batch_size=score.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"model_uri": model_uri},
        compute=ray.data.ActorPoolStrategy(size=score.workers),
        num_gpus=score.gpus_per_worker or None,
    )


def score_archive(model_uri: str, input_uri: str, output_uri: str, config: Config) -> dict[str, Any]:
    """Score every file of ``input_uri`` into ``output_uri`` (resuming), write and return the summary."""
    from pneumonet.artifact import load_artifact

    artifact = load_artifact(model_uri)  # fail fast on the driver, before any cluster work
    model_id = f"{artifact.name}:{artifact.version}"
    output = parts.absolute(output_uri)
    storage.check_access(output, write=True)
    inputs = list_inputs(input_uri, exclude_prefix=output)
    parts.remove_stale_temporaries(output)
    done = parts.scored_uris(output, model_id)
    todo = [uri for uri in inputs if uri not in done]
    stats = RunStats(parts.new_run_id(), len(inputs), len(inputs) - len(todo))
    log.info(
        "scoring %d files from %s with %s: %d already in %s, %d to do",
        len(inputs), input_uri, model_id, stats.already_scored, output, len(todo),
    )  # fmt: skip
    settings = {"model": model_uri, "model_id": model_id, "input": input_uri, "output": output,
                **config.score.model_dump(), "run_id": stats.run_id}  # fmt: skip
    with _tracking(config, stats.run_id, settings) as run:
        run.use_model_artifact(model_uri, artifact.meta)
        if todo:
            _run_pipeline(todo, model_uri, artifact.image_size, config, output, stats, run)
        summary = summarize_output(output)
        missing = set(inputs) - parts.scored_uris(output, model_id)
        if missing or summary["files"] != summary["unique_uris"]:
            raise DataError(
                f"{output}: {len(missing)} inputs have no row and {summary['files'] - summary['unique_uris']} "
                "URIs have several; run the job again to score the missing ones"
            )
        summary.update(model=model_id, model_uri=model_uri, input=input_uri, output=output,
                       threshold=artifact.threshold, run=stats.as_dict())  # fmt: skip
        write_summary(output, summary, artifact.threshold, f"{model_id} on {input_uri}")
        run.summary({key: value for key, value in summary.items() if key != "failure_examples"})
    return summary


def _run_pipeline(
    todo: list[str], model_uri: str, image_size: int, config: Config, output: str, stats: RunStats, run: Any
) -> None:
    """Stream result rows from Ray Data and write them as parts of ``rows_per_file`` rows."""
    init_ray()
    start = time.monotonic()
    dataset = _pipeline(todo, model_uri, image_size, config)
    for table in dataset.iter_batches(batch_size=config.score.rows_per_file, batch_format="pyarrow"):
        uri = parts.write_part(output, parts.part_name(stats.run_id, stats.parts_written), table)
        scored = table.column("error").null_count
        stats.parts_written += 1
        stats.scored_this_run += scored
        stats.failed_this_run += table.num_rows - scored
        stats.seconds = time.monotonic() - start
        done = stats.scored_this_run + stats.failed_this_run
        rate = done / stats.seconds
        log.info("wrote %s: %d rows; %d/%d files this run, %.1f images/s", uri, table.num_rows, done, len(todo), rate)
        run.log({"files_done": done, "failures": stats.failed_this_run, "images_per_second": rate})
    if stats.scored_this_run + stats.failed_this_run != len(todo):
        raise DataError(
            f"{output}: the pipeline returned {stats.scored_this_run + stats.failed_this_run} rows for {len(todo)} "
            "files; run the job again to score the rest"
        )
