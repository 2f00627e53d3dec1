"""The train step and epoch loop, the same in one process and in every Ray Train worker.

Why not ``model.fit``: under ``MultiWorkerMirroredStrategy`` (MWMS) Keras 3's ``fit`` fails with
"Attempt to convert a value (PerReplica…)" (keras-team/keras#20585, ray-project/ray#47464). This
loop runs an explicit step through ``strategy.run``; with the default strategy (one process, tests,
benchmarks) the same code is a plain training loop. What makes it correct under MWMS:

- The caller builds the model inside ``strategy.scope()`` and :class:`Fitter` creates its optimizer
  there: variables become mirrored, their initial values are broadcast from worker 0, and Keras's
  optimizer all-reduces (sums) the gradients across all replicas before every update.
- Each worker feeds its own shard (Ray Data split the data already). The shard goes through
  ``distribute_datasets_from_function``, which does not shard again; ``experimental_distribute_dataset``
  would auto-shard every worker's shard a second time and silently drop half of it.
- ``batch_size`` is per replica. Per-example losses are summed and divided by the *global* batch
  (``batch_size × replicas``), regularisation losses by the number of replicas, so the summed gradients
  equal those of one big batch.
- Every worker runs the same number of steps per epoch (the minimum over workers): a worker that
  stopped early would leave the others waiting in an all-reduce forever.
- BatchNormalization moving statistics are *not* aggregated by Keras 3 (its variables have
  aggregation NONE, each replica updates its own copy, silently). :func:`sync_moving_statistics`
  averages them over replicas after every epoch; the moving average is linear, so this equals
  per-step mean aggregation, and every rank ends the epoch with bit-identical weights.
- Loss, accuracy and images seen are summed over replicas; validation predictions of every shard are
  gathered before ROC-AUC is computed. All ranks see the same global figures and so take the same
  early-stopping decision.
- float16: a ``LossScaleOptimizer``. Keras decides per replica whether gradients are finite; replicas
  that disagree would deadlock (one skips the all-reduce inside the update), so the step makes the
  decision global first (:meth:`Fitter._replica_step`).

Model selection is on validation ROC-AUC, the metric the threshold and the clinicians care about.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight

from pneumonet.config import AugmentConfig
from pneumonet.data.pipeline import inference_batches, training_dataset
from pneumonet.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """Everything needed to pick up after the last finished epoch (checkpointed every epoch)."""

    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_weights: list[np.ndarray] | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)  # epochs a restart continued after

    def record(self, **values: float) -> None:
        for key, value in values.items():
            self.history.setdefault(key, []).append(float(value))

    def to_json(self) -> dict[str, Any]:
        """The state without the weights (those are stored as arrays beside it)."""
        return {
            "epoch": self.epoch,
            "best_auc": None if math.isinf(self.best_auc) else self.best_auc,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FitState:
        best = data.get("best_auc")
        return cls(
            epoch=int(data["epoch"]),
            best_auc=-math.inf if best is None else float(best),
            best_epoch=int(data["best_epoch"]),
            history={key: [float(v) for v in values] for key, values in data["history"].items()},
            resumed_from=[int(e) for e in data.get("resumed_from", [])],
        )


@dataclass(frozen=True)
class FitSettings:
    """Knobs of one training stage; ``batch_size`` is per replica."""

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    seed: int
    class_weight: tuple[float, float] = (1.0, 1.0)
    label_smoothing: float = 0.0
    augment: AugmentConfig | None = None
    steps_per_epoch: int | None = None
    loss_scale: bool = False  # float16 mixed precision
    select: str = "best_val_auc"  # or "last": no early stop, the final weights are the model


def balanced_class_weight(labels: np.ndarray) -> tuple[float, float]:
    """Weights that make NORMAL and PNEUMONIA count equally in the loss (the Kaggle set is ~1:3)."""
    labels = labels.astype(int)
    if len(np.unique(labels)) < 2:
        return (1.0, 1.0)
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return (float(weights[0]), float(weights[1]))


def cosine_decay(base: float, epochs: int) -> keras.optimizers.schedules.CosineDecay:
    """Cosine decay from ``base`` towards ``base / 20`` over the planned epochs (evaluated once per epoch)."""
    return keras.optimizers.schedules.CosineDecay(base, decay_steps=max(1, epochs), alpha=0.05)


def _inference_function(model: keras.Model):
    """One compiled forward pass per model, reused across calls (a new tf.function per call retraces)."""
    forward = getattr(model, "_pneumonet_forward", None)
    if forward is None:
        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        model._pneumonet_forward = forward
    return forward


def predict_batches(model: keras.Model, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's outputs for images or cached features, in order, without ``predict``'s per-call setup."""
    forward = _inference_function(model)
    outputs = [np.asarray(forward(batch), dtype="float32") for batch in inference_batches(inputs, batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, *model.output_shape[1:]), dtype="float32")


def predict_probabilities(model: keras.Model, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities of PNEUMONIA, one per input (the members' mean when the model outputs one column each)."""
    outputs = predict_batches(model, inputs, batch_size)
    return outputs.reshape(len(outputs), -1).mean(axis=1).astype("float64")


# --- collectives over workers (identity with one worker) -----------------------------------------


def worker_position(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(this worker's index, number of workers) from the strategy's cluster (``TF_CONFIG``)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec or resolver.task_type is None:
        return 0, 1
    return int(resolver.task_id), len(spec[resolver.task_type])


def _local_replicas(strategy: tf.distribute.Strategy) -> int:
    """Replicas in this process (GPUs of a worker); the default strategy has one."""
    return strategy.num_replicas_in_sync // worker_position(strategy)[1]


def all_sum(strategy: tf.distribute.Strategy, array: np.ndarray) -> np.ndarray:
    """Element-wise sum over workers of one array per worker (float64, exact when adding zeros)."""
    if strategy.num_replicas_in_sync == 1:
        return np.asarray(array, dtype="float64")
    value = tf.constant(np.asarray(array, dtype="float64"))
    local = _local_replicas(strategy)
    # Only the first replica of each worker contributes; the others add zeros.
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: value if ctx.replica_id_in_sync_group % local == 0 else tf.zeros_like(value)
    )
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def gather_rows(strategy: tf.distribute.Strategy, rows: np.ndarray) -> np.ndarray:
    """Every worker's rows (any number, even none), concatenated in worker order, on every worker."""
    rows = np.asarray(rows, dtype="float64")
    if strategy.num_replicas_in_sync == 1:
        return rows
    rank, world = worker_position(strategy)
    counts = np.zeros(world)
    counts[rank] = len(rows)
    counts = all_sum(strategy, counts).astype(int)
    buffer = np.zeros((int(counts.sum()), *rows.shape[1:]))
    start = int(counts[:rank].sum())
    buffer[start : start + len(rows)] = rows
    return all_sum(strategy, buffer)


def agree_min(strategy: tf.distribute.Strategy, value: int) -> int:
    """The smallest of one integer per worker."""
    return int(gather_rows(strategy, np.array([[value]])).min())


def _moving_statistics(model: keras.Model) -> list[keras.Variable]:
    """Moving mean/variance of BatchNormalization layers that train (frozen ones never update)."""
    found: list[keras.Variable] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _moving_statistics(layer)
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found += [layer.moving_mean, layer.moving_variance]
    return found


def sync_moving_statistics(strategy: tf.distribute.Strategy, model: keras.Model) -> None:
    """Average BatchNorm moving statistics over all replicas (see the module docstring)."""
    variables = _moving_statistics(model)
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    average = getattr(model, "_pneumonet_sync", None)
    if average is None:

        @tf.function
        def average():
            def replica_mean():
                context = tf.distribute.get_replica_context()
                return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

            means = strategy.run(replica_mean)
            for variable, mean in zip(variables, means, strict=True):
                variable.assign(strategy.experimental_local_results(mean)[0])

        model._pneumonet_sync = average
    average()


def weights_digest(model: keras.Model) -> str:
    """A short hash of all weights: equal digests on two ranks mean bit-identical models."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


# --- the step ------------------------------------------------------------------------------------


class Fitter:
    """Owns the optimizer and the compiled distributed train step of one model."""

    def __init__(self, model: keras.Model, settings: FitSettings, strategy: tf.distribute.Strategy | None = None):
        self.model = model
        self.settings = settings
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate=settings.learning_rate)
            self.optimizer = keras.optimizers.LossScaleOptimizer(optimizer) if settings.loss_scale else optimizer
        self._step = tf.function(self._distributed_step, reduce_retracing=True)

    def _replica_step(self, x, y, global_batch):
        w0, w1 = (float(w) for w in self.settings.class_weight)
        with tf.GradientTape() as tape:
            probs = tf.cast(self.model(x, training=True), tf.float32)  # (N, members): each its own loss
            per_example = keras.losses.binary_crossentropy(
                tf.broadcast_to(tf.reshape(y, (-1, 1)), tf.shape(probs)), probs, label_smoothing=self.settings.label_smoothing
            )
            weights = tf.where(y > 0.5, w1, w0)
            loss = tf.reduce_sum(per_example * weights) / global_batch
            if self.model.losses:
                loss += tf.add_n(self.model.losses) / self.strategy.num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss) if self.settings.loss_scale else loss
        grads = tape.gradient(scaled, self.model.trainable_variables)
        if self.settings.loss_scale:
            # One global verdict on finiteness, so every replica takes the same LossScaleOptimizer branch.
            bad = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads if g is not None])
            bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad)
            grads = [None if g is None else tf.where(bad > 0, tf.fill(tf.shape(g), math.nan), g) for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        mean = tf.reduce_mean(probs, axis=-1)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(mean >= 0.5, tf.float32), y), tf.float32))
        return loss * global_batch, correct, tf.cast(tf.size(y), tf.float32)

    def _distributed_step(self, x, y, global_batch):
        results = self.strategy.run(self._replica_step, args=(x, y, global_batch))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results]

    def train_epoch(self, dataset, steps: int, global_batch: int) -> tuple[float, float, int]:
        """``steps`` steps over a distributed dataset; (mean weighted loss, accuracy, images) over all replicas."""
        totals = tf.zeros(3)
        batch = tf.constant(float(global_batch))
        iterator = iter(dataset)
        for _ in range(steps):
            x, y = next(iterator)
            # Summed on the device and read once per epoch: a float() per step would wait for every step.
            totals += tf.stack(self._step(x, y, batch))
        loss_sum, correct, seen = (float(value) for value in totals.numpy())
        return loss_sum / max(seen, 1.0), correct / max(seen, 1.0), int(seen)


def validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Unweighted loss, accuracy at 0.5 and ROC-AUC on the validation split."""
    # Clipped at Keras's epsilon, as the training loss is (log_loss alone clips at float64's, ~2e-16).
    loss = log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])
    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else float("nan")
    return {"val_loss": float(loss), "val_accuracy": float(np.mean((probs >= 0.5) == labels)), "val_roc_auc": float(auc)}


def global_validation(
    model: keras.Model, val: tuple[np.ndarray, np.ndarray], batch_size: int, strategy: tf.distribute.Strategy
) -> dict[str, float]:
    """Validation figures over every worker's shard: predictions are gathered, then scored once."""
    local = np.stack([val[1].astype("float64"), predict_probabilities(model, val[0], batch_size)], axis=1)
    everything = gather_rows(strategy, local.reshape(-1, 2))
    return validation_scores(everything[:, 0], everything[:, 1])


EpochHook = Callable[[Fitter, FitState, dict[str, float]], None]


def _steps_per_epoch(strategy: tf.distribute.Strategy, n_local: int, settings: FitSettings) -> int:
    """Steps every worker can run: full batches (or one short batch for a tiny shard), minimum over workers."""
    replicas = _local_replicas(strategy)
    batches = n_local // settings.batch_size if n_local > settings.batch_size else int(n_local > 0)
    steps = agree_min(strategy, batches // replicas)
    if steps < 1:
        raise DataError(
            f"a training shard holds only {n_local} images, too few for {replicas} batch(es) of {settings.batch_size}: "
            "use fewer workers or a smaller train.batch_size"
        )
    return min(steps, settings.steps_per_epoch or steps)


def fit(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: FitSettings,
    *,
    state: FitState | None = None,
    strategy: tf.distribute.Strategy | None = None,
    on_epoch_end: EpochHook | None = None,
    fitter: Fitter | None = None,
) -> FitState:
    """Train with early stopping on validation ROC-AUC and leave the best weights in ``model``.

    ``train`` and ``val`` are this worker's shard (everything, in one process). ``state`` resumes after
    its last epoch (restore the model and optimizer first); ``on_epoch_end`` sees every epoch's global
    figures, e.g. to checkpoint.
    """
    state = state or FitState()
    fitter = fitter or Fitter(model, settings, strategy)
    strategy = fitter.strategy
    rank, _ = worker_position(strategy)
    steps = _steps_per_epoch(strategy, len(train[1]), settings)
    global_batch = settings.batch_size * strategy.num_replicas_in_sync
    # Shuffling and augmentation differ per worker (its own seed), and continue after a restart.
    local = training_dataset(train[0], train[1], settings.batch_size, settings.seed + 7919 * rank + state.epoch, settings.augment)
    dataset = strategy.distribute_datasets_from_function(lambda _: local)
    schedule = cosine_decay(settings.learning_rate, settings.epochs)
    for epoch in range(state.epoch, settings.epochs):
        stalled = state.epoch - state.best_epoch >= settings.patience
        if settings.select == "best_val_auc" and stalled and state.best_weights is not None:
            log.info("early stop: no better validation ROC-AUC for %d epochs", settings.patience)
            break
        learning_rate = float(schedule(epoch))
        fitter.optimizer.learning_rate.assign(learning_rate)
        started = time.perf_counter()
        loss, accuracy, seen = fitter.train_epoch(dataset, steps, global_batch)
        sync_moving_statistics(strategy, model)
        seconds = time.perf_counter() - started
        scores = global_validation(model, val, settings.batch_size, strategy)
        figures = {
            "epoch": epoch + 1,
            "loss": loss,
            "accuracy": accuracy,
            **scores,
            "learning_rate": learning_rate,
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else 0.0,
            "images": seen,
        }
        state.epoch = epoch + 1
        state.record(**{k: v for k, v in figures.items() if k != "epoch"})
        if scores["val_roc_auc"] > state.best_auc or state.best_weights is None:
            state.best_auc, state.best_epoch = scores["val_roc_auc"], state.epoch
            state.best_weights = [np.array(w) for w in model.get_weights()]
        log.info(
            "epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_auc %.4f  %.0f img/s",
            state.epoch, settings.epochs, loss, accuracy, scores["val_loss"], scores["val_roc_auc"],
            figures["images_per_second"],
        )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(fitter, state, figures)
    if settings.select == "best_val_auc" and state.best_weights is not None:
        model.set_weights(state.best_weights)
    return state
