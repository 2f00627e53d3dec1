"""Score whole image archives with Ray Data: ``pneumonet score`` and ``jobs/batch_score.py``.

Built so that the driver (the Ray head pod of a RayJob) holds no per-file state: its memory is
the same for ten thousand files and for ten million. Every stage that touches URIs or rows runs
on the workers; the driver plans, counts and reports::

    input URIs (Ray Data: manifest reader, or a parallel listing by sub-prefix; inputs.py)
        ──► anti-join against the URIs of the output's existing parts (hash-shuffle groupby on the
            workers, materialized in the object store; plan.py) ──► to-do URIs
        ──► read + decode (Ray tasks, CPU) ──► model (actor pool, one model per actor, optional GPUs)
        ──► parts written by the workers, atomically, named by their content (parts.py)
        ──► one row of counts per part back to the driver: progress, W&B (progress.py)
        ──► check (the anti-join again: no URI missing, none twice) and summary (summary.py)

A re-run of a finished job, with the archive and the output unchanged, lists the archive and
digests the listing (one streaming pass, no shuffle, no part read) and stops there: nothing to
do, proved by the digest recorded by the run that finished (plan.py says why that is sound).

Why this shape: listing on the driver costs ~2 MiB per 1,000 files (20 GiB at ten million, more
than a head pod has), and so does a Python set of done URIs; a hash-shuffle join spreads both over
the cluster and its result stays in the object store. Rows reaching the driver cost as much again,
so the parts are written where the rows are. Pixels live in Ray's object store between decode and
model, under Ray Data's backpressure. The one per-block cost left on the driver, Ray Data's stats
of every block of an execution, is bounded by scoring in waves of ``score.wave_files`` files.

Exactly once: a part is visible whole or not at all, each run scores only URIs that no part holds,
and a part's name is a digest of its URIs, so a task retried by Ray rewrites its own part instead
of adding a copy. A killed job re-run with the same output therefore finishes the rest, with no
duplicates and no gaps; the final check proves it (or fails the job, naming the counts). A file
that cannot be read or decoded (one shared decoder, :func:`pneumonet.data.images.load_image`, run
in a child process killed at ``data.max_decode_seconds``) becomes a row with an ``error`` and its
``error_kind`` instead of failing the job, and the summary counts them by kind.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pneumonet import console, storage
from pneumonet.artifact_meta import operating_threshold
from pneumonet.commandline import parse, verbose_parent
from pneumonet.config import Config, load_config
from pneumonet.data.blocks import decode_batch
from pneumonet.errors import DataError, PneumonetError
from pneumonet.evaluation.drift import NO_REFERENCE, read_reference, sample_key, sample_rate
from pneumonet.registry import ResolvedModel, resolve_model
from pneumonet.scoring import parts
from pneumonet.scoring.cluster import init_ray, remote_errors
from pneumonet.scoring.inputs import input_dataset
from pneumonet.scoring.options import SCORE_DESCRIPTION, add_score_arguments
from pneumonet.scoring.plan import Plan, reconcile, unchanged
from pneumonet.scoring.predict import decide
from pneumonet.scoring.progress import Progress
from pneumonet.scoring.summary import (
    DRIFT_PLOT_FILE,
    OUTPUT_KEYS,
    RESUME_KEY,
    drift_summary,
    summarize_output,
    verified_summary,
    write_summary,
)

log = logging.getLogger(__name__)

# Model batches per input block. A block is the unit of streaming (and of a retry), so blocks stay
# small; the driver holds no per-block state beyond the blocks in flight.
BATCHES_PER_BLOCK = 2
# CPUs reserved per part-writing task: none. It encodes a few thousand small rows; with any CPU
# request it waits until decode tasks and model actors free theirs, which on a busy cluster is
# the end of the job (measured: every part landed after the last image was scored).
WRITE_CPUS = 0
# Memory reserved per decode task (pneumonet.data.blocks): READ_THREADS raw files in flight (DICOMs reach tens of MB) plus
# a batch of decoded pixels. Reserving it also keeps decoding in its own CPU tasks: with equal
# resource requests Ray Data would fuse it into the inference actors, and then an actor would
# decode and run the model in turn instead of both running at once. (Each Ray worker that decodes
# also keeps one decoder process, pneumonet.data.sandbox: 110-140 MiB resident, measured.)
DECODE_MEMORY = 256 * 2**20


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file plus overrides, with the command-line flags applied last (validated like overrides)."""
    flags = {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "batch_size": args.batch_size}
    extra = [f"score.{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(args.config, [*args.overrides, *extra])


class Scorer:
    """Ray Data stage 2 (an actor): loads the model once, then scores batches of decoded images.

    With a drift reference in the artifact, the same forward pass gives each image's embedding: every
    row gets ``in_distribution`` (and ``ood_reason`` when false), and the rows whose URI falls into the
    job's uniform sample (``sample_rate``) carry their raw score and projected embedding to the writer.
    Nothing is kept between batches: constant memory per actor.
    """

    def __init__(self, model_uri: str, model_id: str, sample_rate: float) -> None:
        import tensorflow as tf

        from pneumonet.artifact import load_artifact

        # Actors sharing a GPU (fractional --gpus-per-worker) must not each grab all of its memory.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.artifact = load_artifact(model_uri)
        self.reference = read_reference(model_uri, self.artifact.meta)
        self.model_id = model_id  # the version the driver resolved (ResolvedModel.label)
        self.sample_rate = sample_rate

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(error) for error in batch["error"]]
        uris = [str(uri) for uri in batch["uri"]]
        ok = np.array([not error for error in errors], dtype=bool)
        images = batch["image"]
        chosen = images if ok.all() else images[ok]
        probs = np.full(len(errors), np.nan)
        columns: dict[str, pa.Array] = {}
        if self.reference is None:
            if ok.any():
                probs[ok] = self.artifact.predict_proba(chosen, batch_size=len(chosen))
        else:
            columns = self._drift_columns(uris, ok, chosen, probs)
        threshold = self.artifact.threshold
        now = datetime.now(UTC)
        table = pa.table(
            {
                "uri": pa.array(uris, pa.string()),
                "probability": pa.array(probs, pa.float64(), mask=~ok),
                "prediction": pa.array([decide(p, threshold) if good else None for p, good in zip(probs, ok)], pa.string()),
                "model": pa.array([self.model_id] * len(errors), pa.string()),
                "scored_at": pa.array([now] * len(errors), pa.timestamp("us", tz="UTC")),
                "error": pa.array([error or None for error in errors], pa.string()),
                "error_kind": pa.array([str(kind) or None for kind in batch["error_kind"]], pa.string()),
                "in_distribution": columns.pop("in_distribution", pa.nulls(len(errors), pa.bool_())),
                "ood_reason": columns.pop("ood_reason", pa.nulls(len(errors), pa.string())),
            },
            schema=parts.SCHEMA,
        )
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table

    def _drift_columns(self, uris: list[str], ok: np.ndarray, chosen: np.ndarray, probs: np.ndarray) -> dict[str, pa.Array]:
        """Scores ``chosen`` (the decodable images) into ``probs``; the gate's and the sample's columns."""
        n, reference = len(uris), self.reference
        inside = np.ones(n, bool)
        reasons: list[str | None] = [None] * n
        projection = np.zeros((n, reference.components.shape[0]), np.float32)
        raw = np.full(n, np.nan)
        if ok.any():
            raw[ok], embeddings = self.artifact.predict_with_embeddings(chosen, batch_size=len(chosen))
            probs[ok] = self.artifact.calibrated(raw[ok].astype(np.float32))
            inside[ok], gated = reference.gate(embeddings, chosen)
            for index, reason in zip(np.flatnonzero(ok), gated):
                reasons[index] = reason
            projection[ok] = reference.project(embeddings)
        keys = np.array([sample_key(uri) for uri in uris])
        sampled = ok & (keys < self.sample_rate)
        return {
            "in_distribution": pa.array(inside, pa.bool_(), mask=~ok),
            "ood_reason": pa.array(reasons, pa.string()),
            "sample_key": pa.array(keys, pa.float64(), mask=~sampled),
            "raw_probability": pa.array(raw, pa.float64(), mask=~sampled),
            "projection": pa.FixedSizeListArray.from_arrays(pa.array(projection.ravel(), pa.float32()), projection.shape[1],
                                                            mask=pa.array(~sampled)),  # fmt: skip
        }


@dataclass
class RunStats:
    """What this run did (the summary covers the whole output)."""

    run_id: str
    inputs: int
    already_scored: int
    planning_seconds: float  # listing + reading the existing parts + anti-join (or the listing's digest)
    planned_by: str  # "anti-join", or "digest": the archive and the output unchanged since a verified run
    scored_this_run: int = 0
    failed_this_run: int = 0
    parts_written: int = 0
    seconds: float = 0.0  # the scoring pipeline, start-up included
    seconds_to_first_part: float | None = None  # start-up: actors starting, models loading
    steady_images_per_second: float | None = None  # from the first part's landing to the last's
    check_seconds: float = 0.0  # the final anti-join (skipped when nothing was written) and the resume digest

    def as_dict(self) -> dict[str, Any]:
        files = self.scored_this_run + self.failed_this_run
        rate = files / self.seconds if self.seconds > 0 else None
        rounded = {key: round(value, 3) if isinstance(value, float) else value for key, value in self.__dict__.items()}
        return {**rounded, "images_per_second": rate and round(rate, 2)}


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


def _pipeline(todo: Any, files: int, model: ResolvedModel, config: Config, output: str, run_id: str, rate: float) -> Any:
    """The lazy Ray Dataset that scores ``todo`` (about ``files`` ``uri`` rows) into parts: one row of
    counts per part. ``rate``: the share of the archive that goes into the drift sample."""
    import ray

    score = config.score
    # Small blocks by splitting (URIs only: ~100 bytes each), done before decoding starts. Not the
    # streaming repartition: its task waits on backpressure holding a CPU, and with the decode task
    # and the model actor wanting one each, a 2-CPU node stopped scoring at 10^6 files.
    dataset = todo.repartition(max(1, -(-files // (score.batch_size * BATCHES_PER_BLOCK))))
    dataset = dataset.map_batches(
        decode_batch,
        batch_size=score.batch_size,
        batch_format="numpy",
        fn_kwargs={"size": int(model.meta["image_size"]), "max_pixels": config.data.max_image_pixels,
                   "max_bytes": config.data.max_image_bytes, "max_seconds": config.data.max_decode_seconds},  # fmt: skip
        memory=DECODE_MEMORY,
    )
    dataset = dataset.map_batches(
        Scorer,
        batch_size=score.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"model_uri": model.uri, "model_id": model.label, "sample_rate": rate},
        compute=ray.data.ActorPoolStrategy(size=score.workers),
        num_gpus=score.gpus_per_worker or None,
    )
    # Whole model batches per part: a writer task takes whole blocks, so a part size that is not a
    # multiple of the block would leave a small remainder part behind every full one.
    rows_per_part = score.rows_per_file // score.batch_size * score.batch_size or score.rows_per_file
    return dataset.map_batches(
        parts.write_batch,
        batch_size=rows_per_part,
        batch_format="pyarrow",
        fn_kwargs={"output": output, "run_id": run_id},
        num_cpus=WRITE_CPUS,
    )


def _partitions() -> int:
    """Hash partitions of the anti-join: a few per CPU of the cluster, so each stays small."""
    import ray

    return max(8, 2 * int(ray.cluster_resources().get("CPU", 1)))


def score_archive(model_ref: str, input_uri: str, output_uri: str, config: Config) -> dict[str, Any]:
    """Score every file of ``input_uri`` into ``output_uri`` (resuming), write and return the summary.

    ``model_ref`` (an alias, a version, any artifact folder) is resolved once, here, and every actor
    loads that version, so an alias moved while the job runs does not mix two models in one output.
    """
    import ray

    model = resolve_model(model_ref)  # fail fast on the driver (kept free of TensorFlow: it runs on the head)
    meta, model_id = model.meta, model.label
    reference = read_reference(model.uri, meta)
    if reference is None:
        log.warning("%s: %s", model.uri, NO_REFERENCE)
    output = storage.absolute(output_uri)
    storage.check_access(output, write=True)
    parts.remove_stale_temporaries(output)
    init_ray()
    # The job log carries our progress lines; Ray Data's own per-operator bars would drown them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    with remote_errors():
        start = time.monotonic()
        inputs = input_dataset(input_uri, exclude_prefix=output)
        verified = verified_summary(output, model_id)
        plan = unchanged(inputs, verified[RESUME_KEY]) if verified else None
        if plan is None:
            plan = reconcile(inputs, parts.parts_dataset(output, ["uri", "model"], model=model_id), _partitions())
        if plan.inputs == 0:
            raise DataError(f"{input_uri}: no files to score")
        planned_by = "digest" if plan.unchanged else "anti-join"
        stats = RunStats(parts.new_run_id(), plan.inputs, plan.already, time.monotonic() - start, planned_by)
        _log_plan(plan, input_uri, output, model_id, stats)
        settings = {"input": input_uri, "output": output, "run_id": stats.run_id, "inputs": plan.inputs,
                    "already_scored": plan.already}  # fmt: skip
        with _tracking(config, output, stats.run_id, settings) as run:
            run.use_model_artifact(model.uri, meta)
            check = plan
            start = time.monotonic()
            if plan.todo:
                _run_pipeline(plan, model, config, output, stats, run)
                start = time.monotonic()
                check = reconcile(plan.inputs_dataset(), parts.parts_dataset(output, ["uri"]), _partitions())
            if check.missing or check.duplicate_rows:
                raise DataError(
                    f"{output}: {check.missing} inputs have no row and {check.duplicate_rows} rows repeat "
                    "a URI; run the job again to score the missing ones"
                )
            resume = check.resume_state(parts.fingerprint(output))
            stats.check_seconds = time.monotonic() - start
            # The parts are the ones the verified summary counted: its counts still hold.
            summary = {key: verified[key] for key in OUTPUT_KEYS} if plan.unchanged else summarize_output(output)
            title = f"{model_id} on {input_uri}"
            summary["drift"], drift_plot = drift_summary(output, reference, config.drift, title)
            _log_drift(summary)
            threshold, source = operating_threshold(meta)
            summary.update(missing=check.missing, duplicate_rows=check.duplicate_rows, model=model_id,
                           model_uri=model.uri, model_version=model.version, model_alias=model.alias,
                           model_ref=model.ref, input=input_uri, output=output, threshold=threshold,
                           threshold_source=source, run=stats.as_dict(), **{RESUME_KEY: resume})  # fmt: skip
            write_summary(output, summary, threshold, title, drift_plot)
            run.summary({key: value for key, value in summary.items() if key not in ("failure_examples", RESUME_KEY)})
            if drift_plot is not None:
                run.log_images({"drift": storage.join(output, DRIFT_PLOT_FILE)})
    return summary


def _log_drift(summary: dict[str, Any]) -> None:
    if summary["drift"]["verdict"] != "not checked":
        log.log(logging.WARNING if summary["drift"]["verdict"] == "drift" else logging.INFO, "%s", _drift_line(summary))


def _log_plan(plan: Plan, input_uri: str, output: str, model_id: str, stats: RunStats) -> None:
    if plan.unchanged:
        log.info("%s: the %d files of %s are the ones a verified run of %s scored; nothing to do (found by the "
                 "listing's digest in %.1f s)", output, plan.inputs, input_uri, model_id, stats.planning_seconds)  # fmt: skip
    else:
        log.info(
            "scoring %d files from %s with %s: %d already in %s, %d to do (planned in %.1f s)",
            plan.inputs, input_uri, model_id, plan.already, output, plan.todo, stats.planning_seconds,
        )  # fmt: skip
    if plan.repeated_inputs:
        log.warning("%s lists %d URIs more than once; each is scored once", input_uri, plan.repeated_inputs)
    if plan.other_rows:
        log.warning("%s holds %d rows of files that are not inputs now; kept, not counted", output, plan.other_rows)


def _run_pipeline(plan: Plan, model: ResolvedModel, config: Config, output: str, stats: RunStats, run: Any) -> None:
    """Score ``plan``'s to-do URIs, wave by wave; the driver sees one row of counts per part written."""
    start = time.monotonic()
    with Progress(plan.todo, plan.already, run, config.score.progress_seconds) as progress:
        waves = plan.todo_waves(config.score.wave_files)
        per_wave = -(-plan.todo // len(waves))
        for number, todo in enumerate(waves, 1):
            if len(waves) > 1:
                log.info("wave %d of %d (about %d files each)", number, len(waves), per_wave)
            rate = sample_rate(config.drift.sample, plan.inputs)  # of the whole input, so a resumed job draws alike
            dataset = _pipeline(todo, per_wave, model, config, output, stats.run_id, rate)
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for rows, failures in zip(table.column("rows").to_pylist(), table.column("failures").to_pylist()):
                    progress.add(rows, failures)
                    if stats.seconds_to_first_part is None:
                        stats.seconds_to_first_part = time.monotonic() - start
    stats.seconds = time.monotonic() - start
    stats.parts_written = progress.parts
    stats.failed_this_run = progress.failures
    stats.scored_this_run = progress.done - progress.failures
    stats.steady_images_per_second = progress.steady_rate()
    if progress.done != plan.todo:
        raise DataError(
            f"{output}: the pipeline returned {progress.done} rows for {plan.todo} files; run the job again to score the rest"
        )


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal and the job log."""
    run = summary["run"]
    quantiles = summary["probability"]["quantiles"]
    spread = "  ".join(f"{k} {v:.3f}" for k, v in quantiles.items() if k in ("p05", "p50", "p95") and v is not None)
    predictions = ", ".join(f"{name} {count}" for name, count in summary["predictions"].items()) or "none"
    rate = f", {run['images_per_second']} images/s" if run["images_per_second"] else ""
    via = f" (alias {summary['model_alias']})" if summary.get("model_alias") else ""
    by_kind = summary.get("failures_by_kind") or {}
    kinds = f" ({', '.join(f'{kind} {count}' for kind, count in by_kind.items())})" if by_kind else ""
    return (
        f"model {summary['model']}{via}: {summary['model_uri']}\n"
        f"{summary['files']} files in {summary['output']}: {summary['scored']} scored, {summary['failures']} failed{kinds}\n"
        f"this run: {run['scored_this_run'] + run['failed_this_run']} files in {run['seconds']} s{rate} "
        f"({run['already_scored']} already scored)\n"
        f"predictions: {predictions}; p(PNEUMONIA) {spread}\n"
        f"{_drift_line(summary)}\n"
        f"summary: {storage.join(summary['output'], '_summary.json')}"
    )


def _drift_line(summary: dict[str, Any]) -> str:
    """One line on drift: the verdict, the Holm-adjusted p-values and the images flagged."""
    drift = summary["drift"]
    if drift["verdict"] == "not checked":
        return "drift: not checked (the model has no drift reference)"
    flagged = summary["out_of_distribution"]
    tests = ", ".join(f"{name} p={test['p_adjusted']:.3g}" for name, test in drift["tests"].items()) or "no test"
    return (f"drift: {drift['verdict']} on {drift['n']} sampled images ({tests}; Holm-adjusted, alpha {drift['alpha']:g}); "
            f"{flagged['flagged']} of {flagged['checked']} images out of distribution")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What both doors do: build the config, score, print the summary."""
    summary = score_archive(args.model, args.input, args.output, config_from_args(args))
    print(describe(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``jobs/batch_score.py``: the same options and error handling as ``pneumonet score``."""
    parser = argparse.ArgumentParser(prog="batch_score.py", description=SCORE_DESCRIPTION, parents=[verbose_parent()])
    add_score_arguments(parser)
    args = parse(parser, argv)
    console.configure(getattr(args, "verbose", False))  # a job's log is its console: everything stays there
    try:
        run_from_args(args)
    except PneumonetError as exc:
        print(f"batch_score: error: {exc}", file=sys.stderr)
        return 1
    return 0
