"""Site calibration: the step a hospital runs before going live.

A model's stored threshold was chosen on validation patients from its training distribution, and
those flatter it: on another site's images the same threshold can flag four in ten healthy
children. ``pneumonet calibrate`` scores the site's own labelled sample, chooses the threshold there
(``min_sensitivity`` or ``youden``), and writes a *new* artifact with the very same ``model.keras``
(same version) whose ``pneumonet.json`` keeps the training threshold and adds ``site_calibration``:
the site threshold, the policy, the sample's size and manifest digest, and the site figures with
patient-grouped bootstrap intervals. Scoring, serving and ``evaluate`` then decide with the site
threshold and say so (``threshold_source``).

A sample must be able to support what is asked of it. With ``n`` pneumonia images and no miss at
all, the 95% upper bound of the miss rate is still about ``3 / n`` (the "rule of three"), so a
sensitivity floor ``s`` needs at least ``3 / (1 - s)`` pneumonia images (60 for 0.95, 100 for 0.97);
and specificity needs at least ``MIN_NEGATIVES`` normal images. Smaller samples are refused.

``recalibrate=True`` also fits Platt scaling (``sigmoid(a · logit(p) + b)``, scikit-learn's logistic
regression on the model's logits) so the probabilities a clinician reads match the site's observed
rates; the threshold is then chosen on the recalibrated scale. Decisions and ROC-AUC do not change
(the map keeps the order); the record says what it bought: Brier score and expected calibration
error before and after, each measured on one half of the site's patients with the map fitted on
the other half (two-fold, both ways), never on the images it was fitted on.

The figures at the site threshold are in-sample: the threshold was chosen on those very images, so
they flatter it. The record therefore also holds ``held_out_estimate``: the threshold chosen the same
way on a random half of the site's patients and judged on the other half, averaged over 50 such
splits, which is what the chosen threshold can be expected to give on the site's next patients.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, brier_score_loss, recall_score

from pneumonet import storage
from pneumonet.artifact import Artifact, derive_artifact, load_artifact, platt_scale
from pneumonet.artifact_meta import SITE_KEY
from pneumonet.config import ThresholdConfig
from pneumonet.data.catalog import manifest_digest
from pneumonet.data.pipeline import ImageSet
from pneumonet.errors import ConfigError, DataError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.metrics import choose_threshold, compute_metrics
from pneumonet.evaluation.run import decode_split, write_predictions

MIN_NEGATIVES = 20
HELD_OUT_SPLITS = 50
SUMMARY_KEYS = ("n", "n_positive", "n_negative", "threshold", "accuracy", "roc_auc", "sensitivity",
                "specificity", "precision", "brier", "confusion_matrix", "ci95", "ci95_grouped_by")  # fmt: skip


def required_positives(policy: ThresholdConfig) -> float:
    """Pneumonia images a sample needs before its threshold can promise ``policy``'s sensitivity."""
    if policy.policy != "min_sensitivity":
        return MIN_NEGATIVES
    if policy.min_sensitivity >= 1.0:
        return math.inf  # no finite sample shows a miss rate of exactly zero
    return max(MIN_NEGATIVES, math.ceil(3.0 / (1.0 - policy.min_sensitivity) - 1e-9))


def check_sample(n_positive: int, n_negative: int, policy: ThresholdConfig, where: str) -> None:
    """DataError when the sample is too small for the requested policy (see the module docstring)."""
    if policy.policy == "fixed":
        raise ConfigError("calibration chooses a threshold on data: use --min-sensitivity S or --policy youden")
    needed = required_positives(policy)
    problems = []
    if n_positive < needed:
        goal = f"sensitivity >= {policy.min_sensitivity:g}" if policy.policy == "min_sensitivity" else "a Youden threshold"
        need = "more than any finite sample" if math.isinf(needed) else f"at least {needed}"
        problems.append(f"{n_positive} PNEUMONIA images, and {goal} needs {need}")
    if n_negative < MIN_NEGATIVES:
        problems.append(f"{n_negative} NORMAL images, and a specificity estimate needs at least {MIN_NEGATIVES}")
    if problems:
        raise DataError(f"{where}: the sample is too small to calibrate on: {'; '.join(problems)}")


def fit_platt(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(a, b) of the logistic map from the model's logit to the observed label."""
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    logits = (np.log(clipped) - np.log1p(-clipped)).reshape(-1, 1)
    fitted = LogisticRegression(C=1e4).fit(logits, labels)
    return float(fitted.coef_[0, 0]), float(fitted.intercept_[0])


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate − mean probability| over ten equal-width bins, weighted by their share of images."""
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    return float(sum(abs(labels[which == b].mean() - probs[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))  # fmt: skip


def patient_half(patients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mask of the images of a random half of the patients: a patient's images stay together."""
    unique = np.unique(patients)
    return np.isin(patients, rng.permutation(unique)[: len(unique) // 2])


def rates_at(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of deciding PNEUMONIA at ``probs >= threshold``."""
    preds = (probs >= threshold).astype(int)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "sensitivity": float(recall_score(labels, preds, pos_label=1, zero_division=np.nan)),
            "specificity": float(recall_score(labels, preds, pos_label=0, zero_division=np.nan))}  # fmt: skip


def held_out_estimate(
    labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, policy: ThresholdConfig,
    splits: int = HELD_OUT_SPLITS, seed: int = 1,
) -> dict[str, float]:  # fmt: skip
    """The mean figures on half the patients at a threshold chosen by ``policy`` on the other half,
    over ``splits`` random halves (a half lacking a class is skipped): what the site threshold gives
    on patients it was not chosen on."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(splits):
        fit = patient_half(patients, rng)
        if len(np.unique(labels[fit])) < 2 or len(np.unique(labels[~fit])) < 2:
            continue
        found.append(rates_at(labels[~fit], probs[~fit], choose_threshold(labels[fit], probs[fit], policy)))
    if not found:
        raise DataError("no split of the sample's patients into halves holds both classes in each half")
    return {**{key: float(np.mean([f[key] for f in found])) for key in found[0]}, "splits": len(found)}


def platt_record(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """Platt scaling fitted on the whole sample, and its two-fold, patient-grouped benefit."""
    half = patient_half(patients, np.random.default_rng(0))
    before, after = [], []
    for fit in (half, ~half):
        if len(np.unique(labels[fit])) < 2:
            continue
        a, b = fit_platt(labels[fit], probs[fit])
        scaled = platt_scale(probs[~fit], a, b)
        before.append((brier_score_loss(labels[~fit], probs[~fit]), expected_calibration_error(labels[~fit], probs[~fit])))
        after.append((brier_score_loss(labels[~fit], scaled), expected_calibration_error(labels[~fit], scaled)))
    a, b = fit_platt(labels, probs)
    if a <= 0:
        raise DataError(
            f"Platt scaling found slope {a:.3g} <= 0: the model ranks this sample's images no better than chance "
            "(or inverted); do not deploy it here, and calibrate without --recalibrate only to inspect the figures"
        )
    (brier_before, ece_before), (brier_after, ece_after) = np.mean(before, axis=0), np.mean(after, axis=0)
    return {"a": a, "b": b, "brier_before": float(brier_before), "brier_after": float(brier_after),
            "ece_before": float(ece_before), "ece_after": float(ece_after)}  # fmt: skip


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def site_record(
    images: ImageSet,
    probs: np.ndarray,
    source_probs: np.ndarray,
    training_threshold: float,
    policy: ThresholdConfig,
    out_uri: str,
    where: tuple[str, str],
    title: str,
    n_bootstrap: int,
) -> dict[str, Any]:
    """Choose the site threshold on ``probs`` and describe it: the ``site_calibration`` record.

    ``probs`` are the scores the deployed artifact stands for (calibrated, or out-of-fold when
    adapted); ``source_probs`` the unchanged model's, judged at its training threshold for comparison.
    Writes ``evaluation/site/`` (metrics at the site threshold, plots) and ``predictions.csv`` under ``out_uri``.
    """
    labels, patients = images.labels, images.rows["patient_id"].tolist()
    threshold = choose_threshold(labels, probs, policy)
    at_site = evaluate_predictions(
        labels, probs, threshold, storage.join(out_uri, "evaluation", "site"), subtypes=images.rows["subtype"].tolist(),
        title=title, n_bootstrap=n_bootstrap, groups=patients, extra={"threshold_source": "site"},
    )  # fmt: skip
    at_training = compute_metrics(labels, source_probs, training_threshold, n_bootstrap=n_bootstrap, groups=patients)
    write_predictions(images, probs, threshold, storage.join(out_uri, "evaluation", "site", "predictions.csv"))
    root, split = where
    return {
        "threshold": threshold,
        "policy": policy.model_dump(mode="json"),
        "training_threshold": training_threshold,
        "sample": {
            "root": root, "split": split, "manifest_digest": manifest_digest(images.rows),
            "n": len(labels), "n_positive": int(labels.sum()), "n_negative": int((labels == 0).sum()),
            "n_patients": len(set(patients)), "unreadable": len(images.failures),
        },
        "at_site_threshold": _summary(at_site),
        "held_out_estimate": held_out_estimate(labels, probs, np.asarray(patients), policy),
        "at_training_threshold": _summary(at_training),
        "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def site_sample(artifact: Artifact, data_root: str, split: str, policy: ThresholdConfig) -> ImageSet:
    """The decoded site sample, refused when it is too small for ``policy``."""
    images = decode_split(artifact, data_root, split)
    check_sample(int(images.labels.sum()), int((images.labels == 0).sum()), policy, f"{data_root} ({split})")
    return images


def calibrate_artifact(
    model_uri: str,
    data_root: str,
    out_uri: str,
    policy: ThresholdConfig,
    split: str = "test",
    n_bootstrap: int = 1000,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Choose the site threshold on ``split`` of ``data_root`` and write the calibrated artifact to ``out_uri``.

    The new artifact holds the same ``model.keras`` plus ``evaluation/site/`` (see :func:`site_record`).
    Returns its ``site_calibration`` record. An artifact that was calibrated before is calibrated
    afresh from its model's own probabilities.
    """
    artifact = load_artifact(model_uri)
    artifact.meta = {key: value for key, value in artifact.meta.items() if key != SITE_KEY}
    images = site_sample(artifact, data_root, split, policy)
    raw = artifact.predict_proba(images.images)
    platt = platt_record(images.labels, raw, images.rows["patient_id"].to_numpy()) if recalibrate else None
    probs = raw if platt is None else platt_scale(raw, platt["a"], platt["b"])
    record = site_record(
        images, probs, raw, float(artifact.meta["threshold"]), policy, out_uri, (data_root, split),
        f"{artifact.name} — site sample, site threshold", n_bootstrap,
    )  # fmt: skip
    record.update({"platt": platt} if platt else {})
    record["source"] = {"uri": str(model_uri), "name": artifact.name, "version": artifact.version}
    derive_artifact(artifact, {**artifact.meta, SITE_KEY: record}, out_uri)
    return record
