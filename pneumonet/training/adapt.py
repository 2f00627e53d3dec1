"""Site adaptation: the custom CNN fine-tuned on a site's labelled sample, judged without fooling anyone.

Calibration (``pneumonet calibrate``) moves only the threshold, and on another site's patients the
model's *ranking* is half of what goes wrong (docs/quality.md). ``pneumonet adapt`` fine-tunes the
whole network on the site's own labelled images (a tenth of the training learning rate, a few passes,
no augmentation by default: measured, augmentation cost site ROC-AUC here).

A model judged, or a threshold chosen, on the images it was just fine-tuned on is flattered (measured:
a threshold chosen that way for sensitivity 0.95 gave 0.91 on other site patients). So the figures
and the threshold come from *cross-fitting*: the sample's patients are split into stratified,
patient-grouped folds; for each fold a fresh copy of the source model is fine-tuned on the other
folds and scores the held-out one. Every image is then scored by a model that never saw its patient,
and those out-of-fold scores choose the site threshold and give the reported figures with their
patient-grouped intervals. The deployed model is fine-tuned the same way on the whole sample: it saw
a fold more of the site than the models that were judged, so their figures are, if anything, modest.

The new artifact has new weights, so a new version; it keeps the source's training threshold and
validation figures (of the *source* model: ``pneumonet evaluate --split val`` measures the adapted
one) and records ``site_calibration`` (the threshold scoring uses) and ``site_adaptation`` (settings,
per-fold ROC-AUC before and after, the source).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import keras
import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from pneumonet import storage
from pneumonet.artifact import Artifact, elsewhere, load_artifact, save_artifact
from pneumonet.artifact_meta import DRIFT_KEY, MANIFEST_FILE, SITE_KEY
from pneumonet.config import AdaptConfig, Config, ThresholdConfig
from pneumonet.errors import ConfigError, DataError
from pneumonet.evaluation.calibrate import site_record, site_sample
from pneumonet.models.custom import member_outputs
from pneumonet.training.loop import FitSettings, balanced_class_weight, fit

log = logging.getLogger(__name__)

ADAPT_KEY = "site_adaptation"


def patient_folds(labels: np.ndarray, patients: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Indices of each fold's held-out images: whole patients, both classes in each fold where possible."""
    per_class = [len(set(patients[labels == c])) for c in (0, 1)]
    if min(per_class) < folds:
        raise DataError(
            f"adapt.folds={folds} needs at least {folds} patients of each class in the sample; it has "
            f"{per_class[0]} NORMAL and {per_class[1]} PNEUMONIA patients (use fewer folds)"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels, groups=patients)]


def fine_tune(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    monitor: tuple[np.ndarray, np.ndarray],
    cfg: AdaptConfig,
    trained_with: Config,
    seed: int,
) -> keras.Model:
    """Fine-tune ``model`` in place (each ensemble member on its own loss, as in training) and return it.

    ``monitor``: the images whose figures the epoch log lines show (no epoch is selected on them).
    """
    train = trained_with.train
    settings = FitSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        patience=cfg.epochs,
        seed=seed,
        class_weight=balanced_class_weight(labels) if train.class_weight == "balanced" else (1.0, 1.0),
        label_smoothing=train.label_smoothing,
        augment=train.augment if cfg.augment else None,
        select="last",
    )
    repeated = (np.concatenate([images] * cfg.repeat), np.concatenate([labels] * cfg.repeat))
    fit(member_outputs(model), repeated, monitor, settings)
    return model


def _copy(model: keras.Model) -> keras.Model:
    """A fresh copy of the source's network and weights for each fine-tuning (the source stays untouched,
    and is read from storage once)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else None


def adapt_artifact(
    model_uri: str,
    data_root: str,
    out_uri: str,
    policy: ThresholdConfig,
    cfg: AdaptConfig | None = None,
    split: str = "test",
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Fine-tune the custom artifact at ``model_uri`` on ``split`` of ``data_root``; write it to ``out_uri``.

    Returns the ``site_adaptation`` record with the ``site_calibration`` one under ``"calibration"``.
    """
    cfg = cfg or AdaptConfig()
    source = load_artifact(model_uri)
    if source.meta.get("variant") != "custom":
        raise ConfigError(
            f"{model_uri} is a {source.meta.get('variant')} model: adapt fine-tunes the custom CNN; "
            "calibrate the others on the site sample (pneumonet calibrate)"
        )
    out_uri = elsewhere(source, out_uri)
    # A drift reference describes the source's weights, not the fine-tuned ones: the new version has none.
    source.meta = {key: value for key, value in source.meta.items() if key not in (SITE_KEY, ADAPT_KEY, DRIFT_KEY)}
    trained_with = Config.model_validate(source.meta["config"])
    images = site_sample(source, data_root, split, policy)
    x, labels, patients = images.images, images.labels, images.rows["patient_id"].astype(str).to_numpy()
    before = source.predict_proba(x)
    out_of_fold = np.full(len(labels), math.nan)
    folds = []
    for k, held in enumerate(patient_folds(labels, patients, cfg.folds, seed)):
        rest = np.setdiff1d(np.arange(len(labels)), held)
        log.info("fold %d/%d: fine-tuning on %d images of %d patients, scoring %d held-out images",
                 k + 1, cfg.folds, len(rest), len(set(patients[rest])), len(held))  # fmt: skip
        model = fine_tune(_copy(source.model), x[rest], labels[rest], (x[held], labels[held]), cfg, trained_with, seed + k)
        out_of_fold[held] = Artifact(model, source.meta, source.uri).predict_proba(x[held])
        folds.append({"fold": k + 1, "n": len(held), "n_patients": len(set(patients[held])),
                      "roc_auc_before": _auc(labels[held], before[held]), "roc_auc_after": _auc(labels[held], out_of_fold[held])})  # fmt: skip
        log.info("fold %d/%d: held-out ROC-AUC %s → %s", k + 1, cfg.folds, folds[-1]["roc_auc_before"], folds[-1]["roc_auc_after"])
    described = {"uri": str(model_uri), "name": source.name, "version": source.version}
    calibration = site_record(
        images, out_of_fold, before, float(source.meta["threshold"]), policy, out_uri, (data_root, split),
        f"{source.name} adapted — site sample, out-of-fold scores", n_bootstrap,
    )  # fmt: skip
    calibration.update(scores="out_of_fold", source=described)
    adaptation = {
        "settings": cfg.model_dump(mode="json"),
        "seed": seed,
        "folds": folds,
        "roc_auc_before": _auc(labels, before),
        "roc_auc_out_of_fold": _auc(labels, out_of_fold),
        "val_metrics_of": "source",
        "source": described,
    }
    log.info("fine-tuning the deployed model on all %d site images (its epoch figures are on those same images)", len(labels))
    model = fine_tune(_copy(source.model), x, labels, (x, labels), cfg, trained_with, seed + cfg.folds)
    manifest = storage.join(source.uri, MANIFEST_FILE)  # the training data's lineage stays with the model
    files = {MANIFEST_FILE: storage.read_bytes(manifest)} if storage.exists(manifest) else None
    meta = {key: value for key, value in source.meta.items() if key not in ("version", "name")}
    save_artifact(model, {**meta, SITE_KEY: calibration, ADAPT_KEY: adaptation}, out_uri, files)
    return {**adaptation, "calibration": calibration}
