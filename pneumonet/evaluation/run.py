"""Evaluate a model artifact on one split of a dataset, with the threshold stored in the artifact."""

from __future__ import annotations

import io

import pandas as pd

from pneumonet import storage
from pneumonet.artifact import load_artifact
from pneumonet.config import Config
from pneumonet.data.catalog import scan
from pneumonet.data.pipeline import load_image_set
from pneumonet.data.split import assign_validation
from pneumonet.errors import DataError
from pneumonet.evaluation import evaluate_predictions


def evaluate_artifact(model_uri: str, data_root: str, split: str, out: str) -> dict:
    """Write ``metrics.json``, the PNGs and ``predictions.csv`` for ``split`` into ``out``.

    The threshold is the artifact's (chosen on validation when it was trained); ``train``/``val``
    are re-derived with the artifact's own seed and fraction so they are the same patients.
    """
    artifact = load_artifact(model_uri)
    config = Config.model_validate(artifact.meta["config"])
    rows = assign_validation(scan(data_root), config.data.val_fraction, config.seed, config.data.merge_val_folder)
    rows = rows[rows["split"] == split]
    if rows.empty:
        raise DataError(f"{data_root}: the {split} split has no usable images")
    images = load_image_set(rows, artifact.image_size, config.data, progress=f"decode {split}")
    probs = artifact.predict_proba(images.images)
    metrics = evaluate_predictions(
        images.labels, probs, artifact.threshold, out,
        subtypes=images.rows["subtype"].tolist(), title=f"{artifact.name} — {split}",
    )  # fmt: skip
    predictions = images.rows[["uri", "label", "subtype", "patient_id"]].assign(
        probability=probs, prediction=["PNEUMONIA" if p >= artifact.threshold else "NORMAL" for p in probs]
    )
    buffer = io.StringIO()
    pd.concat([predictions, pd.DataFrame({"uri": list(images.failures), "error": list(images.failures.values())})]).to_csv(
        buffer, index=False
    )
    storage.write_text(storage.join(out, "predictions.csv"), buffer.getvalue())
    return metrics
