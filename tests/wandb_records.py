"""Read back offline W&B runs for tests: the records of a ``run-<id>.wandb`` file.

The file is a LevelDB-style log (wandb's "datastore"): a 7-byte header (``:W&B``, magic, version),
then 32 KiB blocks of records, each with a 7-byte header (CRC32, length, type: full/first/middle/last)
and a protobuf ``Record`` as payload. wandb 0.31 no longer ships a Python reader, so this is one.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Yield the ``wandb_internal_pb2.Record`` messages of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FIRST, MIDDLE):
            pending = (b"" if kind == FIRST else pending) + chunk
            continue
        payload = pending + chunk if kind == LAST else chunk
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What a test wants to know about one offline run."""

    run_id: str
    job_type: str
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # type, name, metadata, aliases
    config_keys: set[str] = field(default_factory=set)


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun("", "")
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.job_type = record.run.run_id, record.run.job_type
            run.config_keys |= {_key(item) for item in record.run.config.update}
        elif kind == "config":
            run.config_keys |= {_key(item) for item in record.config.update}
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "artifact":
            art = record.artifact
            metadata = json.loads(art.metadata) if art.metadata else {}
            run.artifacts.append({"type": art.type, "name": art.name, "metadata": metadata, "aliases": list(art.aliases)})
    return run


def _complete(path: Path, timeout: float) -> Path:
    """Wait until wandb's writer has closed the run (its ``exit`` record is on disk): ``run.finish()``
    can return before the service process flushed the file."""
    deadline = time.monotonic() + timeout
    while not any(record.WhichOneof("record_type") == "exit" for record in records(path)):
        assert time.monotonic() < deadline, f"{path}: the run was not closed within {timeout} s"
        time.sleep(0.2)
    return path


def offline_runs(root: Path, timeout: float = 30.0) -> dict[str, OfflineRun]:
    """Every offline run under a wandb dir (``root/wandb/offline-run-*/run-<id>.wandb``), by run id."""
    paths = sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))
    runs = [read_run(_complete(path, timeout)) for path in paths]
    return {run.run_id: run for run in runs}
