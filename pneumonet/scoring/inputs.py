"""What a batch-scoring job scores, as a Ray Dataset of ``uri`` rows: a manifest, or a folder or prefix.

Nothing per file is held on the driver, so the listing scales with the cluster, not the head pod:

- a ``.parquet`` or ``.csv`` manifest with a ``uri`` column is read by Ray Data's readers on the
  workers; the driver only reads its schema (Parquet footer) or header line to fail fast;
- a folder or ``s3://`` prefix is listed in parallel by sub-prefix: the driver walks the first
  levels of the tree breadth-first in Ray tasks that return sub-folder names only (never files),
  until there are :data:`LISTING_UNITS` sub-prefixes or :data:`MAX_DEPTH` levels; then one Ray
  Data task lists each sub-prefix recursively (S3: ``ListObjectsV2`` pages of 1,000 keys), and one
  lists the files directly inside each level walked. A flat prefix of millions of files has no
  sub-prefix to split on, so it is listed by one task: give such an archive as a manifest
  (S3 Inventory writes one).

Every listed file gets exactly one output row, including files that are plainly not images: those
get an error row without being read, so a stray 4 GB zip in an archive costs nothing but is still
accounted for. A URI listed twice (a manifest may repeat one) is scored once: the anti-join in
:mod:`pneumonet.scoring.plan` groups by URI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pneumonet import storage
from pneumonet.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")
# Sub-prefixes listed in parallel, at least (when the tree has them): enough to keep a cluster's
# CPUs busy, few enough that the walk that finds them stays a handful of requests.
LISTING_UNITS = 64
MAX_DEPTH = 4
def is_manifest(uri: str) -> bool:
    return PurePosixPath(uri).suffix.lower() in MANIFEST_SUFFIXES and not storage.is_dir(uri)


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return storage.S3_SCHEME + path if isinstance(fs, pafs.S3FileSystem) else path


def _manifest_columns(uri: str) -> list[str]:
    """The manifest's column names, from the Parquet footer or the CSV header (a few KB read)."""
    fs, path = storage.filesystem(uri)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as file:
                return pq.read_schema(file).names
        with fs.open_input_stream(path) as stream:
            head = stream.read(1 << 16)
        return pacsv.read_csv(pa.BufferReader(head.split(b"\n", 1)[0] + b"\n")).column_names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"manifest {uri}: cannot read a 'uri' column ({exc})") from None


def resolve_manifest_uris(batch: pa.Table, manifest: str) -> pa.Table:
    """Ray Data map: manifest entries → URIs. Relative entries are relative to the manifest (so a
    manifest can travel with its images); local paths are normalised the way listings return them,
    so resuming recognises them."""
    column = batch.column("uri")
    blank = pc.sum(pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), ""))).as_py()
    if blank:
        raise DataError(f"manifest {manifest}: {blank} rows have an empty 'uri'")
    if storage.is_s3(manifest):
        base = manifest.rsplit("/", 1)[0]
        uris = [u if storage.is_s3(u) else storage.join(base, u) for u in column.to_pylist()]
    else:
        base = str(Path(manifest).expanduser().absolute().parent)
        uris = [u if storage.is_s3(u) else os.path.normpath(os.path.join(base, os.path.expanduser(u)))
                for u in column.to_pylist()]  # fmt: skip
    return pa.table({"uri": pa.array(uris, pa.string())})


def _manifest_dataset(uri: str) -> Any:
    import ray

    columns = _manifest_columns(uri)
    if "uri" not in columns:
        raise DataError(f"manifest {uri}: cannot read a 'uri' column (its columns: {', '.join(columns)})")
    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        dataset = ray.data.read_parquet(path, filesystem=fs, columns=["uri"])
    else:
        options = pacsv.ConvertOptions(include_columns=["uri"], column_types={"uri": pa.string()})
        dataset = ray.data.read_csv(path, filesystem=fs, convert_options=options)
    return dataset.map_batches(resolve_manifest_uris, batch_format="pyarrow", fn_kwargs={"manifest": uri})


def _subfolders(uri: str) -> tuple[list[str], bool]:
    """(the visible sub-folders of ``uri``, whether files lie directly in it): one level, no file
    names returned, so a level of a million files costs the caller nothing."""
    fs, path = storage.filesystem(uri)
    folders, has_files = [], False
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if PurePosixPath(info.path).name.startswith("."):
            continue
        if info.type == pafs.FileType.Directory:
            folders.append(_uri(fs, info.path))
        elif info.type == pafs.FileType.File:
            has_files = True
    return sorted(folders), has_files


def listing_units(root: str) -> list[tuple[str, bool]]:
    """(prefix, recursive) pairs that together list every visible file under ``root`` once."""
    import ray

    scan = ray.remote(num_cpus=0.25)(_subfolders)
    units: list[tuple[str, bool]] = []
    level = [root]
    for _ in range(MAX_DEPTH):
        found = ray.get([scan.remote(prefix) for prefix in level])
        units += [(prefix, False) for prefix, (_, has_files) in zip(level, found) if has_files]
        level = [folder for folders, _ in found for folder in folders]
        if len(level) >= LISTING_UNITS or not level:
            break
    return units + [(prefix, True) for prefix in level]


def list_units(batch: pa.Table, exclude_prefix: str | None) -> pa.Table:
    """Ray Data map: (prefix, recursive) rows → the visible files under each, as ``uri`` rows."""
    uris = []
    for prefix, recursive in zip(batch.column("prefix").to_pylist(), batch.column("recursive").to_pylist()):
        fs, path = storage.filesystem(prefix)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True)):
            hidden = any(part.startswith(".") for part in PurePosixPath(info.path).relative_to(path).parts)
            if info.type == pafs.FileType.File and not hidden:
                uris.append(_uri(fs, info.path))
    if exclude_prefix:
        excluded = exclude_prefix.rstrip("/") + "/"
        uris = [uri for uri in uris if not uri.startswith(excluded)]
    return pa.table({"uri": pa.array(uris, pa.string())})


def _tree_dataset(root: str, exclude_prefix: str | None) -> Any:
    import ray

    units = listing_units(root)
    items = [{"prefix": prefix, "recursive": recursive} for prefix, recursive in units]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        list_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"exclude_prefix": exclude_prefix}
    )


def input_dataset(input_uri: str, exclude_prefix: str | None = None) -> Any:
    """A lazy Ray Dataset of the input URIs (column ``uri``): a manifest's ``uri`` column, every file
    under a folder/prefix, or the one file named. ``exclude_prefix`` (the job's output) is left out,
    so an output inside the input folder is not scored on the next run."""
    import ray

    storage.check_access(input_uri)
    if is_manifest(input_uri):
        return _manifest_dataset(input_uri)
    if storage.is_dir(input_uri):
        return _tree_dataset(storage.absolute(input_uri), exclude_prefix)
    return ray.data.from_items([{"uri": storage.absolute(input_uri)}])
