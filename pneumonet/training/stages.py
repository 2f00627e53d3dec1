"""What each variant trains, and the one function that trains it: on a Ray Train worker and in one process.

:func:`build_stage` makes the model of a variant (seeded: every worker builds the same one) and
names the part the optimizer updates; :func:`stage_settings` its epochs, learning rate and
augmentation; :func:`train_stage` trains it on decoded images. The Ray Train worker
(:mod:`pneumonet.training.worker`) calls :func:`train_stage` with its strategy, its shards and its
checkpoint hooks; tests, benchmarks and notebooks call it with the default strategy on images
decoded in this process (:func:`pneumonet.training.ingest.prepare_data`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pneumonet.artifact import load_artifact
from pneumonet.config import Config, Variant
from pneumonet.models import build_model, member_outputs
from pneumonet.models.transfer import build_transfer, unfreeze_tail
from pneumonet.training.loop import EpochHook, Fitter, FitSettings, FitState, balanced_class_weight, fit, predict_batches

log = logging.getLogger(__name__)

Resume = Callable[[Fitter], FitState]  # restores the trained part and the optimizer; returns the state to go on from


@dataclass
class Stage:
    """What one variant trains: ``model`` is the whole classifier, ``trained`` the part the optimizer
    updates (the head for cached-feature transfer), ``features`` the frozen extractor whose outputs
    are computed once (cached-feature transfer only). All three share layers and weights."""

    model: keras.Model
    trained: keras.Model
    features: keras.Model | None = None


def build_stage(variant: Variant, config: Config, transfer_uri: str | None = None) -> Stage:
    """The stage of ``variant``, with seeded initial weights (finetune: the transfer model at ``transfer_uri``)."""
    keras.utils.set_random_seed(config.seed)
    if variant == "custom":
        model = build_model("custom", config.model, config.seed)
        return Stage(model, member_outputs(model))
    if variant == "transfer":
        parts = build_transfer(config.model, config.seed)
        if config.train.cache_features:
            return Stage(parts.model, parts.head, parts.features)
        return Stage(parts.model, parts.model)
    if transfer_uri is None:
        raise ValueError("finetune needs the URI of a trained transfer model")
    model = load_artifact(transfer_uri).model
    unfrozen = unfreeze_tail(model, config.model.finetune_layers)
    log.info("finetune: unfroze %d backbone layers (%s … %s)", len(unfrozen), unfrozen[0], unfrozen[-1])
    return Stage(model, model)


def stage_settings(
    config: Config,
    class_weight: tuple[float, float],
    variant: Variant,
    loss_scale: bool = False,
) -> FitSettings:
    """Fit settings of one stage: finetune has its own epochs and lower learning rate; cached features are not augmented."""
    train = config.train
    finetune = variant == "finetune"
    cached = variant == "transfer" and train.cache_features
    return FitSettings(
        epochs=train.finetune_epochs if finetune else train.epochs,
        batch_size=train.batch_size,
        learning_rate=train.finetune_learning_rate if finetune else train.learning_rate,
        patience=train.patience,
        select=train.select,
        seed=config.seed,
        class_weight=class_weight if train.class_weight == "balanced" else (1.0, 1.0),
        label_smoothing=train.label_smoothing,
        augment=None if cached else train.augment,
        steps_per_epoch=train.steps_per_epoch,
        loss_scale=loss_scale,
    )


def stage_inputs(stage: Stage, images: np.ndarray, batch_size: int) -> np.ndarray:
    """What the trained part eats: the images, or their frozen-backbone features (computed once)."""
    if stage.features is None:
        return images
    return predict_batches(stage.features, images, batch_size)


def train_stage(
    variant: Variant,
    config: Config,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    class_weight: tuple[float, float] | None = None,
    transfer_uri: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    loss_scale: bool = False,
    resume: Resume | None = None,
    on_epoch_end: EpochHook | None = None,
) -> tuple[Stage, FitState]:
    """Train ``variant`` on (images, labels) of this process's share; the stage keeps the best weights.

    ``class_weight``: of the whole training split (default: balanced over ``train``'s labels, which are
    the whole split in one process); ``resume``: called once the model and optimizer exist, before
    the first epoch; ``loss_scale``: the dtype policy is mixed_float16.
    """
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        stage = build_stage(variant, config, transfer_uri)
    weights = class_weight if class_weight is not None else balanced_class_weight(train[1])
    settings = stage_settings(config, weights, variant, loss_scale)
    fitter = Fitter(stage.trained, settings, strategy)
    state = resume(fitter) if resume is not None else FitState()
    batch = config.train.batch_size
    inputs = [(stage_inputs(stage, images, batch), labels) for images, labels in (train, val)]
    state = fit(stage.trained, *inputs, settings, state=state, fitter=fitter, on_epoch_end=on_epoch_end)
    return stage, state
