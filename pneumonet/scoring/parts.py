"""The output of a batch-scoring job: Parquet parts in one folder or prefix, written so a job can resume.

Parts are written by the Ray workers (:func:`write_batch`, the last stage of the pipeline), never
by the driver. Each is ``part-<run id>-<digest>.parquet``: the run id (UTC time + random suffix)
keeps a resumed run's names apart from the earlier ones, and the digest of the part's URIs makes
the name a function of its content, so a task that Ray retries (its worker died after the write)
overwrites its own part instead of adding a second copy. A part becomes visible whole or not at
all: :func:`pneumonet.storage.write_bytes` writes a local file under a hidden temporary name and
renames it, and an S3 object appears only when its single PUT (or multipart upload) completes. So
the set of URIs in the visible parts is exactly what is done, and a resumed job scores the rest.
One job writes to one output at a time.

Beside each part, a *drift sample* ``_drift/<part name>`` may hold the few of its rows that fall into
the job's uniform sample (:func:`pneumonet.evaluation.drift.sample_key` below the job's rate) with
what the window tests need: the raw score and the projected embedding. It is written by the same task
just before its part, so the sample grows with the output and costs the driver nothing per file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pneumonet import storage
from pneumonet.errors import DataError, StorageError

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("probability", pa.float64()),
        pa.field("prediction", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),  # pneumonet.errors: a short code per cause; null when scored
        # Against the model's drift reference (null without one, and for rows with an error).
        pa.field("in_distribution", pa.bool_()),
        pa.field("ood_reason", pa.string()),
    ]
)
# The drift sample's own columns, carried from the model stage to the writer next to SCHEMA's.
SAMPLE_COLUMNS = ("sample_key", "raw_probability", "projection")
SAMPLE_FOLDER = "_drift"
PART_PATTERN = re.compile(r"^part-.+\.parquet$")


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent starts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def part_name(run_id: str, uris: pa.ChunkedArray | pa.Array) -> str:
    """The name of the part of ``run_id`` holding ``uris``: the same URIs, the same name."""
    digest = hashlib.blake2b("\n".join(uris.to_pylist()).encode(), digest_size=8).hexdigest()
    return f"part-{run_id}-{digest}.parquet"


def _with_absent_columns(table: pa.Table) -> pa.Table:
    """``table`` with the nullable :data:`SCHEMA` columns it lacks added as nulls (rows of older code)."""
    for field in SCHEMA:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names)


def write_part(output: str, name: str, table: pa.Table) -> str:
    """Write one part atomically; returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(_with_absent_columns(table).cast(SCHEMA), buffer, compression="zstd")
    uri = storage.join(output, name)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def _part_entries(output: str) -> list[storage.FileEntry]:
    if not storage.exists(output):
        return []
    if not storage.is_dir(output):
        raise StorageError(f"{output}: the output must be a folder or prefix, but it is a file")
    return [entry for entry in storage.list_files(output, recursive=False) if PART_PATTERN.match(PurePosixPath(entry.uri).name)]


def list_parts(output: str) -> list[str]:
    """URIs of the finished parts under ``output`` (none when it does not exist yet)."""
    return [entry.uri for entry in _part_entries(output)]


def fingerprint(output: str) -> str:
    """A digest of the names and sizes of ``output``'s finished parts: the same while no part is
    added, removed or rewritten (a part's name is a digest of its URIs). One listing of the output,
    no part read: about a thousand names at ten million files."""
    lines = sorted(f"{PurePosixPath(entry.uri).name} {entry.size}" for entry in _part_entries(output))
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=16).hexdigest()


def read_part(uri: str, columns: list[str]) -> pa.Table:
    """The given columns of one finished part, typed as :data:`SCHEMA` says. A nullable column that
    the part lacks (written before the column was added, e.g. ``error_kind``) reads as nulls, so an
    older output can still be resumed and summarized."""
    try:
        file = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)))
        present = set(file.schema_arrow.names)
        absent = [name for name in columns if name not in present and SCHEMA.field(name).nullable]
        table = file.read(columns=[name for name in columns if name not in absent])
        for name in absent:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
        return table.select(columns).cast(pa.schema([SCHEMA.field(name) for name in columns]))
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(
            f"{uri} is not a readable scoring part ({exc}); parts are written atomically, so it was "
            "changed by something else: remove it and run again to rescore its images"
        ) from None


def remove_stale_temporaries(output: str) -> None:
    """Delete the hidden temporary files a killed local job left behind (S3 has none)."""
    if storage.is_s3(output):
        return
    folder = Path(storage.absolute(output))
    for tmp in folder.glob(".part-*.parquet.*") if folder.is_dir() else ():
        log.info("removing %s, left by an interrupted job", tmp)
        tmp.unlink(missing_ok=True)


def read_batch(batch: pa.Table, columns: list[str], model: str | None) -> pa.Table:
    """Ray Data map: ``part`` rows → the parts' rows (``columns``); with ``model``, refuses a part
    that holds another model's scores."""
    tables = [read_part(uri, columns) for uri in batch.column("part").to_pylist()]
    table = pa.concat_tables([SCHEMA.empty_table().select(columns), *tables])
    if model is not None:
        others = set(pc.unique(table.column("model")).to_pylist()) - {model}
        if others:
            output = batch.column("part")[0].as_py().rsplit("/", 1)[0]
            raise DataError(
                f"{output} already holds scores of model {min(others)}, not {model}: "
                "write to a new output (or delete the old one) rather than mixing models"
            )
    return table


def read_drift_sample(output: str, size: int) -> pa.Table | None:
    """The output's drift sample: the ``size`` rows with the smallest sample keys over every part's
    sample (a uniform sample of the scored images, each URI once); None when no part has one."""
    folder = storage.join(output, SAMPLE_FOLDER)
    if not storage.exists(folder):
        return None
    uris = [entry.uri for entry in storage.list_files(folder, recursive=False) if PART_PATTERN.match(PurePosixPath(entry.uri).name)]
    if not uris:
        return None
    with ThreadPoolExecutor(16) as pool:  # the rows are few (about the sample's size); the files may be many
        tables = list(pool.map(lambda uri: pq.read_table(io.BytesIO(storage.read_bytes(uri))), uris))
    table = pa.concat_tables(tables).sort_by(SAMPLE_COLUMNS[0])
    keep, seen = [], set()
    for index, uri in enumerate(table.column("uri").to_pylist()):
        if uri not in seen:  # a part rescored after a kill between its sample and itself
            seen.add(uri)
            keep.append(index)
            if len(keep) == size:
                break
    return table.take(keep)


def parts_dataset(output: str, columns: list[str], model: str | None = None) -> Any:
    """A lazy Ray Dataset of the rows of every finished part (``columns`` of them), read by the
    workers; None when there is no part yet. The driver holds the part names only."""
    import ray

    uris = list_parts(output)
    if not uris:
        return None
    items = ray.data.from_items([{"part": uri} for uri in uris], override_num_blocks=min(len(uris), 256))
    return items.map_batches(read_batch, batch_format="pyarrow", fn_kwargs={"columns": columns, "model": model})


def write_batch(batch: pa.Table, output: str, run_id: str) -> pa.Table:
    """Ray Data map, the pipeline's last stage: write scored rows as one part (and their drift sample,
    if any); returns one row of counts (``part``, ``rows``, ``failures``), all that reaches the driver."""
    name = part_name(run_id, batch.column("uri"))
    if SAMPLE_COLUMNS[0] in batch.column_names:
        sampled = batch.filter(pc.is_valid(batch.column(SAMPLE_COLUMNS[0])))
        if sampled.num_rows:
            buffer = io.BytesIO()
            pq.write_table(sampled.select(["uri", "in_distribution", *SAMPLE_COLUMNS]), buffer, compression="zstd")
            storage.write_bytes(storage.join(output, SAMPLE_FOLDER, name), buffer.getvalue())
        batch = batch.select(SCHEMA.names)
    write_part(output, name, batch)
    failures = batch.num_rows - batch.column("error").null_count
    return pa.table({"part": [name], "rows": [batch.num_rows], "failures": [failures]})
