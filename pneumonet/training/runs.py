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
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from pneumonet import storage
from pneumonet.artifact_meta import MANIFEST_FILE, META_FILE
from pneumonet.errors import ConfigError
from pneumonet.registry import LATEST, MODELS, check_run_id

RUN_FILE = "run.json"
RUN_KEYS = ("data_root", "config")  # what --resume reads back


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


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
        return storage.join(self.storage, MODELS, variant, self.run_id)

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
        storage.write_text(storage.join(self.storage, MODELS, variant, LATEST), self.run_id + "\n")


def latest_run_id(storage_root: str) -> str:
    """The run-id in ``STORAGE/runs/latest``: the run ``--resume`` continues when none is named."""
    pointer = storage.join(storage_root, "runs", LATEST)
    if not storage.exists(pointer):
        raise ConfigError(f"nothing to resume: {pointer} does not exist (no run was started under {storage_root})")
    return check_run_id(storage.read_text(pointer).strip())
