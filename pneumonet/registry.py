"""Model versions and aliases, in the run storage itself (a folder or ``s3://`` prefix), no server.

MLflow's registry and W&B's aliases are the model: a *version* is an immutable artifact, an *alias*
(``production``, ``staging``, ...) is a movable name for one version, and every move is recorded::

    STORAGE/models/<variant>/<run-id>/              a version, e.g. ``transfer/20261204-101500-ab12``:
                                                    written once by the training run, never rewritten
    STORAGE/models/aliases/<alias>                  the alias: a small JSON pointer to one version
    STORAGE/models/aliases/<alias>.log/<seq>.json   its audit log: one record per move, created once

Readers resolve an alias to a version *once* (:func:`resolve_model`) and load that immutable folder,
so no reader ever sees a half-written model. A move (:meth:`Registry.promote`, :meth:`Registry.rollback`)

1. reads the pointer and the tag a conditional write needs (S3: its ETag),
2. creates the audit record ``seq + 1`` (create-only: S3 ``If-None-Match: *``, a hard link locally),
3. writes the pointer last, only if it is still what step 1 read (S3 ``If-Match``, flock locally).

Two promotions racing: at most one passes step 3; the other gets :class:`~pneumonet.errors.ConflictError`
and changed nothing a reader sees. A record whose pointer write lost (or never happened: a crash between
2 and 3) stays in the log but off the chain: each record names its ``parent`` (the pointer's seq it
replaced), and the history is the chain from the pointer back, so a lost attempt is never reported as a
move. The guarantee needs a store with conditional writes (AWS S3 since 2024, MinIO, moto) or one
machine's local filesystem; on NFS or an S3 clone without ``If-Match`` two racing moves are not safe.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pneumonet import storage
from pneumonet.artifact_meta import META_FILE, check_artifact
from pneumonet.config import VARIANTS
from pneumonet.errors import ArtifactError, ConflictError, RegistryError, StorageError

if TYPE_CHECKING:  # pneumonet.artifact loads TensorFlow; the Serve app builder and the scoring driver import this module
    from pneumonet.artifact import Artifact

log = logging.getLogger(__name__)

MODELS = "models"
LATEST = "latest"  # STORAGE/models/<variant>/latest: the run-id of the newest finished version
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ALIASES = "aliases"
LOG_SUFFIX = ".log"
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_RESERVED = {LATEST, ALIASES, "current"}
FIGURES = ("roc_auc", "sensitivity", "specificity", "accuracy", "n")


def check_run_id(run_id: str) -> str:
    """Run-ids become folder names, Ray experiment names and W&B run ids: keep them plain."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run-id {run_id!r}: use letters, digits, '-', '_' and '.', at most 64 characters")
    return run_id



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

    return load_artifact(resolve_artifact_uri(storage.join(storage_root, MODELS, variant, LATEST)))


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
        storage.copy(entry.uri, storage.join(target, *relative.split("/")))
    if meta is not None:  # small, and written through a temporary file locally: never seen half-written
        storage.write_bytes(storage.join(target, META_FILE), storage.read_bytes(meta.uri))
    return target


def check_alias(alias: str) -> str:
    if not _ALIAS.match(alias) or alias in _RESERVED:
        raise RegistryError(f"alias {alias!r}: use lower-case letters, digits, '-' and '_' (not {', '.join(sorted(_RESERVED))})")
    return alias


def version_of(uri: str) -> tuple[str, str] | None:
    """(storage root, ``<variant>/<run-id>``) when ``uri`` is a version folder ``STORAGE/models/<variant>/<run-id>``."""
    parts = storage.absolute(uri).rsplit("/", 3)
    if len(parts) == 4 and parts[1] == MODELS and parts[2] in VARIANTS and parts[3] not in _RESERVED:
        try:
            return parts[0], f"{parts[2]}/{check_run_id(parts[3])}"
        except Exception:  # noqa: BLE001 - a folder name that is no run-id: not a registry version
            return None
    return None


def _figures(meta: dict[str, Any]) -> dict[str, Any]:
    val = meta.get("val_metrics") or {}
    figures = {key: val[key] for key in FIGURES if key in val}
    if "roc_auc" in (val.get("ci95") or {}):
        figures["roc_auc_ci95"] = val["ci95"]["roc_auc"]
    return figures


@dataclass(frozen=True)
class ModelVersion:
    """One immutable artifact of the registry."""

    id: str  # <variant>/<run-id>
    uri: str
    meta: dict[str, Any]

    @property
    def digest(self) -> str:
        """The artifact's own version: the SHA-256 prefix of model.keras, checked on every load."""
        return str(self.meta["version"])

    @property
    def roc_auc(self) -> float | None:
        value = (self.meta.get("val_metrics") or {}).get("roc_auc")
        return None if value is None else float(value)

    def describe(self) -> dict[str, Any]:
        return {"version": self.id, "uri": self.uri, "digest": self.digest, "variant": self.meta.get("variant"),
                "created_at": self.meta.get("created_at"), "threshold": self.meta.get("threshold"),
                "val": _figures(self.meta)}  # fmt: skip


@dataclass(frozen=True)
class ResolvedModel:
    """What a ``--model`` reference named, resolved once: the immutable folder to load and its names."""

    ref: str
    uri: str
    meta: dict[str, Any]
    version: str | None = None  # <variant>/<run-id> when the folder is a registry version
    alias: str | None = None  # the alias it was reached through

    @property
    def label(self) -> str:
        """The model's name in outputs (Parquet ``model`` column, logs): version (or name) and digest."""
        return f"{self.version or self.meta['name']}:{self.meta['version']}"

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "uri": self.uri, "version": self.version, "alias": self.alias,
                "digest": self.meta["version"], "label": self.label}  # fmt: skip


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


class Registry:
    """The versions and aliases under one storage root (the training job's ``--storage``)."""

    def __init__(self, storage_root: str) -> None:
        self.storage = storage.absolute(storage_root)
        self.models = storage.join(self.storage, MODELS)

    # --- versions ---------------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first (by creation time)."""
        if not storage.is_dir(self.models):
            return []
        found = []
        for entry in storage.list_files(self.models):
            tail = entry.uri[len(self.models) :].strip("/").split("/")
            if len(tail) == 3 and tail[2] == META_FILE and version_of(storage.join(self.models, tail[0], tail[1])):
                try:
                    found.append(self.get(f"{tail[0]}/{tail[1]}"))
                except ArtifactError:
                    continue  # incomplete (a training run still writing it, or interrupted): not a version
        return sorted(found, key=lambda v: (str(v.meta.get("created_at")), v.id))

    def get(self, version: str) -> ModelVersion:
        """A version by id (``transfer/<run-id>``) or by its folder URI inside this registry."""
        located = version_of(version) if "://" in version or version.startswith(("/", ".", "~")) else None
        if located:
            if located[0] != self.storage:
                raise RegistryError(f"{version} is not a version of the registry in {self.storage}")
            version = located[1]
        variant, _, run_id = version.partition("/")
        uri = storage.join(self.models, variant, run_id)
        if variant not in VARIANTS or not run_id or not version_of(uri):
            raise RegistryError(f"{version!r} is no version name: use <variant>/<run-id>, e.g. transfer/20261204-101500-ab12 "
                                "(pneumonet models lists them)")  # fmt: skip
        try:
            return ModelVersion(version, uri, check_artifact(uri))
        except ArtifactError as exc:
            raise RegistryError(f"version {version} of {self.models}: {exc}") from None

    # --- aliases ----------------------------------------------------------------------------------

    def pointer_uri(self, alias: str) -> str:
        return storage.join(self.models, ALIASES, check_alias(alias))

    def _record_uri(self, alias: str, seq: int) -> str:
        return storage.join(self.models, ALIASES, alias + LOG_SUFFIX, f"{seq:08d}.json")

    def _pointer(self, alias: str) -> tuple[dict[str, Any] | None, str | None]:
        found = storage.read_tagged(self.pointer_uri(alias))
        if found is None:
            return None, None
        try:
            return json.loads(found[0]), found[1]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"alias pointer {self.pointer_uri(alias)} is not valid JSON ({exc})") from None

    def aliases(self) -> dict[str, dict[str, Any]]:
        """Every alias and its pointer."""
        folder = storage.join(self.models, ALIASES)
        if not storage.is_dir(folder):
            return {}
        names = sorted({entry.uri[len(folder) :].strip("/").split("/")[0] for entry in storage.list_files(folder)})
        return {name: state for name in names if _ALIAS.match(name) and (state := self._pointer(name)[0])}

    def resolve(self, alias: str) -> ModelVersion:
        """The version an alias names now; checked against the digest the pointer recorded."""
        state, _ = self._pointer(alias)
        if state is None:
            raise RegistryError(f"alias {alias!r} does not exist in {self.models} (promote a version first: "
                                f"pneumonet models promote VERSION --alias {alias})")  # fmt: skip
        version = self.get(state["version"])
        if version.digest != state["digest"]:
            raise RegistryError(f"alias {alias} names {version.id} with model digest {state['digest']}, but that folder now "
                                f"holds {version.digest}: the version was rewritten; promote a version again")  # fmt: skip
        return version

    def _record(self, alias: str, seq: int) -> dict[str, Any]:
        return json.loads(storage.read_text(self._record_uri(alias, seq)))

    def history(self, alias: str) -> list[dict[str, Any]]:
        """The moves of an alias that took effect, oldest first (the chain from the pointer back)."""
        state, _ = self._pointer(alias)
        chain, seq = [], state and state["seq"]
        while seq:
            record = self._record(alias, seq)
            chain.append(record)
            seq = record["parent"]
        return chain[::-1]

    def _next_seq(self, alias: str, state: dict[str, Any] | None) -> int:
        """Past every record, also those of attempts that lost a race or crashed before their pointer write."""
        folder = storage.join(self.models, ALIASES, alias + LOG_SUFFIX)
        seqs = [int(e.uri.rsplit("/", 1)[1].split(".")[0]) for e in storage.list_files(folder)] if storage.is_dir(folder) else []
        return max([state["seq"] if state else 0, *seqs]) + 1

    def _named(self, state: dict[str, Any] | None) -> ModelVersion | None:
        """The version a pointer names, or None (no pointer, or its folder is gone: moving away is still allowed)."""
        if state is None:
            return None
        try:
            return self.get(state["version"])
        except RegistryError as exc:
            log.warning("alias %s: %s", state["alias"], exc)
            return None

    def _move(self, alias: str, target: ModelVersion, action: str, *, state: dict[str, Any] | None, tag: str | None,
              reason: str | None, who: str | None, forced: bool = False) -> dict[str, Any]:  # fmt: skip
        seq = self._next_seq(alias, state)
        previous = self._named(state)
        who = who or _who()
        record = {"seq": seq, "parent": state["seq"] if state else None, "alias": alias, "action": action,
                  "from": state["version"] if state else None, "to": target.id, "uri": target.uri, "digest": target.digest,
                  "who": who, "when": _now(), "reason": reason, "forced": forced,
                  "metrics": {"to": _figures(target.meta), "from": _figures(previous.meta) if previous else None}}  # fmt: skip
        pointer = {"alias": alias, "version": target.id, "uri": target.uri, "digest": target.digest, "seq": seq,
                   "updated_at": record["when"], "updated_by": who}  # fmt: skip
        try:
            storage.write_new(self._record_uri(alias, seq), _json(record))
            storage.replace_tagged(self.pointer_uri(alias), _json(pointer), tag)  # the pointer: written last
        except storage.PreconditionFailed:
            raise ConflictError(f"alias {alias} was moved by another promotion at the same time; nothing changed. "
                                f"Look again (pneumonet models history --alias {alias}) and retry") from None  # fmt: skip
        return record

    def promote(self, version: str, alias: str, *, force: bool = False, reason: str | None = None,
                who: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Point ``alias`` at ``version``; refused when its validation ROC-AUC is below the current one's, unless ``force``."""
        target = self.get(version)
        state, tag = self._pointer(alias)
        if state and state["version"] == target.id:
            raise RegistryError(f"alias {alias} already names {target.id}")
        current = self._named(state)
        if current and current.roc_auc is not None and not force:
            if target.roc_auc is None or target.roc_auc < current.roc_auc:
                mine = "no validation ROC-AUC" if target.roc_auc is None else f"validation ROC-AUC {target.roc_auc:.4f}"
                raise RegistryError(
                    f"refusing to promote {target.id} to {alias}: {mine}, but {current.id} (the current one) has "
                    f"{current.roc_auc:.4f}; pass --force (and --reason) to promote it anyway"
                )
        return self._move(alias, target, "promote", state=state, tag=tag, reason=reason, who=who, forced=force)

    def rollback(self, alias: str, *, reason: str | None = None, who: str | None = None) -> dict[str, Any]:
        """Undo the last promotion still in effect: the alias goes back to the version it named before."""
        state, tag = self._pointer(alias)
        stack: list[str] = []
        for record in self.history(alias):
            if record["action"] == "rollback":
                stack.pop()
            else:
                stack.append(record["to"])
        if len(stack) < 2:
            raise RegistryError(f"alias {alias} has no earlier version to roll back to ({len(stack)} promotion(s) in effect)")
        return self._move(alias, self.get(stack[-2]), "rollback", state=state, tag=tag, reason=reason, who=who)


_ALIAS_TAIL = f"/{MODELS}/{ALIASES}/"


def resolve_model(ref: str) -> ResolvedModel:
    """Resolve a ``--model`` reference once: an alias pointer (``STORAGE/models/aliases/<alias>``), a
    ``STORAGE/models/<variant>/latest`` pointer, or an artifact folder (a registry version or any other).

    The result names the immutable folder to load; callers load that, never the reference again, so a
    move of the alias later does not change what a running job or endpoint serves.
    """
    uri = storage.absolute(ref)
    alias = None
    try:
        if _ALIAS_TAIL in uri and not storage.is_dir(uri):
            root, alias = uri.rsplit(_ALIAS_TAIL, 1)
            uri = Registry(root).resolve(alias).uri
        else:
            uri = resolve_artifact_uri(uri)
        meta = check_artifact(uri)
    except StorageError as exc:
        raise ArtifactError(f"model {ref}: {exc}") from None
    located = version_of(uri)
    return ResolvedModel(ref=ref, uri=uri, meta=meta, version=located[1] if located else None, alias=alias)

