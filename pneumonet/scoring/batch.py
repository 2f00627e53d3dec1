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
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pneumonet import storage
from pneumonet.artifact_meta import check_artifact, operating_threshold
from pneumonet.config import Config, load_config
from pneumonet.errors import DataError, PneumonetError
from pneumonet.scoring import parts
from pneumonet.scoring.cluster import init_ray
from pneumonet.scoring.inputs import list_inputs, not_image_reason
from pneumonet.scoring.options import SCORE_DESCRIPTION, add_score_arguments
from pneumonet.scoring.predict import decide
from pneumonet.scoring.summary import summarize_output, write_summary

log = logging.getLogger(__name__)

# Model batches per input block. A block is the unit of streaming: its result rows reach the driver
# when its last batch is scored, so blocks stay small (a ten-million-file archive at batch size 64
# is ~80,000 blocks of URIs, a few MB of Ray objects).
BATCHES_PER_BLOCK = 2
# Files read concurrently inside one decode task (S3 latency); decoding itself stays on the
# task's one CPU so Ray's CPU accounting holds.
READ_THREADS = 8
# Memory reserved per decode task: READ_THREADS raw files in flight (DICOMs reach tens of MB) plus
# a batch of decoded pixels. Reserving it also keeps decoding in its own CPU tasks: with equal
# resource requests Ray Data would fuse it into the inference actors, and then an actor would
# decode and run the model in turn instead of both running at once.
DECODE_MEMORY = 256 * 2**20


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file plus overrides, with the command-line flags applied last (validated like overrides)."""
    flags = {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "batch_size": args.batch_size}
    extra = [f"score.{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(args.config, [*args.overrides, *extra])


def _read_or_error(uri: str, max_bytes: int) -> bytes | str:
    """The file's bytes, or an error message when it is skipped, unreadable or over ``max_bytes``."""
    reason = not_image_reason(uri)
    if reason:
        return reason
    try:
        return storage.read_bytes(uri, max_bytes)
    except PneumonetError as exc:
        return str(exc)


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int, max_bytes: int) -> dict[str, np.ndarray]:
    """Ray Data stage 1: URIs → model-ready pixels; a file that fails gets zeros and its ``error``."""
    from pneumonet.data.images import load_image

    uris = [str(uri) for uri in batch["uri"]]
    images = np.zeros((len(uris), size, size, 1), np.uint8)
    errors = [""] * len(uris)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="pneumonet-read") as pool:
        # Windows of READ_THREADS files: concurrent reads, bounded raw bytes in memory.
        for start in range(0, len(uris), READ_THREADS):
            window = uris[start : start + READ_THREADS]
            for index, data in enumerate(pool.map(_read_or_error, window, [max_bytes] * len(window)), start):
                if isinstance(data, str):
                    errors[index] = data
                    continue
                try:
                    images[index] = load_image(data, uris[index], size, max_pixels, max_bytes)
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
        now = datetime.now(UTC)
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
    seconds_to_first_part: float | None = None  # start-up: actors starting, models loading

    def as_dict(self) -> dict[str, Any]:
        files = self.scored_this_run + self.failed_this_run
        rate = files / self.seconds if self.seconds > 0 else None
        return {**self.__dict__, "seconds": round(self.seconds, 3), "images_per_second": rate and round(rate, 2)}


@contextmanager
def _tracking(config: Config, output: str, run_id: str, settings: dict[str, Any]) -> Iterator[Any]:
    """A W&B run of job type "score" (offline, online or disabled as ``tracking`` says).

    Offline runs of a local output go to ``OUTPUT/_tracking/wandb``: next to the scores, yet hidden
    from ``pandas.read_parquet(OUTPUT)`` by the underscore.
    """
    from pneumonet.tracking import start_run

    out = None if storage.is_s3(output) else storage.join(output, "_tracking")
    with start_run(config, job_type="score", name=f"score-{run_id}", out=out, extra_config={"score_job": settings}) as run:
        yield run


def _pipeline(todo: pa.Array, model_uri: str, image_size: int, config: Config) -> Any:
    """The lazy Ray Dataset of result rows for ``todo``."""
    import ray

    score = config.score
    rows = score.batch_size * BATCHES_PER_BLOCK
    # Each block gets its own compact copy: a slice would carry (and ship) the whole array's buffers.
    starts = range(0, len(todo), rows)
    dataset = ray.data.from_arrow([pa.table({"uri": pa.array(todo.slice(i, rows).to_pylist(), pa.string())}) for i in starts])
    dataset = dataset.map_batches(
        decode_batch,
        batch_size=score.batch_size,
        batch_format="numpy",
        fn_kwargs={"size": image_size, "max_pixels": config.data.max_image_pixels, "max_bytes": config.data.max_image_bytes},
        memory=DECODE_MEMORY,
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
    meta = check_artifact(model_uri)  # fail fast on the driver (kept free of TensorFlow: it runs on the head)
    model_id = f"{meta['name']}:{meta['version']}"
    output = parts.absolute(output_uri)
    storage.check_access(output, write=True)
    inputs = list_inputs(input_uri, exclude_prefix=output)
    parts.remove_stale_temporaries(output)
    todo = parts.not_in(inputs, parts.scored_uris(output, model_id))
    stats = RunStats(parts.new_run_id(), len(inputs), len(inputs) - len(todo))
    log.info(
        "scoring %d files from %s with %s: %d already in %s, %d to do",
        len(inputs), input_uri, model_id, stats.already_scored, output, len(todo),
    )  # fmt: skip
    settings = {"input": input_uri, "output": output, "run_id": stats.run_id, "inputs": len(inputs),
                "already_scored": stats.already_scored}  # fmt: skip
    with _tracking(config, output, stats.run_id, settings) as run:
        run.use_model_artifact(model_uri, meta)
        if len(todo):
            _run_pipeline(todo, model_uri, int(meta["image_size"]), config, output, stats, run)
        summary = summarize_output(output, inputs)
        if summary["missing"] or summary["duplicate_rows"]:
            raise DataError(
                f"{output}: {summary['missing']} inputs have no row and {summary['duplicate_rows']} rows repeat "
                "a URI; run the job again to score the missing ones"
            )
        threshold, source = operating_threshold(meta)
        summary.update(model=model_id, model_uri=model_uri, input=input_uri, output=output,
                       threshold=threshold, threshold_source=source, run=stats.as_dict())  # fmt: skip
        write_summary(output, summary, threshold, f"{model_id} on {input_uri}")
        run.summary({key: value for key, value in summary.items() if key != "failure_examples"})
    return summary


def _run_pipeline(
    todo: pa.Array, model_uri: str, image_size: int, config: Config, output: str, stats: RunStats, run: Any
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
        if stats.seconds_to_first_part is None:
            stats.seconds_to_first_part = round(stats.seconds, 3)
        done = stats.scored_this_run + stats.failed_this_run
        rate = done / stats.seconds
        log.info("wrote %s: %d rows; %d/%d files this run, %.1f images/s", uri, table.num_rows, done, len(todo), rate)
        run.log({"files_done": done, "failures": stats.failed_this_run, "images_per_second": rate})
    if stats.scored_this_run + stats.failed_this_run != len(todo):
        raise DataError(
            f"{output}: the pipeline returned {stats.scored_this_run + stats.failed_this_run} rows for {len(todo)} "
            "files; run the job again to score the rest"
        )


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal and the job log."""
    run = summary["run"]
    quantiles = summary["probability"]["quantiles"]
    spread = "  ".join(f"{k} {v:.3f}" for k, v in quantiles.items() if k in ("p05", "p50", "p95") and v is not None)
    predictions = ", ".join(f"{name} {count}" for name, count in summary["predictions"].items()) or "none"
    rate = f", {run['images_per_second']} images/s" if run["images_per_second"] else ""
    return (
        f"{summary['files']} files in {summary['output']}: {summary['scored']} scored, {summary['failures']} failed\n"
        f"this run: {run['scored_this_run'] + run['failed_this_run']} files in {run['seconds']} s{rate} "
        f"({run['already_scored']} already scored)\n"
        f"predictions: {predictions}; p(PNEUMONIA) {spread}\n"
        f"summary: {storage.join(summary['output'], '_summary.json')}"
    )


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What both doors do: build the config, score, print the summary."""
    summary = score_archive(args.model, args.input, args.output, config_from_args(args))
    print(describe(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``jobs/batch_score.py``: the same options and error handling as ``pneumonet score``."""
    parser = argparse.ArgumentParser(prog="batch_score.py", description=SCORE_DESCRIPTION)
    add_score_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run_from_args(args)
    except PneumonetError as exc:
        print(f"batch_score: error: {exc}", file=sys.stderr)
        return 1
    return 0
