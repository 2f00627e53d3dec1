"""Find the images of a dataset and turn file names into labels, subtypes and patient ids.

Two naming conventions exist in the wild:

* the original release: ``person1000_bacteria_2931.jpeg``, ``person12_virus_44.jpeg`` (pneumonia),
  ``IM-0115-0001.jpeg`` and ``NORMAL2-IM-0007-0001.jpeg`` (normal);
* the "version 3" release: ``(NORMAL|BACTERIA|VIRUS)-<patient id>-<image number>.jpeg``.

The folder (``NORMAL/`` or ``PNEUMONIA/``) is the label; the name gives subtype and patient, which
the validation split needs so that no patient sits on both sides. A name in neither convention makes
its image its own patient, which the split cannot keep together with the patient's other images, so
:func:`scan` warns about such names. Files outside the layout stay in the manifest, unplaced (no
split) with an ``error``, and are counted by :func:`summarize` under :data:`UNPLACED`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pneumonet import storage
from pneumonet.data.images import is_image_name
from pneumonet.errors import DataError

log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
UNPLACED = "unplaced"  # the summary's entry for files outside every <split>/<CLASS>/ folder
MANIFEST_COLUMNS = ("uri", "split", "label", "subtype", "patient_id", "bytes", "content", "error")
OPTIONAL_COLUMNS = ("content",)  # manifests written before it lack it

# The original release also has a few four-part names (IM-0429-0001-0002, person447_virus_921_1).
_ORIGINAL_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)?$", re.IGNORECASE)
_ORIGINAL_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)?$", re.IGNORECASE)
_VERSION3 = re.compile(r"^(NORMAL|BACTERIA|VIRUS)-(\d+)-\d+$", re.IGNORECASE)
_IGNORED_FOLDERS = {"__macosx"}


@dataclass(frozen=True)
class ParsedName:
    """What a file name says about an image."""

    label: str | None  # None when the name does not say (then the folder decides)
    subtype: str  # normal | bacteria | virus | unknown
    patient_id: str


def parse_name(filename: str) -> ParsedName | None:
    """Parse either naming convention; ``None`` for a name that follows neither."""
    stem = PurePosixPath(filename).stem
    if match := _ORIGINAL_PNEUMONIA.match(stem):
        return ParsedName("PNEUMONIA", match.group(2).lower(), match.group(1).lower())
    if match := _ORIGINAL_NORMAL.match(stem):
        return ParsedName("NORMAL", "normal", match.group(1).upper())
    if match := _VERSION3.match(stem):
        kind = match.group(1).lower()
        label = "NORMAL" if kind == "normal" else "PNEUMONIA"
        return ParsedName(label, kind, match.group(2))
    return None


def _locate(relative: PurePosixPath) -> tuple[str, str] | str:
    """(split, class) from the innermost ``<split>/<CLASS>/`` pair of folders in a relative path,
    or why the file has no place.

    A flat sample (``<root>/<CLASS>/…`` with no split folder anywhere) counts as a ``test`` split:
    that is how a site's labelled sample or a folder to evaluate usually arrives.
    """
    folders = [part.lower() for part in relative.parts[:-1]]
    if any(part in _IGNORED_FOLDERS for part in folders):
        return "in a __MACOSX folder (macOS metadata); not used"
    for i in range(len(folders) - 2, -1, -1):
        if folders[i] in SPLITS and folders[i + 1].upper() in CLASS_NAMES:
            return folders[i], folders[i + 1].upper()
    if folders and folders[0].upper() in CLASS_NAMES and not any(part in SPLITS for part in folders):
        return "test", folders[0].upper()
    return "outside the <split>/<CLASS>/ layout (no NORMAL/ or PNEUMONIA/ folder says its label); not used"


def describe_entry(root: str, uri: str, size: int) -> dict:
    """One manifest row for a file; one outside the split/class layout gets no split and an ``error``."""
    root_path = storage.filesystem(root)[1]
    relative = PurePosixPath(storage.filesystem(uri)[1]).relative_to(root_path)
    place = _locate(relative)
    if isinstance(place, str):
        return {"uri": uri, "split": None, "label": None, "subtype": None, "patient_id": None, "bytes": int(size),
                "error": place}  # fmt: skip
    split, folder_label = place
    row = {"uri": uri, "split": split, "label": folder_label, "bytes": int(size), "error": None}
    parsed = parse_name(relative.name)
    if parsed is None:
        row["subtype"] = "normal" if folder_label == "NORMAL" else "unknown"
        row["patient_id"] = relative.stem  # unknown convention: each image is its own patient
    else:
        row["subtype"], row["patient_id"] = parsed.subtype, parsed.patient_id
        if parsed.label != folder_label:
            row["error"] = f"file name says {parsed.label} ({parsed.subtype}) but the file is in {folder_label}/"
    if not is_image_name(relative.name):
        row["error"] = "not an image file (unknown extension)"
    elif size == 0:
        row["error"] = "empty file (0 bytes)"
    return row


def _warn_about_unparsed_names(usable_rows: pd.DataFrame) -> None:
    names = usable_rows["uri"].map(lambda uri: PurePosixPath(uri).name)
    unparsed = names[names.map(parse_name).isna()]
    if unparsed.empty:
        return
    per_split = ", ".join(f"{count} in {split}/" for split, count in usable_rows.loc[unparsed.index, "split"].value_counts().items())
    log.warning(
        "%d of %d images have names in neither naming convention (%s), e.g. %s: each counts as its own patient, "
        "so the patient-grouped split cannot keep a patient's images on one side; rename them "
        "(person<N>_bacteria_<k>.jpeg, IM-<patient>-<k>.jpeg or NORMAL|BACTERIA|VIRUS-<patient>-<k>.jpeg) if patients have several",
        len(unparsed), len(usable_rows), per_split, ", ".join(unparsed[:5]),
    )  # fmt: skip


def scan(root: str) -> pd.DataFrame:
    """Catalog every file below ``root`` (local or ``s3://``); the images of ``<split>/<CLASS>/`` folders are usable.

    Files that cannot be used (outside the layout, wrong extension, empty, label conflict) stay in
    the manifest with an ``error`` so they are counted and reported, never silently dropped.
    """
    entries = storage.list_files(root)
    tags = storage.content_tags(root, entries)
    rows = [{**describe_entry(root, entry.uri, entry.size), "content": tags.get(entry.uri)} for entry in entries]
    if not any(row["error"] is None for row in rows):
        raise DataError(
            f"{root}: no usable images found; expected the Kaggle layout "
            "<root>/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg (or a flat <root>/{NORMAL,PNEUMONIA}/ sample)"
        )
    frame = pd.DataFrame(rows).reindex(columns=list(MANIFEST_COLUMNS))
    frame["bytes"] = frame["bytes"].astype("int64")
    bad = frame[frame["error"].notna()]
    if len(bad):
        listing = "; ".join(f"{u}: {e}" for u, e in zip(bad["uri"][:10], bad["error"][:10], strict=True))
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        log.warning("skipping %d unusable files: %s%s", len(bad), listing, more)
    _warn_about_unparsed_names(frame[frame["error"].isna()])
    if shared := shared_patients(frame):
        listing = ", ".join(shared[:20]) + (f" (and {len(shared) - 20} more)" if len(shared) > 20 else "")
        log.warning("%s: %d patients have images in test/ AND in train/ or val/: %s. Test figures will flatter the model; "
                    "the metrics record them (patients_also_in_train)", root, len(shared), listing)  # fmt: skip
    return frame.reset_index(drop=True)


def shared_patients(manifest: pd.DataFrame) -> list[str]:
    """Patients with usable images in test/ and in the training pool (train/ or val/), sorted."""
    rows = usable(manifest)
    return patients_in_pool(rows[rows["split"] == "test"], rows)


def patients_in_pool(rows: pd.DataFrame, manifest: pd.DataFrame) -> list[str]:
    """Patients of ``rows`` that have usable images in the training pool (train/ or val/) of ``manifest``, sorted."""
    pool = usable(manifest)
    pool = set(pool.loc[pool["split"].isin(["train", "val"]), "patient_id"])
    return sorted(map(str, set(rows["patient_id"]) & pool))


def usable(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows without an error."""
    return manifest[manifest["error"].isna()].reset_index(drop=True)


def require_classes(manifest: pd.DataFrame, split: str, root: str = "dataset") -> pd.DataFrame:
    """The usable rows of one split, or a clear error when the split or a class is missing."""
    rows = usable(manifest)
    rows = rows[rows["split"] == split]
    if rows.empty:
        raise DataError(f"{root}: the {split}/ split has no usable images")
    missing = [name for name in CLASS_NAMES if not (rows["label"] == name).any()]
    if missing:
        raise DataError(f"{root}: {split}/ has no {' or '.join(missing)} images (expected {split}/{missing[0]}/*.jpeg)")
    return rows.reset_index(drop=True)


def labels_of(frame: pd.DataFrame):
    """0 for NORMAL, 1 for PNEUMONIA, as int32."""
    return (frame["label"] == "PNEUMONIA").to_numpy().astype("int32")


def write_manifest(manifest: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), buffer)
    storage.write_bytes(uri, buffer.getvalue())


def read_manifest(uri: str) -> pd.DataFrame:
    """A manifest written by :func:`write_manifest`; DataError naming it when it is damaged or foreign."""
    data = storage.read_bytes(uri)
    try:
        manifest = pq.read_table(io.BytesIO(data)).to_pandas()
    except pa.ArrowException as exc:
        raise DataError(f"manifest {uri} is not a readable Parquet file ({exc}); it is written once, when a run "
                        "starts: start a new run rather than resume this one") from None  # fmt: skip
    for column in OPTIONAL_COLUMNS:
        if column not in manifest.columns:
            manifest[column] = None
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise DataError(f"manifest {uri} lacks the columns {', '.join(missing)}; it is not a pneumonet manifest")
    return manifest


def manifest_digest(manifest: pd.DataFrame) -> str:
    """A digest of what a model was trained on, for lineage: per file its URI, size, contents (SHA-256 or
    S3 ETag: :func:`pneumonet.storage.content_tags`), label and split."""
    digest = hashlib.sha256()
    for row in manifest.sort_values("uri").itertuples(index=False):
        digest.update(f"{row.uri}\t{row.bytes}\t{getattr(row, 'content', None) or ''}\t{row.label}\t{row.split}\n".encode())
    return digest.hexdigest()


def summarize(manifest: pd.DataFrame) -> dict:
    """Counts per split: images per class and subtype, patients, and unusable files; files outside
    every split are the ``unusable`` of an :data:`UNPLACED` entry."""
    summary: dict[str, dict[str, int]] = {}
    rows = usable(manifest)
    for split in [s for s in (*SPLITS,) if (manifest["split"] == s).any()]:
        part = rows[rows["split"] == split]
        summary[split] = {
            "NORMAL": int((part["label"] == "NORMAL").sum()),
            "PNEUMONIA": int((part["label"] == "PNEUMONIA").sum()),
            "BACTERIA": int((part["subtype"] == "bacteria").sum()),
            "VIRUS": int((part["subtype"] == "virus").sum()),
            "UNKNOWN_SUBTYPE": int((part["subtype"] == "unknown").sum()),
            "patients": int(part["patient_id"].nunique()),
            "unusable": int(((manifest["split"] == split) & manifest["error"].notna()).sum()),
        }
    unplaced = int(manifest["split"].isna().sum())
    if unplaced:
        keys = ("NORMAL", "PNEUMONIA", "BACTERIA", "VIRUS", "UNKNOWN_SUBTYPE", "patients")
        summary[UNPLACED] = {**dict.fromkeys(keys, 0), "unusable": unplaced}
    return summary
