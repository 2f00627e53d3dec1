"""Metrics, thresholds and the evaluation report against hand-computed values and scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pneumonet import storage
from pneumonet.config import ThresholdConfig
from pneumonet.errors import DataError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.metrics import bootstrap_ci, choose_threshold, compute_metrics

# 10 items at threshold 0.5: TP = 4 (0.9, 0.8, 0.7, 0.6), FN = 1 (0.4), TN = 3 (0.1, 0.2, 0.3), FP = 2 (0.55, 0.65).
Y_TRUE = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
Y_PROB = [0.9, 0.8, 0.7, 0.6, 0.4, 0.1, 0.2, 0.3, 0.55, 0.65]


def _separable_scores(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping but informative scores, positives shifted up; 1:3 normal:pneumonia like the dataset."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.75).astype(int)
    probs = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.8 * (labels - 0.5) * 2)))
    return labels, probs


def test_hand_computed_example_matches_sklearn() -> None:
    m = compute_metrics(Y_TRUE, Y_PROB, 0.5, n_bootstrap=0)
    assert m["confusion_matrix"] == [[3, 2], [1, 4]]
    assert (m["n"], m["n_positive"], m["n_negative"]) == (10, 5, 5)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    # 25 positive/negative pairs; the positive 0.4 loses to 0.55 and 0.65, and 0.6 loses to 0.65: 22/25.
    assert m["roc_auc"] == pytest.approx(22 / 25)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y_TRUE, Y_PROB))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y_TRUE, Y_PROB))
    assert m["brier"] == pytest.approx(np.mean((np.array(Y_PROB) - np.array(Y_TRUE)) ** 2))
    report = m["classification_report"]
    assert report["PNEUMONIA"]["recall"] == pytest.approx(0.8)
    assert report["NORMAL"]["support"] == 5
    assert m["threshold"] == 0.5 and m["ci95"]["accuracy"] is None


def test_decision_rule_is_greater_or_equal() -> None:
    m = compute_metrics([1, 0], [0.5, 0.49], 0.5, n_bootstrap=0)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_json_serialisable_and_plain_types() -> None:
    labels, probs = _separable_scores(1)
    subtypes = np.where(labels == 0, "normal", np.where(np.arange(len(labels)) % 2, "bacteria", "virus"))
    m = compute_metrics(labels, probs.astype(np.float32), 0.5, subtypes=list(subtypes), n_bootstrap=50)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert type(m["n"]) is int and type(m["accuracy"]) is float
    assert type(m["confusion_matrix"][0][0]) is int


def test_per_subtype() -> None:
    subtypes = ["bacteria", "bacteria", "virus", "virus", "virus", "normal", "normal", "normal", "normal", "normal"]
    per = compute_metrics(Y_TRUE, Y_PROB, 0.5, subtypes=subtypes, n_bootstrap=0)["per_subtype"]
    assert set(per) == {"bacteria", "virus", "normal"}
    assert per["bacteria"] == {"n": 2, "accuracy": 1.0, "sensitivity": 1.0}
    assert per["virus"]["n"] == 3 and per["virus"]["sensitivity"] == pytest.approx(2 / 3)
    assert per["normal"]["specificity"] == pytest.approx(3 / 5) and "sensitivity" not in per["normal"]
    with pytest.raises(ValueError, match="subtypes"):
        compute_metrics(Y_TRUE, Y_PROB, 0.5, subtypes=subtypes[:3], n_bootstrap=0)


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    labels, probs = _separable_scores(2)
    first = compute_metrics(labels, probs, 0.5, n_bootstrap=300, seed=3)
    again = compute_metrics(labels, probs, 0.5, n_bootstrap=300, seed=3)
    other = compute_metrics(labels, probs, 0.5, n_bootstrap=300, seed=4)
    assert first["ci95"] == again["ci95"]
    assert first["ci95"] != other["ci95"]
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        lo, hi = first["ci95"][key]
        assert 0.0 <= lo < first[key] < hi <= 1.0, key
        assert hi - lo < 0.25, key


def test_bootstrap_auc_matches_sklearn_on_each_resample() -> None:
    """The vectorised Mann-Whitney AUC equals roc_auc_score on the very same resamples, ties included.

    Replays bootstrap_ci's draws: multinomial multiplicities for the positives, then the negatives.
    """
    labels, probs = _separable_scores(5, n=60)
    probs = np.round(probs, 1)  # many ties
    pos, neg = probs[labels == 1], probs[labels == 0]
    rng = np.random.default_rng(11)
    w_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=20)
    w_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=20)
    aucs = [
        skm.roc_auc_score(
            np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[np.repeat(pos, w_pos[row]), np.repeat(neg, w_neg[row])]
        )
        for row in range(20)
    ]
    assert bootstrap_ci(labels, probs, 0.5, 20, 11)["roc_auc"] == pytest.approx(list(np.percentile(aucs, [2.5, 97.5])))


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_images() -> None:
    """(Its speed is not a test: 1,000 draws over 5,000 images take well under a second.)"""
    widths = []
    for n in (200, 5000):
        labels, probs = _separable_scores(3, n=n)
        metrics = compute_metrics(labels, probs, 0.5, n_bootstrap=1000)
        low, high = metrics["ci95"]["roc_auc"]
        assert low <= metrics["roc_auc"] <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 25 times the images, a fifth of the width


def test_single_class_gives_none_and_warning() -> None:
    m = compute_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5, n_bootstrap=100)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["specificity"] is None  # no NORMAL images
    assert m["npv"] == 0.0  # the one image called NORMAL is a PNEUMONIA
    assert m["ci95"]["roc_auc"] is None and m["ci95"]["specificity"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert "PNEUMONIA" in m["warning"]
    json.dumps(m, allow_nan=False)
    assert "warning" not in compute_metrics(Y_TRUE, Y_PROB, 0.5, n_bootstrap=0)


@pytest.mark.parametrize(
    ("y_true", "y_prob", "match"),
    [
        ([0, 1], [0.2, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.2, -0.1], r"\[0, 1\]"),
        ([0, 1], [0.2, float("nan")], "NaN"),
        ([0, 1, 1], [0.2, 0.3], "3 items"),
        ([0, 2], [0.2, 0.3], "only 0"),
        ([], [], "zero"),
    ],
)
def test_invalid_inputs(y_true, y_prob, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, y_prob, 0.5, n_bootstrap=0)
    with pytest.raises(ValueError, match=match):
        choose_threshold(y_true, y_prob, ThresholdConfig(policy="youden"))


def test_invalid_threshold() -> None:
    for bad in (float("nan"), 1.5, -0.1, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            compute_metrics(Y_TRUE, Y_PROB, bad, n_bootstrap=0)


def _sens_spec(labels: np.ndarray, probs: np.ndarray, t: float) -> tuple[float, float]:
    pred = probs >= t
    return float(pred[labels == 1].mean()), float((~pred)[labels == 0].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_sensitivity_is_highest_threshold_meeting_the_floor(seed: int) -> None:
    labels, probs = _separable_scores(seed)
    cfg = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.9)
    t = choose_threshold(labels, probs, cfg)
    assert 0.0 < t < 1.0
    sens, _ = _sens_spec(labels, probs, t)
    assert sens >= 0.9
    # Any higher threshold that changes a decision (the next distinct score above t) misses the floor.
    admitted = np.unique(probs[probs >= t])
    assert len(admitted) > 1
    assert _sens_spec(labels, probs, float(admitted[1]))[0] < 0.9
    # Robust: t lies strictly between two distinct scores, not on one.
    assert not np.isclose(probs, t, rtol=0, atol=1e-12).any()


def test_min_sensitivity_on_hand_example() -> None:
    # Positives 0.9 0.8 0.7 0.6 0.4; sensitivity >= 0.8 first reached when 0.6 is admitted (tpr 4/5).
    t = choose_threshold(Y_TRUE, Y_PROB, ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.8))
    assert t == pytest.approx((0.6 + 0.55) / 2)
    t = choose_threshold(Y_TRUE, Y_PROB, ThresholdConfig(policy="min_sensitivity", min_sensitivity=1.0))
    assert t == pytest.approx((0.4 + 0.3) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_matches_brute_force(seed: int) -> None:
    labels, probs = _separable_scores(seed)
    t = choose_threshold(labels, probs, ThresholdConfig(policy="youden"))
    assert 0.0 < t < 1.0
    best = max(sum(_sens_spec(labels, probs, c)) - 1 for c in np.unique(probs))
    assert sum(_sens_spec(labels, probs, t)) - 1 == pytest.approx(best)


def test_fixed_policy_and_extreme_scores() -> None:
    assert choose_threshold(Y_TRUE, Y_PROB, ThresholdConfig(policy="fixed", fixed=0.3)) == 0.3
    # Scores at exactly 0 and 1 still give a finite threshold strictly inside (0, 1).
    t = choose_threshold([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], ThresholdConfig(policy="youden"))
    assert t == pytest.approx(0.5)
    t = choose_threshold([0, 1, 1], [0.0, 0.0, 1.0], ThresholdConfig(policy="min_sensitivity", min_sensitivity=1.0))
    assert 0.0 < t < 1.0 and math.isfinite(t)


def test_single_class_validation_set_is_a_data_error() -> None:
    with pytest.raises(DataError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], ThresholdConfig(policy="youden"))
    with pytest.raises(DataError, match="NORMAL"):
        choose_threshold([0, 0], [0.2, 0.5], ThresholdConfig(policy="min_sensitivity"))


def _check_report(metrics: dict, files: dict[str, bytes]) -> None:
    assert set(files) == {"metrics.json", "confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png"}
    assert json.loads(files["metrics.json"]) == metrics
    assert sorted(metrics["plots"]) == sorted(name for name in files if name.endswith(".png"))
    for name in metrics["plots"]:
        assert files[name].startswith(b"\x89PNG\r\n\x1a\n")


def test_evaluate_predictions_local(tmp_path) -> None:
    out = tmp_path / "report" / "test"
    subtypes = ["virus"] * 5 + ["normal"] * 5
    metrics = evaluate_predictions(Y_TRUE, Y_PROB, 0.5, str(out), subtypes=subtypes, title="custom", n_bootstrap=50)
    assert metrics["confusion_matrix"] == [[3, 2], [1, 4]] and metrics["per_subtype"]["virus"]["n"] == 5
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    _check_report(metrics, files)
    with Image.open(out / "roc_curve.png") as image:
        assert image.width > 300 and image.height > 300


def test_evaluate_predictions_s3(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/runs/r1/eval/test"
    metrics = evaluate_predictions(Y_TRUE, Y_PROB, 0.5, prefix, n_bootstrap=20)
    files = {entry.uri.rsplit("/", 1)[-1]: storage.read_bytes(entry.uri) for entry in storage.list_files(prefix)}
    _check_report(metrics, files)


def test_evaluate_predictions_single_class(tmp_path) -> None:
    metrics = evaluate_predictions([0, 0, 0], [0.1, 0.6, 0.2], 0.5, str(tmp_path), n_bootstrap=10)
    assert metrics["roc_auc"] is None and "warning" in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["roc_auc"] is None
    assert len(metrics["plots"]) == 4


def test_patient_bootstrap_resamples_whole_patients() -> None:
    """Grouped draws: each resample picks patients with replacement and keeps all of a patient's images."""
    labels, probs = _separable_scores(8, n=40)
    groups = np.repeat(np.arange(20), 2)
    labels = labels[groups * 2]  # both images of a patient share the label
    rng = np.random.default_rng(5)
    _, member = np.unique(groups, return_inverse=True)
    weights = rng.multinomial(20, np.full(20, 1 / 20), size=30)[:, member]
    aucs = []
    for row in weights:
        y, p = np.repeat(labels, row), np.repeat(probs, row)
        aucs.append(skm.roc_auc_score(y, p) if 0 < y.sum() < len(y) else np.nan)
    aucs = np.array(aucs)
    expected = list(np.percentile(aucs[np.isfinite(aucs)], [2.5, 97.5]))
    assert bootstrap_ci(labels, probs, 0.5, 30, 5, groups=groups)["roc_auc"] == pytest.approx(expected)


def test_patient_bootstrap_is_wider_when_images_repeat_a_patient() -> None:
    """Ten copies of each patient's image are one observation, not ten: the grouped interval must say so."""
    labels, probs = _separable_scores(9, n=40)
    labels, probs, groups = np.repeat(labels, 10), np.repeat(probs, 10), np.repeat(np.arange(40), 10)
    by_image = compute_metrics(labels, probs, 0.5, n_bootstrap=400)["ci95"]["accuracy"]
    by_patient = compute_metrics(labels, probs, 0.5, n_bootstrap=400, groups=groups)
    assert by_patient["ci95_grouped_by"] == "patient"
    width = by_patient["ci95"]["accuracy"][1] - by_patient["ci95"]["accuracy"][0]
    assert width > 2 * (by_image[1] - by_image[0])
