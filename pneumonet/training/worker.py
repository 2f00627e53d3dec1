"""What every Ray Train worker runs for one variant (the ``train_loop_per_worker`` of the TensorflowTrainer).

1. Threads, logging, and a ``MultiWorkerMirroredStrategy`` from the ``TF_CONFIG`` Ray's
   TensorflowConfig wrote (one worker per process; the strategy must exist before TF starts).
2. Precision: ``distributed.mixed_precision`` (``auto``: mixed_float16 when this worker sees a GPU,
   float32 on CPU), set before the model is built. float16 trains with a LossScaleOptimizer.
3. ``ray.train.get_checkpoint()``: after a worker failure (or ``--resume``) the model, the optimizer,
   the epoch counter, the best-so-far ROC-AUC/weights and the history come back, and training goes
   on after the last finished epoch. A restored *final* checkpoint means there is nothing left to do.
4. Its shards of ``train`` and ``val`` are read once from Ray Data into memory (uint8, 50 KB per
   224 px image); :func:`pneumonet.training.stages.train_stage`, the same function a single-process
   run calls, builds the stage inside ``strategy.scope()`` (mirrored variables, optimizer too),
   restores the checkpoint, and trains. Cached-feature transfer runs the frozen backbone once over
   the shards, each worker over its own, and trains the head on the features.
5. Every epoch rank 0 writes a checkpoint and every rank reports its figures (global, identical on
   all ranks) with its weights digest; the last report carries the float32 full model with the best
   weights, which the driver turns into the artifact.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import keras
import ray.train
import tensorflow as tf
from ray.train import Checkpoint, CheckpointConsistencyMode

from pneumonet.config import Config
from pneumonet.training.checkpoint import SavedTraining, read_checkpoint, read_state, save_checkpoint, save_final
from pneumonet.training.ingest import read_shard, val_name
from pneumonet.training.loop import Fitter, FitState, weights_digest
from pneumonet.training.ray_private import quiet_report_logs
from pneumonet.training.stages import Stage, build_stage, train_stage

log = logging.getLogger(__name__)

# Test hook: the last rank exits hard once, at the end of this epoch (before reporting it), when
# the marker file does not exist yet; it creates it first, so the restarted worker carries on.
CRASH_AT_EPOCH_ENV = "PNEUMONET_TEST_CRASH_AT_EPOCH"
CRASH_MARKER_ENV = "PNEUMONET_TEST_CRASH_MARKER"


def precision_policy(setting: str) -> str:
    """The Keras dtype policy for ``distributed.mixed_precision`` on this worker."""
    if setting == "off":
        return "float32"
    if setting == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return setting


def _setup(cpus: float) -> None:
    logging.getLogger("pneumonet").setLevel(logging.INFO)
    quiet_report_logs()  # Ray logs every report with all its metrics: too chatty
    tf.get_logger().setLevel("ERROR")
    threads = max(1, int(cpus))
    try:  # only possible before TensorFlow's runtime starts
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    except RuntimeError:
        pass


def _restored(variant: str) -> tuple[bool, SavedTraining | None]:
    """(finished, saved) of the checkpoint Ray Train restored: a final one means nothing is left to do."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False, None
    with checkpoint.as_directory() as folder:
        restored, final = read_state(folder)
        if final:
            log.info("%s: the run already finished (epoch %d); nothing to train", variant, restored.epoch)
            return True, None
        return False, read_checkpoint(folder)


def _maybe_crash(epoch: int, rank: int, world: int) -> None:
    at, marker = os.environ.get(CRASH_AT_EPOCH_ENV), os.environ.get(CRASH_MARKER_ENV)
    if at and marker and int(at) == epoch and rank == world - 1 and not Path(marker).exists():
        # Reports are registered asynchronously; wait for the last one, so the crash always lands after it.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        Path(marker).write_text(f"rank {rank} exited at epoch {epoch}\n")
        log.warning("test hook: rank %d exits at epoch %d", rank, epoch)
        os._exit(1)


def _export(stage: Stage, variant: str, config: Config, transfer_uri: str | None) -> keras.Model:
    """A plain float32 copy of the full model (no mirrored variables, no float16 layers) for the artifact."""
    keras.config.set_dtype_policy("float32")
    export = build_stage(variant, config, transfer_uri).model
    export.set_weights(stage.model.get_weights())
    return export


def _report(metrics: dict[str, Any], rank: int, name: str, write=None) -> None:
    """Report on every rank (a barrier); only rank 0 attaches a checkpoint folder filled by ``write``."""
    with tempfile.TemporaryDirectory(prefix="pneumonet-ckpt-") as folder:
        checkpoint = None
        if rank == 0 and write is not None:
            write(folder)
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def train_worker(spec: dict[str, Any]) -> None:
    """Train ``spec["variant"]`` on this worker's shards (see the module docstring)."""
    _setup(spec["cpus"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = Config.model_validate(spec["config"])
    variant, transfer_uri = spec["variant"], spec.get("transfer_uri")
    finished, saved = _restored(variant)
    if finished:
        return
    policy = precision_policy(config.distributed.mixed_precision)
    keras.config.set_dtype_policy(policy)
    size = config.model.image_size
    train = read_shard("train", size)
    val = read_shard(val_name(rank), size)
    log.info("%s: rank %d/%d has %d training and %d validation images, policy %s", variant, rank, world,
             len(train[1]), len(val[1]), policy)  # fmt: skip
    restored_digest = ""  # after a restart: the weights it continued from, for the summary and the tests

    def resume(fitter: Fitter) -> FitState:
        nonlocal restored_digest
        with strategy.scope():
            state = saved.restore(fitter.model, fitter.optimizer)
        state.resumed_from.append(state.epoch)
        restored_digest = weights_digest(fitter.model)
        log.info("%s: resumed after epoch %d (best ROC-AUC %.4f at epoch %d)", variant, state.epoch, state.best_auc, state.best_epoch)
        return state

    def on_epoch_end(fitter: Fitter, state: FitState, figures: dict[str, float]) -> None:
        _maybe_crash(state.epoch, rank, world)
        metrics = {
            **figures,
            "rank": rank,
            "world_size": world,
            "weights_digest": weights_digest(fitter.model),
            "shard_images": len(train[1]),
            "shard_val_images": len(val[1]),
            "best_epoch": state.best_epoch,
            "resumed_from": list(state.resumed_from),
            "restored_weights_digest": restored_digest,
        }
        _report(metrics, rank, f"epoch-{state.epoch:04d}-{len(state.resumed_from)}",
                lambda folder: save_checkpoint(folder, fitter.model, fitter.optimizer, state))  # fmt: skip

    stage, state = train_stage(
        variant, config, train, val, class_weight=tuple(spec["class_weight"]), transfer_uri=transfer_uri,
        strategy=strategy, loss_scale=policy == "mixed_float16", resume=resume if saved is not None else None, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    final = {"final": 1, "rank": rank, "epoch": state.epoch, "best_epoch": state.best_epoch,
             "weights_digest": weights_digest(stage.trained)}  # fmt: skip
    _report(final, rank, f"final-{len(state.resumed_from)}",
            lambda folder: save_final(folder, _export(stage, variant, config, transfer_uri), state))  # fmt: skip
