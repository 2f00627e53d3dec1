"""Evaluate a model artifact on the images of one split, at the artifact's operating threshold.

``train`` and ``test`` are the images in those folders and nothing else (a flat ``NORMAL/`` +
``PNEUMONIA/`` folder counts as ``test``), so a root that holds only ``test/`` evaluates fine.
``val`` exists only relative to a training run: it is re-derived with the artifact's own seed,
fraction and per-class limit, and refused unless the re-derived manifest has the digest the
artifact recorded, because a threshold judged on other images than it was chosen on means nothing.
"""

from __future__ import annotations

import io

import pandas as pd

from pneumonet import storage
from pneumonet.artifact import Artifact, load_artifact
from pneumonet.config import Config, DataConfig
from pneumonet.data.catalog import manifest_digest, scan, usable
from pneumonet.data.pipeline import ImageSet, limit_per_class, load_image_set
from pneumonet.data.split import assign_validation
from pneumonet.errors import DataError
from pneumonet.evaluation import evaluate_predictions


def validation_rows(artifact: Artifact, data_root: str) -> pd.DataFrame:
    """The validation patients the artifact's threshold was chosen on, or a DataError saying why not."""
    config = Config.model_validate(artifact.meta["config"])
    manifest = scan(data_root)
    rows = assign_validation(manifest, config.data.val_fraction, config.seed, config.data.merge_val_folder)
    rows = limit_per_class(rows, config.data.limit_per_class, config.seed)
    recorded = artifact.meta.get("manifest_digest")
    found = manifest_digest(usable(rows))
    if recorded != found:
        raise DataError(
            f"{data_root}: not the dataset {artifact.name} was trained on (manifest digest {found[:12]}…, the "
            f"artifact recorded {str(recorded)[:12]}…), so its validation split cannot be re-derived; evaluate "
            "--split test, or point --data at the training data as it was"
        )
    return usable(rows[rows["split"] == "val"])


def split_rows(artifact: Artifact, data_root: str, split: str) -> pd.DataFrame:
    """The usable images of ``split`` under ``data_root`` (see the module docstring)."""
    if split == "val":
        rows = validation_rows(artifact, data_root)
    else:
        manifest = usable(scan(data_root))
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        if rows.empty:
            found = ", ".join(sorted(set(manifest["split"]))) or "none"
            raise DataError(f"{data_root}: no usable images in the {split} split (splits found: {found})")
    return rows


def decode_split(artifact: Artifact, data_root: str, split: str, data: DataConfig | None = None) -> ImageSet:
    """Decoded images of one split at the artifact's input size (unreadable files listed in ``failures``);
    ``data``: the decode settings (default: those the artifact was trained with)."""
    data = data or Config.model_validate(artifact.meta["config"]).data
    rows = split_rows(artifact, data_root, split)
    return load_image_set(rows, artifact.image_size, data, progress=f"decode {split}")


def write_predictions(images: ImageSet, probs, threshold: float, uri: str) -> None:
    """``predictions.csv``: one row per image (probability, decision) and one per unreadable file (error)."""
    predictions = images.rows[["uri", "label", "subtype", "patient_id"]].assign(
        probability=probs, prediction=["PNEUMONIA" if p >= threshold else "NORMAL" for p in probs]
    )
    failed = pd.DataFrame({"uri": list(images.failures), "error": list(images.failures.values())})
    buffer = io.StringIO()
    pd.concat([predictions, failed]).to_csv(buffer, index=False)
    storage.write_text(uri, buffer.getvalue())


def evaluate_artifact(model_uri: str, data_root: str, split: str, out: str, data: DataConfig | None = None) -> dict:
    """Write ``metrics.json``, the PNGs and ``predictions.csv`` for ``split`` into ``out``.

    Metrics are at the operating threshold (the site's when the artifact is calibrated, else the
    validation one; ``threshold_source`` says which); intervals resample whole patients. ``data``:
    decode settings (default: the artifact's).
    """
    artifact = load_artifact(model_uri)
    images = decode_split(artifact, data_root, split, data)
    probs = artifact.predict_proba(images.images)
    metrics = evaluate_predictions(
        images.labels, probs, artifact.threshold, out,
        subtypes=images.rows["subtype"].tolist(), title=f"{artifact.name} — {split}",
        groups=images.rows["patient_id"].tolist(), extra={"threshold_source": artifact.threshold_source},
    )  # fmt: skip
    write_predictions(images, probs, artifact.threshold, storage.join(out, "predictions.csv"))
    return metrics
