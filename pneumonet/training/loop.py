"""The epoch loop shared by local and distributed training.

It uses an explicit train step run through ``strategy.run`` rather than ``model.fit``: the same
code then works with the default strategy in one process and with
``MultiWorkerMirroredStrategy`` under Ray Train, where Keras 3's ``fit`` breaks
(keras-team/keras#20585). Model selection is on validation ROC-AUC, the metric the threshold and
the clinicians care about, not on loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from pneumonet.config import AugmentConfig
from pneumonet.data.pipeline import inference_batches, training_dataset

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """Everything needed to pick up after the last finished epoch."""

    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_weights: list[np.ndarray] | None = None
    history: dict[str, list[float]] = field(default_factory=dict)

    def record(self, **values: float) -> None:
        for key, value in values.items():
            self.history.setdefault(key, []).append(float(value))


@dataclass(frozen=True)
class FitSettings:
    """Knobs of one training stage."""

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    seed: int
    class_weight: tuple[float, float] = (1.0, 1.0)
    label_smoothing: float = 0.0
    augment: AugmentConfig | None = None
    steps_per_epoch: int | None = None


def balanced_class_weight(labels: np.ndarray) -> tuple[float, float]:
    """Weights that make NORMAL and PNEUMONIA count equally in the loss (the Kaggle set is ~1:3)."""
    counts = np.bincount(labels.astype(int), minlength=2).astype(float)
    if counts.min() == 0:
        return (1.0, 1.0)
    weights = counts.sum() / (2.0 * counts)
    return (float(weights[0]), float(weights[1]))


def cosine_learning_rate(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base`` towards ``base / 20`` over the planned epochs."""
    floor = base / 20
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))


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
    """Probabilities of PNEUMONIA, one per input."""
    return predict_batches(model, inputs, batch_size).reshape(-1).astype("float64")


class Fitter:
    """Owns the optimizer and the compiled train step of one model."""

    def __init__(self, model: keras.Model, settings: FitSettings, strategy: tf.distribute.Strategy | None = None):
        self.model = model
        self.settings = settings
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.optimizer = keras.optimizers.Adam(learning_rate=settings.learning_rate)
        self._step = tf.function(self._distributed_step, reduce_retracing=True)

    def _replica_step(self, x, y, global_batch):
        w0, w1 = self.settings.class_weight
        with tf.GradientTape() as tape:
            probs = tf.cast(self.model(x, training=True), tf.float32)
            per_example = keras.losses.binary_crossentropy(
                tf.reshape(y, (-1, 1)), probs, label_smoothing=self.settings.label_smoothing
            )
            weights = tf.where(y > 0.5, w1, w0)
            loss = tf.reduce_sum(per_example * weights) / global_batch
            if self.model.losses:
                loss += tf.add_n(self.model.losses) / self.strategy.num_replicas_in_sync
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(tf.reshape(probs, [-1]) >= 0.5, tf.float32), y), tf.float32))
        return loss * global_batch, correct, tf.cast(tf.size(y), tf.float32)

    def _distributed_step(self, x, y, global_batch):
        results = self.strategy.run(self._replica_step, args=(x, y, global_batch))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results]

    def train_epoch(self, dataset: tf.data.Dataset, global_batch: int) -> tuple[float, float, int]:
        """One pass over ``dataset``; returns (mean weighted loss, accuracy, images seen) over all replicas."""
        loss_sum = correct = seen = 0.0
        batch = tf.constant(float(global_batch))
        for step, (x, y) in enumerate(dataset):
            if self.settings.steps_per_epoch and step >= self.settings.steps_per_epoch:
                break
            step_loss, step_correct, step_seen = self._step(x, y, batch)
            loss_sum += float(step_loss)
            correct += float(step_correct)
            seen += float(step_seen)
        return loss_sum / max(seen, 1.0), correct / max(seen, 1.0), int(seen)


def validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Unweighted loss, accuracy at 0.5 and ROC-AUC on the validation split."""
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    auc = roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else float("nan")
    return {"val_loss": float(loss), "val_accuracy": float(np.mean((probs >= 0.5) == labels)), "val_roc_auc": float(auc)}


EpochHook = Callable[[Fitter, FitState, dict[str, float]], None]


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

    ``state`` resumes after its last epoch (restore the model and optimizer first); ``on_epoch_end``
    sees every epoch's figures, e.g. to checkpoint or to log to W&B.
    """
    state = state or FitState()
    fitter = fitter or Fitter(model, settings, strategy)
    replicas = fitter.strategy.num_replicas_in_sync
    dataset = training_dataset(train[0], train[1], settings.batch_size, settings.seed + state.epoch, settings.augment)
    dataset = fitter.strategy.experimental_distribute_dataset(dataset) if replicas > 1 else dataset
    for epoch in range(state.epoch, settings.epochs):
        if state.epoch - state.best_epoch >= settings.patience and state.best_weights is not None:
            log.info("early stop: no better validation ROC-AUC for %d epochs", settings.patience)
            break
        learning_rate = cosine_learning_rate(settings.learning_rate, epoch, settings.epochs)
        fitter.optimizer.learning_rate.assign(learning_rate)
        started = time.perf_counter()
        loss, accuracy, seen = fitter.train_epoch(dataset, settings.batch_size * replicas)
        seconds = time.perf_counter() - started
        scores = validation_scores(val[1], predict_probabilities(model, val[0], settings.batch_size))
        figures = {
            "epoch": epoch + 1,
            "loss": loss,
            "accuracy": accuracy,
            **scores,
            "learning_rate": learning_rate,
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else 0.0,
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
    if state.best_weights is not None:
        model.set_weights(state.best_weights)
    return state
