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
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from pneumonet import storage
from pneumonet.artifact import derive_artifact, load_artifact
from pneumonet.artifact_meta import SITE_KEY
from pneumonet.config import ThresholdConfig
from pneumonet.data.catalog import manifest_digest
from pneumonet.errors import ConfigError, DataError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.evaluation.metrics import choose_threshold, compute_metrics
from pneumonet.evaluation.run import decode_split, write_predictions

MIN_NEGATIVES = 20
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


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def calibrate_artifact(
    model_uri: str, data_root: str, out_uri: str, policy: ThresholdConfig, split: str = "test", n_bootstrap: int = 1000
) -> dict[str, Any]:
    """Choose the site threshold on ``split`` of ``data_root`` and write the calibrated artifact to ``out_uri``.

    Also writes ``evaluation/site/`` (metrics at the site threshold, plots) and ``predictions.csv``
    into the new artifact. Returns its ``site_calibration`` record.
    """
    artifact = load_artifact(model_uri)
    images = decode_split(artifact, data_root, split)
    labels, patients = images.labels, images.rows["patient_id"].tolist()
    check_sample(int(labels.sum()), int((labels == 0).sum()), policy, f"{data_root} ({split})")
    probs = artifact.predict_proba(images.images)
    threshold = choose_threshold(labels, probs, policy)
    at_site = evaluate_predictions(
        labels, probs, threshold, storage.join(out_uri, "evaluation", "site"),
        subtypes=images.rows["subtype"].tolist(), title=f"{artifact.name} — site sample, site threshold",
        n_bootstrap=n_bootstrap, groups=patients, extra={"threshold_source": "site"},
    )  # fmt: skip
    training_threshold = float(artifact.meta["threshold"])
    at_training = compute_metrics(labels, probs, training_threshold, n_bootstrap=n_bootstrap, groups=patients)
    record = {
        "threshold": threshold,
        "policy": policy.model_dump(mode="json"),
        "training_threshold": training_threshold,
        "sample": {
            "root": data_root, "split": split, "manifest_digest": manifest_digest(images.rows),
            "n": len(labels), "n_positive": int(labels.sum()), "n_negative": int((labels == 0).sum()),
            "n_patients": len(set(patients)), "unreadable": len(images.failures),
        },
        "at_site_threshold": _summary(at_site),
        "at_training_threshold": _summary(at_training),
        "source": {"uri": str(model_uri), "name": artifact.name, "version": artifact.version},
        "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    derive_artifact(artifact, {**artifact.meta, SITE_KEY: record}, out_uri)
    write_predictions(images, probs, threshold, storage.join(out_uri, "evaluation", "site", "predictions.csv"))
    return record
