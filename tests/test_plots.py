"""Every plot writes a readable, non-empty PNG and leaves no pyplot figures behind."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from pneumonet.evaluation import plots
from pneumonet.evaluation.metrics import compute_metrics


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.7).astype(int)
    probs = 1.0 / (1.0 + np.exp(-(rng.normal(size=200) + 2.0 * (labels - 0.5) * 2)))
    return labels, probs


def _check_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_side and image.height >= min_side
        image.load()


def test_each_plot_writes_a_png(tmp_path: Path, scores) -> None:
    labels, probs = scores
    metrics = compute_metrics(labels, probs, 0.5, n_bootstrap=50)
    other = compute_metrics(labels, np.clip(probs * 0.8 + 0.1, 0, 1), 0.4, n_bootstrap=0)
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.7, 0.6, 0.5], "accuracy": [0.6, 0.7, 0.8], "val_auc": [0.7, 0.8, 0.9]}
    before = plt.get_fignums()
    written = [
        plots.plot_confusion_matrix(metrics["confusion_matrix"], tmp_path / "cm.png", title="custom"),
        plots.plot_roc(labels, probs, tmp_path / "roc.png", threshold=0.5, title="custom"),
        plots.plot_pr(labels, probs, tmp_path / "pr.png", threshold=0.5),
        plots.plot_calibration(labels, probs, tmp_path / "calibration.png", n_bins=8),
        plots.plot_training_curves(history, tmp_path / "sub" / "curves.png", title="transfer"),
        plots.plot_comparison(
            {"custom": metrics, "transfer": other, "finetune": {"accuracy": 0.9, "roc_auc": None}}, tmp_path / "cmp.png"
        ),
        plots.plot_roc_overlay({"custom": (labels, probs), "transfer": (labels, probs**2)}, tmp_path / "overlay.png"),
    ]
    for path in written:
        _check_png(Path(path))
    assert plt.get_fignums() == before


def test_single_class_and_missing_history_still_plot(tmp_path: Path) -> None:
    labels, probs = np.zeros(5, dtype=int), np.linspace(0.1, 0.9, 5)
    _check_png(plots.plot_roc(labels, probs, tmp_path / "roc.png", threshold=0.5))
    _check_png(plots.plot_pr(labels, probs, tmp_path / "pr.png", threshold=0.5))
    _check_png(plots.plot_calibration(labels, probs, tmp_path / "cal.png"))
    _check_png(plots.plot_training_curves({}, tmp_path / "empty.png"))
    _check_png(plots.plot_training_curves({"val_loss": [1.0, 0.8]}, tmp_path / "val_only.png"))


def test_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2x2"):
        plots.plot_confusion_matrix([[1, 2, 3]], tmp_path / "cm.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.plot_roc([0, 1], [0.5, 3.0], tmp_path / "roc.png")
    with pytest.raises(ValueError, match="only one class"):
        plots.plot_roc_overlay({"x": ([1, 1], [0.2, 0.3])}, tmp_path / "o.png")
    assert not list(tmp_path.iterdir())
