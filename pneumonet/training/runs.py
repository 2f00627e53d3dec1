"""Where a training run keeps its files, under one storage root (a folder or ``s3://`` prefix)::

    STORAGE/runs/latest                       run-id of the newest run (text)
    STORAGE/runs/<run-id>/run.json            the run: variants, data root, config, manifest digest
    STORAGE/runs/<run-id>/manifest.parquet    the catalog with the patient split this run trains on
    STORAGE/runs/<run-id>/<variant>/          Ray Train's folder: checkpoint_epoch-0001-0/ … final-0/
    STORAGE/models/<variant>/<run-id>/        the model artifact (model.keras + pneumonet.json),
                                              evaluation/{val,test}/, history.json, training_curves.png
    STORAGE/models/<variant>/latest           run-id of the newest finished artifact of that variant

A run-id is ``YYYYMMDD-HHMMSS-xxxx`` (UTC time of the start plus 4 random hex digits): unique, and
sorted by start time. It is chosen when a job starts (or given with ``--run-id``) and persisted in
``run.json`` and ``runs/latest``; ``--resume`` reads it back and gives Ray Train the same experiment
folder, from which it restores the last checkpoint of every unfinished variant.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pneumonet import storage
from pneumonet.artifact_meta import MANIFEST_FILE, META_FILE
from pneumonet.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # pneumonet.artifact loads TensorFlow; the registry and Serve's app builder import this module
    from pneumonet.artifact import Artifact

LATEST = "latest"
RUN_FILE = "run.json"
RUN_KEYS = ("data_root", "config")  # what --resume reads back
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    """Run-ids become folder names, Ray experiment names and W&B run ids: keep them plain."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run-id {run_id!r}: use letters, digits, '-', '_' and '.', at most 64 characters")
    return run_id


@dataclass(frozen=True)
class RunLayout:
    """The URIs of one run under a storage root."""

    storage: str
    run_id: str

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, "runs", self.run_id)

    @property
    def run_file(self) -> str:
        return storage.join(self.run_dir, RUN_FILE)

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.run_dir, MANIFEST_FILE)

    def artifact_uri(self, variant: str) -> str:
        return storage.join(self.storage, "models", variant, self.run_id)

    def exists(self) -> bool:
        """Whether this run was started here (``run.json`` is written before any training)."""
        return storage.exists(self.run_file)

    def is_finished(self, variant: str) -> bool:
        """Whether this run already wrote the artifact of ``variant`` (``pneumonet.json`` comes last)."""
        return storage.exists(storage.join(self.artifact_uri(variant), META_FILE))

    def write_run(self, record: dict) -> None:
        storage.write_text(self.run_file, json.dumps(record, indent=2, default=str) + "\n")
        storage.write_text(storage.join(self.storage, "runs", LATEST), self.run_id + "\n")

    def read_run(self) -> dict:
        if not storage.exists(self.run_file):
            raise ConfigError(f"cannot resume run {self.run_id}: {self.run_file} does not exist")
        try:
            record = json.loads(storage.read_text(self.run_file))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot resume run {self.run_id}: {self.run_file} is not valid JSON ({exc}); "
                              "start a new run") from None  # fmt: skip
        missing = [key for key in RUN_KEYS if key not in record] if isinstance(record, dict) else list(RUN_KEYS)
        if missing:
            raise ConfigError(f"cannot resume run {self.run_id}: {self.run_file} lacks {', '.join(missing)}; start a new run")
        return record

    def mark_latest(self, variant: str) -> None:
        storage.write_text(storage.join(self.storage, "models", variant, LATEST), self.run_id + "\n")


def latest_run_id(storage_root: str) -> str:
    """The run-id in ``STORAGE/runs/latest``: the run ``--resume`` continues when none is named."""
    pointer = storage.join(storage_root, "runs", LATEST)
    if not storage.exists(pointer):
        raise ConfigError(f"nothing to resume: {pointer} does not exist (no run was started under {storage_root})")
    return check_run_id(storage.read_text(pointer).strip())


def resolve_artifact_uri(uri: str) -> str:
    """Follow a ``latest`` pointer: ``.../models/<variant>/latest`` or ``.../models/<variant>`` → the artifact.

    Any other URI is returned unchanged, so callers can pass whatever the user gave.
    """
    uri = str(uri).rstrip("/")
    pointer = uri if uri.endswith("/" + LATEST) else storage.join(uri, LATEST)
    if storage.exists(pointer) and not storage.is_dir(pointer):
        parent = pointer[: -len(LATEST)].rstrip("/")
        return storage.join(parent, check_run_id(storage.read_text(pointer).strip()))
    if uri.endswith("/" + LATEST):
        raise ArtifactError(f"{uri}: no such pointer (no finished model of that variant yet)")
    return uri


def load_latest_artifact(storage_root: str, variant: str) -> Artifact:
    """The newest finished model of ``variant`` under a storage root."""
    from pneumonet.artifact import load_artifact

    return load_artifact(resolve_artifact_uri(storage.join(storage_root, "models", variant, LATEST)))


def publish_artifact(source: str, target: str) -> str:
    """Replace ``target`` with a copy of an artifact folder (with its evaluation files).

    The old folder goes first and ``pneumonet.json`` comes last, so a reader sees either no artifact or
    the whole new one, never a new model under old metadata.
    """
    storage.delete(storage.join(target, META_FILE))
    storage.delete(target)
    entries = storage.list_files(source)
    _, root = storage.filesystem(source)
    meta = None
    for entry in entries:
        relative = storage.filesystem(entry.uri)[1][len(root) :].lstrip("/")
        if relative == META_FILE:
            meta = entry
            continue
        storage.write_bytes(storage.join(target, *relative.split("/")), storage.read_bytes(entry.uri))
    if meta is not None:
        storage.write_bytes(storage.join(target, META_FILE), storage.read_bytes(meta.uri))
    return target
