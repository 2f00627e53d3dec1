"""Train the three variants from a dataset root to model artifacts.

Read top to bottom: prepare the data once (catalog → patient split → decoded images), then one
stage per variant, each ending in :func:`finish`, which picks the decision threshold on the
validation split, saves the artifact and evaluates on the test split when there is one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pneumonet import storage
from pneumonet.artifact import Artifact, build_metadata, load_artifact, save_artifact
from pneumonet.config import Config, Variant
from pneumonet.data.catalog import manifest_digest, require_classes, scan, write_manifest
from pneumonet.data.pipeline import ImageSet, limit_per_class, load_image_set
from pneumonet.data.split import assign_validation
from pneumonet.errors import ArtifactError, ConfigError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.metrics import choose_threshold
from pneumonet.evaluation.plots import plot_training_curves
from pneumonet.models import build_model
from pneumonet.models.transfer import build_transfer, unfreeze_tail
from pneumonet.training.loop import (
    EpochHook,
    FitSettings,
    FitState,
    balanced_class_weight,
    fit,
    predict_batches,
    predict_probabilities,
)

log = logging.getLogger(__name__)

VAL_METRIC_KEYS = ("n", "accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "f1", "ci95")


@dataclass
class PreparedData:
    """A dataset ready for training: decoded splits and the manifest they came from."""

    root: str
    manifest: pd.DataFrame  # every file, with the final split and an error for unusable ones
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    digest: str


def prepare_data(config: Config, root: str) -> PreparedData:
    """Catalog ``root``, split validation patients off train/, and decode every split once."""
    manifest = scan(root)
    rows = assign_validation(manifest, config.data.val_fraction, config.seed, config.data.merge_val_folder)
    rows = limit_per_class(rows, config.data.limit_per_class, config.seed)
    size = config.model.image_size
    sets = {
        split: load_image_set(require_classes(rows, split, root), size, config.data, progress=f"decode {split}")
        for split in ("train", "val")
    }
    test_rows = rows[rows["split"] == "test"]
    test = load_image_set(test_rows, size, config.data, progress="decode test") if len(test_rows) else None
    failures = {uri: why for part in (*sets.values(), test) if part is not None for uri, why in part.failures.items()}
    full = pd.concat([rows, manifest[manifest["error"].notna()]], ignore_index=True)
    full.loc[full["uri"].isin(failures), "error"] = full["uri"].map(failures)
    for split, part in sets.items():
        if len(np.unique(part.labels)) < 2:
            raise ConfigError(f"{root}: after skipping unreadable files the {split} split lacks a class")
    return PreparedData(root, full, sets["train"], sets["val"], test, manifest_digest(full[full["error"].isna()]))


def stage_settings(config: Config, data: PreparedData, finetune: bool = False, augment: bool = True) -> FitSettings:
    """Fit settings of one stage from the config (finetune: its own epochs and lower learning rate)."""
    train = config.train
    return FitSettings(
        epochs=train.finetune_epochs if finetune else train.epochs,
        batch_size=train.batch_size,
        learning_rate=train.finetune_learning_rate if finetune else train.learning_rate,
        patience=train.patience,
        seed=config.seed,
        class_weight=balanced_class_weight(data.train.labels) if train.class_weight == "balanced" else (1.0, 1.0),
        label_smoothing=train.label_smoothing,
        augment=train.augment if augment else None,
        steps_per_epoch=train.steps_per_epoch,
    )


def train_custom(config: Config, data: PreparedData, on_epoch_end: EpochHook | None = None) -> tuple[keras.Model, FitState]:
    keras.utils.set_random_seed(config.seed)
    model = build_model("custom", config.model, config.seed)
    state = fit(model, (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                stage_settings(config, data), on_epoch_end=on_epoch_end)  # fmt: skip
    return model, state


def train_transfer(config: Config, data: PreparedData, on_epoch_end: EpochHook | None = None) -> tuple[keras.Model, FitState]:
    """Frozen backbone + new head; with ``train.cache_features`` the backbone runs once, not every epoch."""
    keras.utils.set_random_seed(config.seed)
    parts = build_transfer(config.model, config.seed)
    if not config.train.cache_features:
        state = fit(parts.model, (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                    stage_settings(config, data), on_epoch_end=on_epoch_end)  # fmt: skip
        return parts.model, state
    log.info("computing frozen-backbone features once for %d training and %d validation images", len(data.train), len(data.val))
    train_features = predict_batches(parts.features, data.train.images, config.train.batch_size)
    val_features = predict_batches(parts.features, data.val.images, config.train.batch_size)
    state = fit(parts.head, (train_features, data.train.labels), (val_features, data.val.labels),
                stage_settings(config, data, augment=False), on_epoch_end=on_epoch_end)  # fmt: skip
    return parts.model, state


def train_finetune(
    config: Config, data: PreparedData, transfer: Artifact, on_epoch_end: EpochHook | None = None
) -> tuple[keras.Model, FitState]:
    """Start from the trained transfer model and unfreeze the last backbone layers at a low learning rate."""
    keras.utils.set_random_seed(config.seed)
    model = transfer.model
    unfrozen = unfreeze_tail(model, config.model.finetune_layers)
    log.info("finetune: unfroze %d backbone layers (%s … %s)", len(unfrozen), unfrozen[0], unfrozen[-1])
    state = fit(model, (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                stage_settings(config, data, finetune=True), on_epoch_end=on_epoch_end)  # fmt: skip
    return model, state


def _write_png(render, uri: str, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(uri).name
        render(*args, path)
        storage.write_bytes(uri, path.read_bytes())


def finish(
    variant: Variant, model: keras.Model, state: FitState, config: Config, data: PreparedData, out: str
) -> dict:
    """Threshold on validation, save the artifact with its curves, evaluate on test; return a summary."""
    artifact_uri = storage.join(out, variant)
    val_probs = predict_probabilities(model, data.val.images, config.train.batch_size)
    threshold = choose_threshold(data.val.labels, val_probs, config.train.threshold)
    val_metrics = evaluate_predictions(
        data.val.labels, val_probs, threshold, storage.join(artifact_uri, "evaluation", "val"),
        subtypes=data.val.rows["subtype"].tolist(), title=f"{variant} — validation",
    )  # fmt: skip
    meta = build_metadata(
        variant=variant,
        config=config,
        threshold=threshold,
        val_metrics={key: val_metrics[key] for key in VAL_METRIC_KEYS if key in val_metrics},
        manifest_digest=data.digest,
        history=state.history,
        extra={"best_epoch": state.best_epoch, "epochs_run": state.epoch, "data_root": data.root},
    )
    save_artifact(model, meta, artifact_uri)
    storage.write_text(storage.join(artifact_uri, "history.json"), json.dumps(state.history, indent=2))
    _write_png(plot_training_curves, storage.join(artifact_uri, "training_curves.png"), state.history)
    summary = {"variant": variant, "artifact": artifact_uri, "threshold": threshold, "val": val_metrics}
    if data.test is not None and len(data.test):
        test_probs = predict_probabilities(model, data.test.images, config.train.batch_size)
        summary["test"] = evaluate_predictions(
            data.test.labels, test_probs, threshold, storage.join(artifact_uri, "evaluation", "test"),
            subtypes=data.test.rows["subtype"].tolist(), title=f"{variant} — test",
        )  # fmt: skip
    log.info("%s: artifact written to %s (threshold %.3f)", variant, artifact_uri, threshold)
    return summary


def train_variants(config: Config, variants: list[Variant], root: str, out: str) -> dict[str, dict]:
    """Train the variants in order (finetune after transfer) into ``out/<variant>``; one decode for all."""
    if "finetune" in variants and "transfer" not in variants and not storage.exists(storage.join(out, "transfer", "pneumonet.json")):
        raise ArtifactError(f"finetune starts from a trained transfer model, but {storage.join(out, 'transfer')} has none: train --variant transfer first (or all)")
    data = prepare_data(config, root)
    write_manifest(data.manifest, storage.join(out, "manifest.parquet"))
    summaries: dict[str, dict] = {}
    for variant in variants:
        log.info("training %s", variant)
        if variant == "custom":
            model, state = train_custom(config, data)
        elif variant == "transfer":
            model, state = train_transfer(config, data)
        else:
            model, state = train_finetune(config, data, load_artifact(storage.join(out, "transfer")))
        summaries[variant] = finish(variant, model, state, config, data, out)
        keras.backend.clear_session()  # free the graph of the previous variant
    return summaries
