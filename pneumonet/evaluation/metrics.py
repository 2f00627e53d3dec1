"""Classification metrics and the decision threshold, with scikit-learn doing the arithmetic.

Conventions used everywhere: label 1 is PNEUMONIA (positive), 0 is NORMAL, and an image is
called positive when ``prob >= threshold`` (scikit-learn's ``roc_curve`` convention). Every
returned value is a plain Python type so the dict can go straight into ``json.dumps`` and W&B;
metrics that are undefined on the given data (e.g. ROC-AUC with one class) are ``None``,
never NaN, because JSON has no NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pneumonet.config import ThresholdConfig
from pneumonet.errors import DataError

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
CI_LEVEL = 95.0
CI_KEYS = ("accuracy", "roc_auc", "sensitivity", "specificity")


def check_inputs(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities; returns ``(int64 labels, float64 probabilities)``.

    Bad inputs here are programming errors upstream (a model that does not end in a sigmoid, a
    misaligned label array), hence ``ValueError`` rather than a user-facing error.
    """
    labels = np.asarray(y_true)
    probs = np.asarray(y_prob, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 1:
        raise ValueError(f"y_true and y_prob must be 1-D, got shapes {labels.shape} and {probs.shape}")
    if len(labels) != len(probs):
        raise ValueError(f"y_true has {len(labels)} items but y_prob has {len(probs)}")
    if len(labels) == 0:
        raise ValueError("cannot evaluate zero predictions")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 (NORMAL) and 1 (PNEUMONIA), got {sorted(set(labels.tolist()))[:10]}")
    if not np.isfinite(probs).all():
        raise ValueError(f"y_prob holds {int((~np.isfinite(probs)).sum())} NaN or infinite values")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(f"y_prob must be probabilities in [0, 1], got range [{probs.min():g}, {probs.max():g}]")
    return labels.astype(np.int64), probs


def choose_threshold(y_true: Any, y_prob: Any, cfg: ThresholdConfig) -> float:
    """The decision threshold, chosen on VALIDATION predictions (choosing it on test data leaks).

    "youden" maximises sensitivity + specificity - 1; "min_sensitivity" takes the highest
    threshold whose sensitivity is at least ``cfg.min_sensitivity`` (the best specificity under
    that floor); "fixed" returns ``cfg.fixed`` and needs no data. A data-driven threshold is the
    midpoint between the score it admits and the next lower distinct score: it classifies the
    validation set exactly like the score itself but leaves a margin for unseen images.
    """
    if cfg.policy == "fixed":
        return float(cfg.fixed)
    labels, probs = check_inputs(y_true, y_prob)
    if len(np.unique(labels)) < 2:
        only = CLASS_NAMES[int(labels[0])]
        raise DataError(
            f"cannot choose a {cfg.policy!r} threshold: the validation predictions hold only {only} images "
            f"({len(labels)}); a threshold trades sensitivity against specificity and needs both classes"
        )
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    # Index 0 is sklearn's "+inf" (nothing positive), not a usable threshold.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if cfg.policy == "youden":
        index = int(np.argmax(tpr - fpr))
    else:
        # thresholds descend and tpr ascends: the first index that meets the floor is the highest threshold.
        index = int(np.argmax(tpr >= cfg.min_sensitivity - 1e-12))
    upper = float(thresholds[index])
    lower = float(thresholds[index + 1]) if index + 1 < len(thresholds) else 0.0
    threshold = lower + (upper - lower) / 2.0
    if not lower < threshold <= upper:  # adjacent floats: no room for a midpoint
        threshold = upper
    return float(min(max(threshold, np.finfo(np.float64).tiny), np.nextafter(1.0, 0.0)))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, NaN -> None (recursively), so the result is JSON-ready."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def _ratio_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV, F1; a zero denominator gives NaN (later None)."""
    kw: dict[str, Any] = {"labels": [0, 1], "zero_division": np.nan}
    return {
        "sensitivity": recall_score(labels, preds, pos_label=1, **kw),
        "specificity": recall_score(labels, preds, pos_label=0, **kw),
        "precision": precision_score(labels, preds, pos_label=1, **kw),
        "npv": precision_score(labels, preds, pos_label=0, **kw),
        "f1": f1_score(labels, preds, pos_label=1, **kw),
    }


def _per_subtype(labels: np.ndarray, preds: np.ndarray, subtypes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """How each subtype fares: sensitivity where it holds pneumonia, specificity where it holds normals."""
    groups = np.asarray(subtypes, dtype=object)
    if groups.shape != labels.shape:
        raise ValueError(f"subtypes has {len(groups)} items but y_true has {len(labels)}")
    correct = labels == preds
    result: dict[str, dict[str, Any]] = {}
    for name in sorted({str(item) for item in groups}):
        mask = groups.astype(str) == name
        entry: dict[str, Any] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}
        positives, negatives = mask & (labels == 1), mask & (labels == 0)
        if positives.any():
            entry["sensitivity"] = float(correct[positives].mean())
        if negatives.any():
            entry["specificity"] = float(correct[negatives].mean())
        result[name] = entry
    return result


def _percentiles(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = (100.0 - CI_LEVEL) / 2.0
    return [float(v) for v in np.percentile(values, [tail, 100.0 - tail])]


def _weighted_stats(
    pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, threshold: float
) -> np.ndarray:
    """(rows, 4) accuracy, ROC-AUC, sensitivity, specificity of resamples given as multiplicities (NaN: undefined).

    Row ``i`` of ``w_pos``/``w_neg`` says how often each positive/negative occurs in resample ``i``; the
    AUC of all rows at once is the Mann-Whitney statistic computed from cumulative negative counts.
    """
    rows = len(w_pos)
    n_pos, n_neg = w_pos.sum(axis=1).astype(float), w_neg.sum(axis=1).astype(float)
    tp = w_pos @ (pos >= threshold)
    tn = w_neg @ (neg < threshold)
    auc = np.full(rows, np.nan)
    if len(pos) and len(neg):
        order = np.argsort(neg, kind="stable")
        sorted_neg = neg[order]
        cum = np.zeros((rows, len(neg) + 1), dtype=np.int64)
        np.cumsum(w_neg[:, order], axis=1, out=cum[:, 1:])
        below = np.searchsorted(sorted_neg, pos, side="left")
        upto = np.searchsorted(sorted_neg, pos, side="right")
        wins = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])  # negatives each positive beats (ties: half)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.einsum("ij,ij->i", w_pos, wins) / (n_pos * n_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.column_stack([(tp + tn) / (n_pos + n_neg), auc, tp / n_pos, tn / n_neg])


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, list[float] | None]:
    """Percentile-bootstrap 95% intervals for accuracy, ROC-AUC, sensitivity, specificity.

    Without ``groups``: stratified (positives and negatives resampled separately, counts kept), so
    every resample holds both classes whenever the data does. With ``groups`` (patient ids): whole
    patients are resampled, because the images of one child are not independent and treating them
    as such makes the intervals too narrow; a resample that misses a class leaves that figure out.
    A resample is a row of multiplicities; resamples are drawn in chunks of about 4 million cells,
    so memory stays ~100 MB at any size.
    """
    rng = np.random.default_rng(seed)
    positive = labels == 1
    pos, neg = probs[positive], probs[~positive]
    if groups is not None:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = int(member.max()) + 1

    def draw(rows: int) -> tuple[np.ndarray, np.ndarray]:
        if groups is not None:
            per_image = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=rows)[:, member]
            return per_image[:, positive], per_image[:, ~positive]
        return tuple(  # type: ignore[return-value]
            rng.multinomial(n, np.full(n, 1.0 / n), size=rows) if n else np.zeros((rows, 0), dtype=np.int64)
            for n in (len(pos), len(neg))
        )

    chunk = max(1, 4_000_000 // len(labels))
    stats = np.concatenate(
        [
            _weighted_stats(pos, neg, *draw(min(chunk, n_bootstrap - start)), threshold)
            for start in range(0, n_bootstrap, chunk)
        ]
    )
    return {key: _percentiles(stats[:, column]) for column, key in enumerate(CI_KEYS)}


def compute_metrics(
    y_true: Any,
    y_prob: Any,
    threshold: float,
    subtypes: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every number a report needs for one set of predictions at one threshold (JSON-ready).

    ``subtypes`` (e.g. normal/bacteria/virus, aligned with ``y_true``) adds a per-subtype
    breakdown; ``n_bootstrap=0`` skips the confidence intervals (``ci95`` values are None);
    ``groups`` (patient ids) makes them patient-grouped (``ci95_grouped_by``: "patient").
    """
    labels, probs = check_inputs(y_true, y_prob)
    if not (isinstance(threshold, (int, float, np.number)) and 0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    threshold = float(threshold)
    preds = (probs >= threshold).astype(np.int64)
    n_positive = int(labels.sum())
    both_classes = 0 < n_positive < len(labels)
    (tn, fp), (fn, tp) = confusion_matrix(labels, preds, labels=[0, 1]).tolist()
    report = classification_report(
        labels, preds, labels=[0, 1], target_names=list(CLASS_NAMES), output_dict=True, zero_division=0
    )
    result: dict[str, Any] = {
        "n": len(labels),
        "n_positive": n_positive,
        "n_negative": len(labels) - n_positive,
        "threshold": threshold,
        "accuracy": accuracy_score(labels, preds),
        "roc_auc": roc_auc_score(labels, probs) if both_classes else None,
        "pr_auc": average_precision_score(labels, probs) if both_classes else None,
        **_ratio_metrics(labels, preds),
        "brier": brier_score_loss(labels, probs, labels=[0, 1]),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "classification_report": report,
        "per_subtype": _per_subtype(labels, preds, subtypes) if subtypes is not None else {},
        "ci95": (
            bootstrap_ci(labels, probs, threshold, n_bootstrap, seed, None if groups is None else np.asarray(groups))
            if n_bootstrap
            else dict.fromkeys(CI_KEYS)
        ),
        "n_bootstrap": n_bootstrap,
        "ci95_grouped_by": "image" if groups is None else "patient",
    }
    if not both_classes:
        only = CLASS_NAMES[int(labels[0])]
        result["warning"] = (
            f"only {only} images ({len(labels)}): ROC-AUC, PR-AUC and the metrics of the missing class are undefined"
        )
    return _plain(result)


def format_metric(value: float | None) -> str:
    """Three decimals, or a dash for a metric that is undefined (e.g. ROC-AUC with one class)."""
    return "–" if value is None else f"{value:.3f}"


def headline(metrics: dict[str, Any]) -> str:
    """One line of the figures a clinician reads first."""
    return (
        f"accuracy {format_metric(metrics['accuracy'])}  ROC-AUC {format_metric(metrics['roc_auc'])}  "
        f"sensitivity {format_metric(metrics['sensitivity'])}  specificity {format_metric(metrics['specificity'])}"
    )
