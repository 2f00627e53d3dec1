"""Evaluate a model artifact on the images of one split, at the artifact's operating threshold.

``test`` is the images in ``test/`` under ``--data`` now and nothing else (a flat ``NORMAL/`` +
``PNEUMONIA/`` folder counts as ``test``), so a root that holds only ``test/`` evaluates fine.
``train`` and ``val`` exist only relative to the training run: their rows come from the manifest saved
with the artifact (``manifest.parquet``, checked against the digest in ``pneumonet.json``), and each
of those files must still be under ``--data`` (at the same relative path) with the same size and
contents, or a DataError names what changed: a threshold judged on other images than it was chosen on
means nothing. Test metrics record the test patients that also have training images.
"""

from __future__ import annotations

import io
import logging
from pathlib import PurePosixPath

import pandas as pd

from pneumonet import storage
from pneumonet.artifact import Artifact, load_artifact
from pneumonet.artifact_meta import MANIFEST_FILE
from pneumonet.config import Config, DataConfig
from pneumonet.data.catalog import manifest_digest, patients_in_pool, read_manifest, scan, usable
from pneumonet.data.pipeline import ImageSet, load_image_set
from pneumonet.errors import DataError
from pneumonet.evaluation import evaluate_predictions
from pneumonet.registry import resolve_model

log = logging.getLogger(__name__)


def saved_manifest(artifact: Artifact) -> pd.DataFrame:
    """The usable rows the artifact's run trained, validated and tested on, as saved with it and checked."""
    uri = storage.join(artifact.uri, MANIFEST_FILE)
    if not storage.exists(uri):
        raise DataError(f"artifact {artifact.uri} has no {MANIFEST_FILE}, so the images of its training run are not "
                        "known; evaluate --split test")  # fmt: skip
    manifest = usable(read_manifest(uri))
    recorded = str(artifact.meta.get("manifest_digest"))
    if manifest_digest(manifest) != recorded:
        raise DataError(f"{uri} does not have the digest {artifact.name} recorded ({recorded[:12]}…): it was changed after training")
    return manifest


def _relative(uri: str, root: str) -> str:
    return PurePosixPath(storage.filesystem(uri)[1]).relative_to(storage.filesystem(root)[1]).as_posix()


def _same(saved: str | None, now: str | None) -> bool | None:
    """Equal contents? None when the tags cannot be compared (SHA-256 against an ETag, or one missing)."""
    if not saved or not now or saved.split(":", 1)[0] != now.split(":", 1)[0]:
        return None
    return saved == now


def run_rows(artifact: Artifact, data_root: str, split: str) -> pd.DataFrame:
    """The artifact's ``train`` or ``val`` rows, found under ``data_root``; DataError naming what changed."""
    manifest = saved_manifest(artifact)
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    trained_root = artifact.meta.get("data_root") or data_root
    now = scan(data_root)
    found = {_relative(u, data_root): (size, tag) for u, size, tag in zip(now["uri"], now["bytes"], now["content"], strict=True)}
    missing, changed, uncompared, uris = [], [], 0, []
    for row in rows.itertuples(index=False):
        relative = _relative(row.uri, trained_root)
        uris.append(storage.join(storage.absolute(data_root), *relative.split("/")))
        if relative not in found:
            missing.append(relative)
            continue
        size, tag = found[relative]
        same = _same(row.content, tag)
        uncompared += same is None
        if size != row.bytes or same is False:
            changed.append(relative)
    if missing or changed:
        what = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
        what += [f"{len(changed)} with other contents (e.g. {', '.join(changed[:3])})"] if changed else []
        raise DataError(
            f"{data_root}: not the data {artifact.name} was trained on: of the {len(rows)} {split} images of its run "
            f"({trained_root}), {' and '.join(what)}; evaluate --split test, or point --data at the training data as it was"
        )
    if uncompared:
        log.warning("%s: %d %s images checked by name and size only (their contents were recorded as %s)",
                    data_root, uncompared, split, str(rows["content"].iloc[0]).split(":", 1)[0])  # fmt: skip
    return rows.assign(uri=uris)


def split_rows(artifact: Artifact, data_root: str, split: str) -> pd.DataFrame:
    """The usable images of ``split`` under ``data_root`` (see the module docstring)."""
    if split in ("train", "val"):
        return run_rows(artifact, data_root, split)
    manifest = usable(scan(data_root))
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    if rows.empty:
        found = ", ".join(sorted(set(manifest["split"]))) or "none"
        raise DataError(f"{data_root}: no usable images in the {split} split (splits found: {found})")
    return rows


def patients_also_in_train(artifact: Artifact, rows: pd.DataFrame) -> list[str] | None:
    """Patients of ``rows`` that the artifact's run trained or validated on (None: no saved manifest says)."""
    if not storage.exists(storage.join(artifact.uri, MANIFEST_FILE)):
        return None
    return patients_in_pool(rows, saved_manifest(artifact))


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
    decode settings (default: the artifact's). Test metrics name the patients also trained on.
    """
    artifact = load_artifact(resolve_model(model_uri).uri)  # an alias pointer works too
    images = decode_split(artifact, data_root, split, data)
    probs = artifact.predict_proba(images.images)
    extra: dict = {"threshold_source": artifact.threshold_source}
    if split == "test" and (shared := patients_also_in_train(artifact, images.rows)) is not None:
        extra["patients_also_in_train"] = shared
        if shared:
            log.warning("%d test patients also have training images (%s): these figures flatter the model",
                        len(shared), ", ".join(shared[:10]))  # fmt: skip
    metrics = evaluate_predictions(
        images.labels, probs, artifact.threshold, out,
        subtypes=images.rows["subtype"].tolist(), title=f"{artifact.name} — {split}",
        groups=images.rows["patient_id"].tolist(), extra=extra,
    )  # fmt: skip
    write_predictions(images, probs, artifact.threshold, storage.join(out, "predictions.csv"))
    return metrics
