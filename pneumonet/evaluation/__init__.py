"""Evaluation of a set of predictions: metrics plus the standard plots, written to a folder or S3 prefix."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumonet import storage
from pneumonet.evaluation.metrics import choose_threshold, compute_metrics
from pneumonet.evaluation.plots import plot_calibration, plot_confusion_matrix, plot_pr, plot_roc

__all__ = ["choose_threshold", "compute_metrics", "evaluate_predictions"]

METRICS_FILE = "metrics.json"


def evaluate_predictions(
    y_true: Any,
    y_prob: Any,
    threshold: float,
    out_uri: str,
    subtypes: Sequence[str] | None = None,
    title: str = "",
    n_bootstrap: int = 1000,
    groups: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute metrics at ``threshold`` and write ``metrics.json`` and four PNG plots under ``out_uri``.

    Files are rendered into a temporary folder and then copied with :func:`storage.upload_dir`,
    so a local folder and an ``s3://`` prefix behave the same and local files appear atomically.
    Returns the metrics with ``"plots"``: the names of the PNG files written. ``groups`` (patient
    ids) makes the intervals patient-grouped; ``extra`` keys are added to ``metrics.json``.
    """
    metrics = compute_metrics(y_true, y_prob, threshold, subtypes=subtypes, n_bootstrap=n_bootstrap, groups=groups)
    metrics.update(extra or {})
    with tempfile.TemporaryDirectory(prefix="pneumonet-eval-") as tmp:
        folder = Path(tmp)
        written = [
            plot_confusion_matrix(metrics["confusion_matrix"], folder / "confusion_matrix.png", title=title),
            plot_roc(y_true, y_prob, folder / "roc_curve.png", threshold=threshold, title=title),
            plot_pr(y_true, y_prob, folder / "pr_curve.png", threshold=threshold, title=title),
            plot_calibration(y_true, y_prob, folder / "calibration.png", title=title),
        ]
        metrics["plots"] = [path.name for path in written]
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        storage.upload_dir(folder, out_uri)
    return metrics
