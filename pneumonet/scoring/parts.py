"""The output of a batch-scoring job: Parquet parts in one folder or prefix, written so a job can resume.

Each part is ``part-<run id>-<sequence>.parquet``; the run id (UTC time + random suffix) keeps the
names of a resumed run apart from the earlier ones. A part becomes visible whole or not at all:
:func:`pneumonet.storage.write_bytes` writes a local file under a hidden temporary name and
renames it, and an S3 object appears only when its single PUT (or multipart upload) completes. So
the set of URIs in the visible parts is exactly what is done, and a resumed job scores the rest.
One job writes to one output at a time.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

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
    ]
)
PART_PATTERN = re.compile(r"^part-.+\.parquet$")


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent starts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def part_name(run_id: str, sequence: int) -> str:
    return f"part-{run_id}-{sequence:05d}.parquet"


def absolute(uri: str) -> str:
    """Local paths made absolute (as :func:`pneumonet.storage.list_files` returns them); s3:// as is."""
    return uri.rstrip("/") if storage.is_s3(uri) else str(Path(uri).expanduser().absolute())


def write_part(output: str, name: str, table: pa.Table) -> str:
    """Write one part atomically; returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(table.cast(SCHEMA), buffer, compression="zstd")
    uri = storage.join(output, name)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def list_parts(output: str) -> list[str]:
    """URIs of the finished parts under ``output`` (none when it does not exist yet)."""
    if not storage.exists(output):
        return []
    if not storage.is_dir(output):
        raise StorageError(f"{output}: the output must be a folder or prefix, but it is a file")
    prefix = absolute(output) + "/"
    return [
        entry.uri
        for entry in storage.list_files(output)
        if PART_PATTERN.match(PurePosixPath(entry.uri).name) and "/" not in entry.uri[len(prefix) :]
    ]


def read_parts(output: str, columns: list[str]) -> list[pa.Table]:
    """The given columns of every finished part, one table per part."""
    tables = []
    for uri in list_parts(output):
        try:
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns))
        except (pa.ArrowInvalid, KeyError) as exc:
            raise DataError(
                f"{uri} is not a readable scoring part ({exc}); parts are written atomically, so it was "
                "changed by something else: remove it and run again to rescore its images"
            ) from None
    return tables


def remove_stale_temporaries(output: str) -> None:
    """Delete the hidden temporary files a killed local job left behind (S3 has none)."""
    if storage.is_s3(output):
        return
    folder = Path(absolute(output))
    for tmp in folder.glob(".part-*.parquet.*") if folder.is_dir() else ():
        log.info("removing %s, left by an interrupted job", tmp)
        tmp.unlink(missing_ok=True)


def scored_uris(output: str, model: str) -> pa.Array:
    """The distinct URIs already in ``output`` (Arrow: compact for millions); refuses an output that
    holds another model's scores."""
    uris = []
    for table in read_parts(output, ["uri", "model"]):
        others = set(table.column("model").unique().to_pylist()) - {model}
        if others:
            raise DataError(
                f"{output} already holds scores of model {min(others)}, not {model}: "
                "write to a new output (or delete the old one) rather than mixing models"
            )
        uris.append(table.column("uri"))
    return pc.unique(pa.chunked_array(uris, pa.string()))


def not_in(uris: pa.Array, done: pa.Array) -> pa.Array:
    """The URIs of ``uris`` that are not in ``done``, in order."""
    return uris.filter(pc.invert(pc.is_in(uris, value_set=done)))
