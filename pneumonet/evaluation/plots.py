"""PNG plots for evaluation reports.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg renderer, never
through pyplot: nothing is registered in pyplot's global figure list (no leaks in long-running
services, nothing to close), no display is needed, and the process-wide backend is untouched.
Each function writes one PNG to a local path and returns that path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

from pneumonet.evaluation.metrics import CLASS_NAMES, check_inputs

DPI = 110
COMPARED = ("accuracy", "roc_auc", "sensitivity", "specificity")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _titled(title: str, what: str) -> str:
    return f"{title} — {what}" if title else what


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, sensitivity, precision) at ``prob >= threshold``; NaN where undefined."""
    preds = probs >= threshold
    fpr = preds[labels == 0].mean() if (labels == 0).any() else np.nan
    tpr = preds[labels == 1].mean() if (labels == 1).any() else np.nan
    ppv = labels[preds].mean() if preds.any() else np.nan
    return float(fpr), float(tpr), float(ppv)


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, path: str | Path, title: str = "") -> Path:
    """2x2 matrix ``[[tn, fp], [fn, tp]]``: counts and row-normalised percentages (per true class).

    Drawn here, not by ``sklearn.metrics.ConfusionMatrixDisplay``: that writes one number per cell, and
    a reader needs both the count and the share of its true class.
    """
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2 [[tn, fp], [fn, tp]], got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    for row in range(2):
        for col in range(2):
            ax.text(
                col,
                row,
                f"{counts[row, col]}\n({100 * share[row, col]:.1f}%)",
                ha="center",
                va="center",
                fontsize=12,
                color="white" if share[row, col] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], [f"pred. {name}" for name in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {name}" for name in CLASS_NAMES], rotation=90, va="center")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(_titled(title, "confusion matrix"))
    fig.tight_layout()
    return _save(fig, path)


def _unit_axes(ax: Axes, xlabel: str, ylabel: str, legend: str) -> None:
    """Both axes on [0, 1] (a little margin), labelled, gridded, with the legend at ``legend``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=9)


def _curve_figure(title: str, what: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    ax.set_title(_titled(title, what))
    return fig, ax


_CHANCE = {"ls": "--", "color": "0.6"}
_ROC_AXES = ("False positive rate (1 − specificity)", "True positive rate (sensitivity)", "lower right")


def plot_roc(y_true: Any, y_prob: Any, path: str | Path, threshold: float | None = None, title: str = "") -> Path:
    """ROC curve with its AUC, the chance diagonal and the operating point at ``threshold``."""
    labels, probs = check_inputs(y_true, y_prob)
    fig, ax = _curve_figure(title, "ROC curve")
    if len(np.unique(labels)) < 2:
        _no_data(ax, "ROC curve undefined:\nonly one class present")
        return _save(fig, path)
    RocCurveDisplay.from_predictions(labels, probs, name="ROC", ax=ax, curve_kwargs={"lw": 2},
                                     plot_chance_level=True, chance_level_kw=_CHANCE)  # fmt: skip
    if threshold is not None:
        op_fpr, op_tpr, _ = _operating_point(labels, probs, threshold)
        ax.plot(
            op_fpr, op_tpr, "o", ms=9, color="crimson",
            label=f"threshold {threshold:.3f}: sens {op_tpr:.2f}, spec {1 - op_fpr:.2f}",
        )  # fmt: skip
    _unit_axes(ax, *_ROC_AXES)
    fig.tight_layout()
    return _save(fig, path)


def plot_pr(y_true: Any, y_prob: Any, path: str | Path, threshold: float | None = None, title: str = "") -> Path:
    """Precision-recall curve with average precision, the prevalence baseline and the operating point."""
    labels, probs = check_inputs(y_true, y_prob)
    fig, ax = _curve_figure(title, "precision-recall curve")
    if len(np.unique(labels)) < 2:
        _no_data(ax, "PR curve undefined:\nonly one class present")
        return _save(fig, path)
    prevalence = float(labels.mean())
    PrecisionRecallDisplay.from_predictions(labels, probs, name="PR", ax=ax, curve_kwargs={"lw": 2}, plot_chance_level=True,
                                            chance_level_kw={**_CHANCE, "label": f"prevalence {prevalence:.2f}"})  # fmt: skip
    if threshold is not None:
        _, op_recall, op_precision = _operating_point(labels, probs, threshold)
        if np.isfinite(op_precision):
            ax.plot(
                op_recall, op_precision, "o", ms=9, color="crimson",
                label=f"threshold {threshold:.3f}: recall {op_recall:.2f}, precision {op_precision:.2f}",
            )  # fmt: skip
    _unit_axes(ax, "Recall (sensitivity)", "Precision (PPV)", "lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(y_true: Any, y_prob: Any, path: str | Path, n_bins: int = 10, title: str = "") -> Path:
    """Reliability diagram (observed vs predicted PNEUMONIA rate) over a histogram of the scores per class."""
    labels, probs = check_inputs(y_true, y_prob)
    fig = Figure(figsize=(5.2, 6.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    CalibrationDisplay.from_predictions(labels, probs, n_bins=n_bins, strategy="uniform", pos_label=1, name="model",
                                        ax=top, ref_line=True, marker="o", lw=2)  # fmt: skip
    top.set_xlabel("")
    top.set_ylabel("Observed PNEUMONIA fraction")
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    top.set_title(_titled(title, "calibration"))
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    for label, name, color in ((0, CLASS_NAMES[0], "tab:blue"), (1, CLASS_NAMES[1], "tab:orange")):
        scores = probs[labels == label]
        bottom.hist(scores, bins=bins, alpha=0.6, color=color, label=f"{name} ({len(scores)})")
    bottom.set_xlabel("Predicted PNEUMONIA probability")
    bottom.set_ylabel("Images")
    bottom.set_xlim(0.0, 1.0)
    bottom.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


_PANELS = (
    ("Loss", ("loss",)),
    ("Accuracy", ("accuracy", "binary_accuracy", "acc")),
    ("ROC-AUC", ("roc_auc", "auc")),
)


def _series_key(history: Mapping[str, Sequence[float]], names: Sequence[str]) -> str | None:
    """The first training-series key among ``names`` found in ``history`` (or with a "val_" twin only)."""
    for name in names:
        if name in history or f"val_{name}" in history:
            return name
    return None


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and ROC-AUC per epoch, train vs validation; absent series leave a labelled empty panel."""
    fig = Figure(figsize=(13.0, 4.0))
    axes = fig.subplots(1, len(_PANELS))
    for ax, (label, names) in zip(axes, _PANELS, strict=True):
        ax.set_title(label)
        key = _series_key(history, names)
        drawn = False
        for series, style, legend in ((key, "-o", "train"), (f"val_{key}", "--s", "validation")):
            values = list(history.get(series, [])) if key else []
            if values:
                ax.plot(range(1, len(values) + 1), values, style, ms=3, lw=1.6, label=legend)
                drawn = True
        if not drawn:
            _no_data(ax, f"no {label} recorded")
            continue
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(_titled(title, "training curves"))
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars of accuracy, ROC-AUC, sensitivity and specificity per variant, with 95% CIs when present."""
    if not results:
        raise ValueError("plot_comparison needs at least one result")
    fig = Figure(figsize=(max(6.5, 2.2 * len(results) + 3.0), 4.6))
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    centers = np.arange(len(COMPARED))
    for offset, (name, metrics) in enumerate(results.items()):
        xs = centers - 0.4 + width * (offset + 0.5)
        values = [metrics.get(key) for key in COMPARED]
        heights = [np.nan if value is None else float(value) for value in values]
        ci = metrics.get("ci95") or {}
        errors = np.array(
            [
                [h - ci[key][0], ci[key][1] - h] if ci.get(key) and np.isfinite(h) else [np.nan, np.nan]
                for key, h in zip(COMPARED, heights, strict=True)
            ]
        ).T.clip(min=0.0)
        bars = ax.bar(xs, np.nan_to_num(heights), width, yerr=errors, capsize=3, label=name)
        for bar, height in zip(bars, heights, strict=True):
            missing = np.isnan(height)
            ax.text(
                bar.get_x() + bar.get_width() / 2, 0.02, "n/a" if missing else f"{height:.3f}",
                ha="center", va="bottom", fontsize=8, rotation=90,
                color="black" if missing or height < 0.2 else "white",
            )  # fmt: skip
    ax.set_xticks(centers, ["Accuracy", "ROC-AUC", "Sensitivity", "Specificity"])
    ax.set_ylabel("Score (test set)")
    ax.set_ylim(0.0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="variant")
    ax.set_title(_titled(title, "variant comparison (bars: 95% CI)"))
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_overlay(curves: Mapping[str, tuple[Any, Any]], path: str | Path, title: str = "") -> Path:
    """Several ROC curves on one axis (e.g. the three variants on the test set), AUC in the legend."""
    if not curves:
        raise ValueError("plot_roc_overlay needs at least one curve")
    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.add_subplot()
    for index, (name, (y_true, y_prob)) in enumerate(curves.items()):
        labels, probs = check_inputs(y_true, y_prob)
        if len(np.unique(labels)) < 2:
            raise ValueError(f"ROC curve of {name!r} is undefined: only one class present")
        RocCurveDisplay.from_predictions(labels, probs, name=name, ax=ax, curve_kwargs={"lw": 2},
                                         plot_chance_level=index == len(curves) - 1, chance_level_kw=_CHANCE)  # fmt: skip
    _unit_axes(ax, *_ROC_AXES)
    ax.set_title(_titled(title, "ROC curves"))
    fig.tight_layout()
    return _save(fig, path)
