"""The training job's driver: Ray Train V2 ``TensorflowTrainer`` runs, one per variant, on a Ray cluster.

One code path for every door: ``jobs/train.py`` (a RayJob on Kubernetes), ``pneumonet train`` and
``pneumonet demo`` (the embedded default, which starts a local Ray) all call :func:`run_training`, which

1. fails fast, before any data is decoded: W&B (:func:`pneumonet.tracking.preflight`), the run storage
   (written), the dataset (catalog and patient split, once, here on the driver), and for ``finetune``
   alone the transfer model it starts from;
2. connects to Ray (``RAY_ADDRESS``, the job's cluster) or starts a local one (:func:`ensure_ray`);
3. decodes every split once with Ray Data (:mod:`pneumonet.training.ingest`); train/val are sharded to
   the workers, val/test come back to the driver for the final evaluation;
4. trains the variants in order, ``finetune`` from the ``transfer`` model of the same run
   (:mod:`pneumonet.training.worker` on every worker, ``MultiWorkerMirroredStrategy``; see
   :mod:`pneumonet.training.loop` for what makes that correct);
5. turns each final checkpoint into the model artifact with :func:`~pneumonet.training.finishing.finish`
   (threshold on validation, metrics and plots as in a single-process run) under
   ``STORAGE/models/<variant>/<run-id>/``, moves ``STORAGE/models/<variant>/latest``, and copies it to
   ``OUT/<variant>/`` when an output folder is given (:mod:`pneumonet.training.runs` has the layout).

Resources (``distributed.*``, or ``--workers``/``--cpus-per-worker``/``--gpus-per-worker``): every worker
reserves ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (fractions allowed) and uses
``int(cpus_per_worker)`` (at least 1) TensorFlow threads. ``auto`` (the default, :func:`worker_cpus`)
shares the machine's cores among the workers on a local cluster and follows the nodes' CPUs (a
RayJob's worker pods) on a cluster. The splits are decoded and filtered before training starts
(:mod:`pneumonet.training.ingest`), so Ray Data needs no CPU beside the workers: a local cluster has
``max(cores, ceil(workers × cpus_per_worker))`` logical CPUs, and e.g. 2 workers × 2 CPUs on a 2-core
laptop run (oversubscribed) instead of waiting forever.

Fault tolerance: ``FailureConfig(max_failures=distributed.max_failures)``; after a worker dies Ray
Train restarts the worker group and every worker restores the last checkpoint (``ray.train.get_checkpoint``:
epoch counter, optimizer state, best-so-far ROC-AUC and weights). ``--resume`` continues a stopped job:
same run-id, so Ray Train finds its experiment folder and the last checkpoint of each unfinished variant.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import keras
from pydantic import ValidationError

from pneumonet import storage, tracking
from pneumonet.artifact_meta import MANIFEST_FILE, META_FILE, read_metadata
from pneumonet.config import VARIANTS, Config, Variant
from pneumonet.console import duration
from pneumonet.data.catalog import labels_of, read_manifest, write_manifest
from pneumonet.data.split import plan_splits, saved_plan
from pneumonet.errors import ArtifactError, ConfigError, PneumonetError
from pneumonet.registry import LATEST, MODELS, check_run_id, publish_artifact, resolve_artifact_uri
from pneumonet.training.finishing import finish
from pneumonet.training.loop import balanced_class_weight
from pneumonet.training.resources import worker_cpus
from pneumonet.training.runs import RunLayout, latest_run_id, new_run_id

if TYPE_CHECKING:
    from pneumonet.training.ingest import EvalData

log = logging.getLogger(__name__)

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; V1 lacks UserCallback
FORWARDED_ENV_PREFIX = "PNEUMONET_TEST_"  # test hooks reach workers of an already running local Ray
EPOCH_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_roc_auc", "learning_rate",
              "epoch_seconds", "images_per_second", "images")  # fmt: skip


class TrainingRunError(PneumonetError):
    """A training run failed for good (more worker failures than ``distributed.max_failures``)."""


def ensure_ray(config: Config) -> bool:
    """Connect to the job's Ray cluster (``RAY_ADDRESS``) or start a local one; True if this call did either.

    A local cluster gets ``max(cores, ceil(workers × cpus_per_worker))`` logical CPUs (see the module docstring).
    """
    import ray
    import ray.train

    from pneumonet import local_ray

    # Ray Train exports UserCallback only under V2 (its own switch, is_v2_enabled, is private).
    if not hasattr(ray.train, "UserCallback"):
        raise ConfigError("RAY_TRAIN_V2_ENABLED=0 is set, but pneumonet needs Ray Train V2: unset it")
    if ray.is_initialized():
        return False
    dist = config.distributed
    ray.data.DataContext.get_current().enable_progress_bars = False
    if os.environ.get("RAY_ADDRESS"):
        local_ray.connect()
        need, have = dist.workers * worker_cpus(config, local=False), ray.cluster_resources().get("CPU", 0.0)
        if have < need:
            log.warning("the Ray cluster has %.1f CPUs now; this job needs %.1f (an autoscaler may add more)", have, need)
        return True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the local cluster's processes
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # no preemptible nodes here: one process less per run
    need = dist.workers * worker_cpus(config, local=True)
    # The dashboard stays on: Ray Train V2 watches its controller through the State API it serves.
    return local_ray.connect(max(local_ray.machine_cpus(), math.ceil(need - 1e-9)))


def _ordered(variants: list[Variant]) -> list[Variant]:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return [variant for variant in VARIANTS if variant in variants]


def _transfer_source(variants: list[Variant], layout: RunLayout, out: str | None) -> str | None:
    """Where finetune starts: this run's transfer model, else the newest one in the storage (or ``out``)."""
    if "finetune" not in variants:
        return None
    if "transfer" in variants or layout.is_finished("transfer"):
        return layout.artifact_uri("transfer")
    pointer = storage.join(layout.storage, MODELS, "transfer", LATEST)
    if storage.exists(pointer):
        return resolve_artifact_uri(pointer)
    if out and storage.exists(storage.join(out, "transfer", META_FILE)):
        return storage.join(out, "transfer")
    raise ArtifactError(
        f"finetune starts from a trained transfer model, but {pointer} does not exist: "
        "train --variant transfer first (or --variant all)"
    )


def _check_resumable(config: Config, record: dict, layout: RunLayout) -> None:
    try:
        saved = Config.model_validate(record["config"])
    except ValidationError as exc:
        raise ConfigError(f"cannot resume run {layout.run_id}: the config in {layout.run_file} is not valid "
                          f"({exc.error_count()} errors, e.g. {exc.errors()[0]['msg']}); start a new run") from None  # fmt: skip
    if saved.model != config.model or saved.seed != config.seed:
        changed = [key for key in ("seed", "model") if getattr(saved, key) != getattr(config, key)]
        raise ConfigError(
            f"cannot resume run {layout.run_id} with a different {' and '.join(changed)} configuration than it "
            f"started with ({layout.run_file}); pass the same config, or start a new run"
        )


class EpochRelay:
    """Per-epoch figures from Ray Train's controller to this driver, live: W&B logging, progress lines,
    and every rank's report (weights digests) for the summary.

    Ray Train V2 calls ``UserCallback.after_report`` in its controller process, not here, so the callback
    puts each report into a Ray queue and a thread of the driver takes it out.
    """

    def __init__(self, variant: str, run: tracking.TrackingRun, epochs: int) -> None:
        from ray.util.queue import Queue

        self.variant, self.run, self.planned = variant, run, epochs
        self._last = time.monotonic()  # when the previous report came: the ETA's pace
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.epochs: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name=f"pneumonet-relay-{variant}", daemon=True)
        self._thread.start()

    def callback(self):
        from pneumonet.training.remote import RelayCallback

        return RelayCallback(self.queue)

    def _drain(self) -> None:
        from ray.exceptions import RayError
        from ray.util.queue import Empty

        while True:
            try:
                ranks = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except RayError:  # the queue actor is gone
                return
            if ranks and "final" not in ranks[0]:
                self._epoch(ranks)

    def _epoch(self, ranks: list[dict[str, Any]]) -> None:
        self.epochs.append(ranks)
        first = ranks[0]
        self.run.log({key: first[key] for key in EPOCH_KEYS if key in first})
        now = time.monotonic()
        # The pace: the time between two reports; the first one's includes the workers' start, so its own epoch time.
        pace = now - self._last if self.epochs[:-1] else first["epoch_seconds"]
        left = (self.planned - first["epoch"]) * pace  # at most: early stopping may end sooner
        self._last = now
        log.info(
            "%s epoch %d/%d: loss %.4f  acc %.3f  val ROC-AUC %.4f  %.0f img/s  ETA %s (%d worker(s))",
            self.variant, first["epoch"], self.planned, first["loss"], first["accuracy"], first["val_roc_auc"],
            first["images_per_second"], duration(left), len(ranks),
        )  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.queue.shutdown(force=True)


def _scaling(config: Config, cpus: float):
    from ray.train import ScalingConfig

    dist = config.distributed
    resources = {"CPU": cpus, **({"GPU": dist.gpus_per_worker} if dist.gpus_per_worker else {})}
    return ScalingConfig(num_workers=dist.workers, use_gpu=dist.gpus_per_worker > 0, resources_per_worker=resources)


def _fit(variant: Variant, config: Config, layout: RunLayout, datasets: dict, spec: dict, relay: EpochRelay):
    """One TensorflowTrainer run; returns Ray's result (its checkpoint is the final one)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, TrainingFailedError
    from ray.train.tensorflow import TensorflowTrainer

    from pneumonet.training.remote import train_loop_per_worker

    filesystem, path = storage.filesystem(layout.run_dir)
    forwarded = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV_PREFIX)}
    run_config = RunConfig(
        name=variant,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.distributed.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),  # every checkpoint holds the best weights too
        callbacks=[relay.callback()],
        worker_runtime_env={"env_vars": forwarded} if forwarded else None,
        logging_config=LoggingConfig(log_level="WARNING"),  # our own epoch lines say it shorter
    )
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=_scaling(config, spec["cpus"]),
        run_config=run_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # val: one dataset per worker (ingest.trainer_datasets)
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingRunError(
            f"training {variant} of run {layout.run_id} failed after {config.distributed.max_failures} "
            f"restart(s) ({str(exc).strip().splitlines()[0]}); continue it with --resume --run-id {layout.run_id}"
        ) from exc


def _final_model(result) -> tuple[keras.Model, Any]:
    from pneumonet.training.checkpoint import FINAL_MODEL_FILE, read_state

    if result.checkpoint is None:
        raise TrainingRunError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state, final = read_state(folder)
        if not final:
            raise TrainingRunError(f"the last checkpoint of the run ({result.checkpoint.path}) is not a final one")
        model = keras.saving.load_model(os.path.join(folder, FINAL_MODEL_FILE), compile=False)
    return model, state


def _train_variant(
    variant: Variant,
    config: Config,
    layout: RunLayout,
    datasets: dict,
    data: EvalData,  # the splits decoded on the driver, for finish()
    spec: dict,
    mode: str,
    out: str | None,
) -> dict:
    dist = config.distributed
    with tracking.start_run(
        config, job_type="train", name=f"{variant}-{layout.run_id}", run_id=f"{layout.run_id}-{variant}",
        group=layout.run_id, out=out or layout.storage, mode=mode,
        extra_config={"variant": variant, "run_id": layout.run_id, "data_root": data.root, "storage": layout.storage},
    ) as run:  # fmt: skip
        relay = EpochRelay(variant, run, config.train.finetune_epochs if variant == "finetune" else config.train.epochs)
        try:
            result = _fit(variant, config, layout, datasets, {**spec, "variant": variant}, relay)
        finally:
            relay.close()
        model, state = _final_model(result)
        artifact_uri = layout.artifact_uri(variant)
        # The version keeps its own copy of the data it was trained on (runs/ expires): evaluate uses it.
        storage.copy(layout.manifest_uri, storage.join(artifact_uri, MANIFEST_FILE))
        extra = {"run_id": layout.run_id, "workers": dist.workers, "resumed_from": state.resumed_from,
                 "mixed_precision": dist.mixed_precision}  # fmt: skip
        summary = finish(variant, model, state, config, data, artifact_uri, run=run, extra=extra)
        meta = read_metadata(artifact_uri)
        run.log_artifact_model(artifact_uri, meta, manifest_uri=layout.manifest_uri)
        run.summary({"best_epoch": state.best_epoch, "epochs_run": state.epoch, "best_val_roc_auc": state.best_auc,
                     "threshold": summary["threshold"], "artifact": artifact_uri})  # fmt: skip
    layout.mark_latest(variant)
    summary.update(
        run_id=layout.run_id, model_uri=artifact_uri, epochs=relay.epochs, history=state.history,
        best_epoch=state.best_epoch, resumed_from=state.resumed_from, tracking_run=run.id,
    )  # fmt: skip
    keras.backend.clear_session()
    return summary


def _finished_summary(layout: RunLayout, variant: Variant) -> dict:
    """The summary of a variant a resumed run had already finished."""
    uri = layout.artifact_uri(variant)
    meta = read_metadata(uri)
    summary = {"variant": variant, "artifact": uri, "model_uri": uri, "threshold": meta["threshold"], "run_id": layout.run_id}
    for split in ("val", "test"):
        metrics = storage.join(uri, "evaluation", split, "metrics.json")
        if storage.exists(metrics):
            summary[split] = json.loads(storage.read_text(metrics))
    return summary


def _published(summary: dict, layout: RunLayout, variant: Variant, out: str | None) -> dict:
    """With ``out``: the artifact also copied to ``out/<variant>`` (a mutable copy; the version stays in the storage)."""
    if out:
        summary["artifact"] = publish_artifact(layout.artifact_uri(variant), storage.join(out, variant))
    return summary


def run_training(
    config: Config,
    variants: list[Variant],
    root: str | None,
    storage_root: str,
    out: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
) -> dict[str, dict]:
    """Train ``variants`` as one job (see the module docstring); returns a summary per variant.

    ``storage_root``: checkpoints and ``models/``; ``out``: also publish ``out/<variant>``; ``run_id``:
    name the run (default: a new one); ``resume``: continue ``run_id`` (default: the latest run).
    """
    variants = _ordered(variants)
    mode = tracking.preflight(config)
    storage.check_access(storage_root, write=True)
    if out and out != storage_root:
        storage.check_access(out, write=True)
    if resume:
        layout = RunLayout(storage_root, check_run_id(run_id) if run_id else latest_run_id(storage_root))
        record = layout.read_run()
        _check_resumable(config, record, layout)
        root = record["data_root"]
        if all(layout.is_finished(variant) for variant in variants):
            log.warning("run %s has finished %s already: nothing to train (a new training needs a new --run-id)",
                        layout.run_id, ", ".join(variants))  # fmt: skip
            return {variant: _published(_finished_summary(layout, variant), layout, variant, out) for variant in variants}
        plan = saved_plan(root, read_manifest(layout.manifest_uri))
        log.info("resuming run %s (data %s)", layout.run_id, root)
    else:
        if not root:
            raise ConfigError("no dataset: pass --data DATA or set data.root in the config")
        root = storage.absolute(root)  # recorded in the artifact: evaluate --split val finds it from anywhere
        layout = RunLayout(storage_root, check_run_id(run_id or new_run_id()))
        if storage.exists(layout.run_file):
            raise ConfigError(f"run {layout.run_id} already exists in {storage_root}: continue it with --resume, or pick another --run-id")
        plan = plan_splits(config, root)
    transfer_uri = _transfer_source(variants, layout, out)

    started = ensure_ray(config)
    try:
        from pneumonet.training.ingest import decode_plan, trainer_datasets

        decoded = decode_plan(plan, config)
        plan = decoded.plan
        write_manifest(plan.manifest, layout.manifest_uri)
        if out:
            write_manifest(plan.manifest, storage.join(out, "manifest.parquet"))
        if not resume:
            layout.write_run({"run_id": layout.run_id, "variants": variants, "data_root": root, "storage": storage_root,
                              "manifest_digest": plan.digest, "config": config.model_dump(mode="json")})  # fmt: skip
        datasets = trainer_datasets(decoded.train, decoded.val, config.distributed.workers)
        cpus = worker_cpus(config, local=not os.environ.get("RAY_ADDRESS"))
        spec = {"config": config.model_dump(mode="json"), "class_weight": list(balanced_class_weight(labels_of(plan.train))), "cpus": cpus}
        summaries: dict[str, dict] = {}
        for variant in variants:
            if resume and layout.is_finished(variant):
                log.info("%s: already finished in run %s", variant, layout.run_id)
                summaries[variant] = _finished_summary(layout, variant)
            else:
                log.info("training %s (run %s, %d worker(s) × %g CPUs)", variant, layout.run_id, config.distributed.workers, cpus)
                variant_spec = {**spec, "transfer_uri": transfer_uri if variant == "finetune" else None}
                summaries[variant] = _train_variant(variant, config, layout, datasets, decoded.data, variant_spec, mode, out)
            _published(summaries[variant], layout, variant, out)
        return summaries
    finally:
        if started:
            import ray

            ray.shutdown()
