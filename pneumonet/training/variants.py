"""The three variants: what each one trains, with which settings, and how a trained model becomes an artifact.

Read top to bottom: the data plan (catalog → patient split, once, on the driver), the stage of each
variant (:func:`build_stage`: the model, the part the optimizer updates, the frozen feature extractor
of cached-feature transfer), the single-process trainers (tests, benchmarks), and :func:`finish`,
which picks the decision threshold on the validation split, saves the artifact and evaluates on the
test split. :func:`train_variants` is the embedded default: it runs the same Ray Train job as
``jobs/train.py`` on a local Ray cluster (:mod:`pneumonet.training.distributed`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pneumonet import storage
from pneumonet.artifact import DRIFT_KEY, build_metadata, load_artifact, save_artifact
from pneumonet.config import Config, Variant
from pneumonet.data.catalog import labels_of, manifest_digest, require_classes, scan, shared_patients
from pneumonet.data.pipeline import ImageSet, limit_per_class, load_image_set
from pneumonet.data.split import assign_validation
from pneumonet.errors import DataError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.drift import build_reference, reference_files
from pneumonet.evaluation.metrics import choose_threshold
from pneumonet.evaluation.plots import plot_training_curves
from pneumonet.models import build_model, member_outputs
from pneumonet.models.embedding import embedding_model
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

if TYPE_CHECKING:
    from pneumonet.tracking import TrackingRun

log = logging.getLogger(__name__)

# What pneumonet.json keeps of the validation metrics (the model card of the endpoint's page shows them).
VAL_METRIC_KEYS = ("n", "n_positive", "n_negative", "accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity",
                   "precision", "f1", "ci95", "ci95_grouped_by")  # fmt: skip


# --- data ----------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """The catalog of a dataset and its rows per split, drawn once (patient-grouped validation)."""

    root: str
    manifest: pd.DataFrame  # every file, with the final split and an error for unusable ones
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def with_failures(self, failed: dict[str, str]) -> SplitPlan:
        """The plan after decoding: failed files get their reason in the manifest and leave the splits."""
        manifest = self.manifest.copy()
        manifest.loc[manifest["uri"].isin(failed), "error"] = manifest["uri"].map(failed)

        def keep(rows: pd.DataFrame) -> pd.DataFrame:
            return rows[~rows["uri"].isin(failed)].reset_index(drop=True)

        return SplitPlan(self.root, manifest, keep(self.train), keep(self.val), keep(self.test))

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest[self.manifest["error"].isna()])


def plan_splits(config: Config, root: str) -> SplitPlan:
    """Catalog ``root`` and split validation patients off train/ (DataError when a split lacks a class)."""
    manifest = scan(root)
    rows = assign_validation(manifest, config.data.val_fraction, config.seed, config.data.merge_val_folder)
    rows = limit_per_class(rows, config.data.limit_per_class, config.seed)
    return saved_plan(root, pd.concat([rows, manifest[manifest["error"].notna()]], ignore_index=True))


def saved_plan(root: str, manifest: pd.DataFrame) -> SplitPlan:
    """The plan of a manifest whose split is final (a resumed run trains on the patients it started with)."""
    rows = manifest[manifest["error"].isna()]
    train, val = (require_classes(rows, split, root) for split in ("train", "val"))
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    return SplitPlan(root, manifest.reset_index(drop=True), train, val, test)


@dataclass
class EvalData:
    """What :func:`finish` needs: the decoded validation and test splits and the data's identity."""

    root: str
    val: ImageSet
    test: ImageSet | None
    digest: str
    shared_patients: list[str]  # test/ patients also in the training pool: recorded with the test metrics


@dataclass
class PreparedData(EvalData):
    """Single-process training: every split decoded in this process."""

    manifest: pd.DataFrame
    train: ImageSet


def prepare_data(config: Config, root: str) -> PreparedData:
    """Catalog, split and decode every split once in this process (tests, benchmarks, notebooks)."""
    plan = plan_splits(config, root)
    size = config.model.image_size
    sets = {split: load_image_set(getattr(plan, split), size, config.data, progress=f"decode {split}") for split in ("train", "val")}
    test = load_image_set(plan.test, size, config.data, progress="decode test") if len(plan.test) else None
    failed = {uri: why for part in (*sets.values(), test) if part is not None for uri, why in part.failures.items()}
    plan = plan.with_failures(failed)
    for split, part in sets.items():
        if len(np.unique(part.labels)) < 2:
            raise DataError(f"{root}: after skipping unreadable files the {split} split lacks a class")
    return PreparedData(root, sets["val"], test, plan.digest, shared_patients(plan.manifest), plan.manifest, sets["train"])


# --- stages --------------------------------------------------------------------------------------


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
    data: PreparedData,
    transfer_uri: str | None = None,
    on_epoch_end: EpochHook | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[keras.Model, FitState]:
    """Train one variant in this process on decoded data; returns the full model (best weights) and its state."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        stage = build_stage(variant, config, transfer_uri)
    settings = stage_settings(config, balanced_class_weight(data.train.labels), variant)
    batch = config.train.batch_size
    train = (stage_inputs(stage, data.train.images, batch), data.train.labels)
    val = (stage_inputs(stage, data.val.images, batch), data.val.labels)
    state = fit(stage.trained, train, val, settings, strategy=strategy, on_epoch_end=on_epoch_end)
    return stage.model, state


def train_custom(config: Config, data: PreparedData, on_epoch_end: EpochHook | None = None) -> tuple[keras.Model, FitState]:
    return train_stage("custom", config, data, on_epoch_end=on_epoch_end)


def train_transfer(config: Config, data: PreparedData, on_epoch_end: EpochHook | None = None) -> tuple[keras.Model, FitState]:
    """Frozen backbone + new head; with ``train.cache_features`` the backbone runs once, not every epoch."""
    return train_stage("transfer", config, data, on_epoch_end=on_epoch_end)


def train_finetune(
    config: Config, data: PreparedData, transfer_uri: str, on_epoch_end: EpochHook | None = None
) -> tuple[keras.Model, FitState]:
    """Start from the trained transfer model and unfreeze the last backbone layers at a low learning rate."""
    return train_stage("finetune", config, data, transfer_uri, on_epoch_end)


# --- artifact --------------------------------------------------------------------------------------


def _write_png(render, uri: str, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(uri).name
        render(*args, path)
        storage.write_bytes(uri, path.read_bytes())


def drift_reference(model: keras.Model, probs: np.ndarray, images: ImageSet, config: Config) -> tuple[dict, dict[str, bytes]]:
    """The drift reference of ``images`` (the validation split) for ``pneumonet.json`` and its file; none
    (with a warning) when the split is too small to hold one out five ways."""
    embeddings = predict_batches(embedding_model(model), images.images, config.train.batch_size)
    try:
        ref, record = build_reference(probs, embeddings, images.rows["patient_id"].to_numpy(), config.drift, config.seed)
    except ValueError as exc:
        log.warning("no drift reference in this artifact: %s", exc)
        return {}, {}
    record, files = reference_files(ref, record)
    log.info("drift reference: %d images of %d patients, %d embeddings of %d dimensions in %d principal components",
             record["n_images"], record["n_patients"], record["n_vectors"], record["embedding_dim"], record["pca_components"])  # fmt: skip
    return {DRIFT_KEY: record}, files


def finish(
    variant: Variant,
    model: keras.Model,
    state: FitState,
    config: Config,
    data: EvalData,
    artifact_uri: str,
    run: TrackingRun | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Threshold and drift reference on validation, save the artifact with its curves, evaluate on test;
    return a summary.

    ``run`` (W&B) gets the final metrics, curves and plots; ``extra`` adds keys to ``pneumonet.json``.
    """
    val_probs = predict_probabilities(model, data.val.images, config.train.batch_size)
    threshold = choose_threshold(data.val.labels, val_probs, config.train.threshold)
    val_uri = storage.join(artifact_uri, "evaluation", "val")
    val_metrics = evaluate_predictions(
        data.val.labels, val_probs, threshold, val_uri,
        subtypes=data.val.rows["subtype"].tolist(), title=f"{variant} — validation",
    )  # fmt: skip
    reference, files = drift_reference(model, val_probs, data.val, config)
    meta = build_metadata(
        variant=variant,
        config=config,
        threshold=threshold,
        val_metrics={key: val_metrics[key] for key in VAL_METRIC_KEYS if key in val_metrics},
        manifest_digest=data.digest,
        history=state.history,
        extra={"best_epoch": state.best_epoch, "epochs_run": state.epoch, "data_root": data.root,
               "selected_epoch": state.epoch if config.train.select == "last" else state.best_epoch,
               "selection": config.train.select, **reference, **(extra or {})},  # fmt: skip
    )
    save_artifact(model, meta, artifact_uri, files)
    storage.write_text(storage.join(artifact_uri, "history.json"), json.dumps(state.history, indent=2))
    curves_uri = storage.join(artifact_uri, "training_curves.png")
    _write_png(plot_training_curves, curves_uri, state.history)
    summary = {"variant": variant, "artifact": artifact_uri, "threshold": threshold, "val": val_metrics}
    if run is not None:
        run.log_evaluation("val", data.val.labels, val_probs, threshold, val_metrics, val_uri)
        run.log_images({"training_curves": curves_uri})
    if data.test is not None and len(data.test):
        test_probs = predict_probabilities(model, data.test.images, config.train.batch_size)
        test_uri = storage.join(artifact_uri, "evaluation", "test")
        summary["test"] = evaluate_predictions(
            data.test.labels, test_probs, threshold, test_uri,
            subtypes=data.test.rows["subtype"].tolist(), title=f"{variant} — test",
            extra={"patients_also_in_train": data.shared_patients},
        )  # fmt: skip
        if run is not None:
            run.log_evaluation("test", data.test.labels, test_probs, threshold, summary["test"], test_uri)
    log.info("%s: artifact written to %s (threshold %.3f)", variant, artifact_uri, threshold)
    return summary


def class_weight_of(rows: pd.DataFrame) -> tuple[float, float]:
    return balanced_class_weight(labels_of(rows))


def train_variants(config: Config, variants: list[Variant], root: str, storage_root: str, out: str | None = None) -> dict[str, dict]:
    """Train the variants in order (finetune after transfer) with Ray Train on a local Ray cluster
    (started here, or the one ``RAY_ADDRESS`` names).

    ``storage_root`` keeps the run (checkpoints) and the models, ``models/<variant>/<run-id>`` with a
    ``latest`` pointer, unless the config sets ``distributed.storage``; with ``out`` the artifacts are
    also published as ``out/<variant>``.
    """
    from pneumonet.training.distributed import run_training

    return run_training(config, variants, root, storage_root=config.distributed.storage or storage_root, out=out)
