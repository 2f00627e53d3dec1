"""What a batch-scoring job scores: every file under a folder or prefix, or the ``uri`` column of a manifest.

The list is built once on the driver (URIs only, never pixels). Every listed file gets exactly one
output row, including files that are plainly not images: those get an error row without being
read, so a stray 4 GB zip in an archive costs nothing but is still accounted for.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pneumonet import storage
from pneumonet.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")
# Suffixes that are certainly not images. Anything else is read and decoded, because DICOM files
# often have no suffix or a numeric one (``1.2.840.113619.2.55``); the decoder decides by content.
NOT_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".csv", ".tsv", ".json", ".xml", ".html", ".htm", ".md", ".yaml", ".yml", ".log", ".pdf",
     ".doc", ".docx", ".xls", ".xlsx", ".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar",
     ".parquet", ".py", ".sh", ".exe", ".bin", ".db", ".sqlite", ".mp4", ".avi", ".mov", ".mp3", ".wav"}
)  # fmt: skip


def not_image_reason(uri: str) -> str | None:
    """Why ``uri`` is skipped without reading it, or None when it should be decoded."""
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix in NOT_IMAGE_SUFFIXES:
        return f"{uri}: not an image file (suffix {suffix}); not read"
    return None


def is_manifest(uri: str) -> bool:
    return PurePosixPath(uri).suffix.lower() in MANIFEST_SUFFIXES and not storage.is_dir(uri)


def _read_manifest(uri: str) -> list[str]:
    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".parquet"):
            frame = pq.read_table(io.BytesIO(data), columns=["uri"]).to_pandas()
        else:
            frame = pd.read_csv(io.BytesIO(data), usecols=["uri"], dtype={"uri": "string"})
    except (KeyError, ValueError) as exc:  # missing column, or not parseable as Parquet/CSV
        raise DataError(f"manifest {uri}: cannot read a 'uri' column ({exc})") from None
    missing = frame["uri"].isna() | (frame["uri"].astype("string").str.strip() == "")
    if missing.any():
        rows = ", ".join(str(i) for i in frame.index[missing][:5])
        raise DataError(f"manifest {uri}: {int(missing.sum())} rows have an empty 'uri' (rows {rows}…)")
    # Relative entries are relative to the manifest, so a manifest can travel with its images;
    # local paths are normalised the way folder listings return them, so resuming recognises them.
    if storage.is_s3(uri):
        base = uri.rsplit("/", 1)[0]
        return [u if storage.is_s3(u) else storage.join(base, u) for u in frame["uri"].astype(str)]
    base = str(Path(uri).expanduser().absolute().parent)
    return [u if storage.is_s3(u) else os.path.normpath(os.path.join(base, os.path.expanduser(u)))
            for u in frame["uri"].astype(str)]  # fmt: skip


def list_inputs(input_uri: str, exclude_prefix: str | None = None) -> pa.Array:
    """Unique input URIs, sorted: a manifest's ``uri`` column, or every file under a folder/prefix.

    An Arrow string array: the driver holds every URI of the archive, at ~90 bytes each rather
    than a Python object's ~200. ``exclude_prefix`` (the job's output) is left out, so an output
    inside the input folder is not scored on the next run.
    """
    if is_manifest(input_uri):
        listed = _read_manifest(input_uri)
        uris = pc.unique(pa.array(listed, pa.string()))
        if len(uris) != len(listed):
            log.warning("manifest %s lists %d URIs more than once; each is scored once", input_uri, len(listed) - len(uris))
        del listed
    else:
        uris = pa.array([entry.uri for entry in storage.list_files(input_uri)], pa.string())
    uris = uris.take(pc.array_sort_indices(uris))
    if exclude_prefix:
        uris = uris.filter(pc.invert(pc.starts_with(uris, pattern=exclude_prefix.rstrip("/") + "/")))
    if len(uris) == 0:
        raise DataError(f"{input_uri}: no files to score")
    return uris
