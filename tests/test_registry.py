"""The model registry: versions, aliases, the audit log, racing promotions (folder and local S3), the W&B
mirror and the pin of a RayService overlay. Artifacts here are metadata + placeholder bytes: the
registry never loads a model (scoring and serving do, and check the bytes against the digest)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from wandb_records import offline_runs

from pneumonet import storage
from pneumonet.cli import main
from pneumonet.deploy import pinned_model, serve_patch
from pneumonet.errors import ConflictError, RegistryError
from pneumonet.registry import Registry, resolve_model, version_of


def make_version(root: str, version: str, auc: float | None, created: str = "2026-12-04T10:00:00+00:00") -> str:
    """A complete artifact folder at ROOT/models/<version> with validation ROC-AUC ``auc``."""
    variant, run_id = version.split("/")
    uri = storage.join(root, "models", variant, run_id)
    model = f"weights of {version}".encode()
    digest = hashlib.sha256(model).hexdigest()[:12]
    val = {} if auc is None else {"roc_auc": auc, "n": 40, "sensitivity": 0.9, "specificity": 0.8, "ci95": {"roc_auc": [auc - 0.05, auc]}}
    meta = {"format_version": 1, "variant": variant, "image_size": 32, "threshold": 0.4, "class_names": ["NORMAL", "PNEUMONIA"],
            "version": digest, "name": f"pneumonet-{variant}-{digest}", "val_metrics": val, "created_at": created, "run_id": run_id}  # fmt: skip
    storage.write_bytes(storage.join(uri, "model.keras"), model)
    storage.write_text(storage.join(uri, "pneumonet.json"), json.dumps(meta))
    return uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/store"


def test_versions_list_with_their_figures_and_incomplete_folders_are_not_versions(root):
    make_version(root, "custom/run-a", 0.81, "2026-12-04T09:00:00+00:00")
    make_version(root, "transfer/run-b", 0.93, "2026-12-04T10:00:00+00:00")
    storage.write_bytes(storage.join(root, "models", "transfer", "run-c", "model.keras"), b"half written")  # no pneumonet.json
    registry = Registry(root)
    versions = registry.versions()
    assert [v.id for v in versions] == ["custom/run-a", "transfer/run-b"]
    assert versions[1].describe()["val"] == {"roc_auc": 0.93, "n": 40, "sensitivity": 0.9, "specificity": 0.8,
                                             "roc_auc_ci95": [pytest.approx(0.88), 0.93]}  # fmt: skip
    with pytest.raises(RegistryError, match="transfer/run-c"):
        registry.get("transfer/run-c")
    with pytest.raises(RegistryError, match="no version name"):
        registry.get("production")


def test_promote_writes_the_log_then_the_pointer_and_readers_resolve_the_version(root):
    first, second = make_version(root, "custom/run-a", 0.81), make_version(root, "transfer/run-b", 0.93)
    registry = Registry(root)
    registry.promote("custom/run-a", "production", reason="first", who="ana")
    record = registry.promote("transfer/run-b", "production", who="ben")

    assert record["from"] == "custom/run-a" and record["to"] == "transfer/run-b" and record["seq"] == 2
    assert record["metrics"]["to"]["roc_auc"] == 0.93 and record["metrics"]["from"]["roc_auc"] == 0.81
    assert record["who"] == "ben" and record["when"] and not record["forced"]
    pointer = json.loads(storage.read_text(storage.join(root, "models", "aliases", "production")))
    assert pointer["version"] == "transfer/run-b" and pointer["seq"] == 2
    logged = storage.list_files(storage.join(root, "models", "aliases", "production.log"))
    assert [e.uri.rsplit("/", 1)[1] for e in logged] == ["00000001.json", "00000002.json"]
    assert [r["to"] for r in registry.history("production")] == ["custom/run-a", "transfer/run-b"]

    resolved = resolve_model(storage.join(root, "models", "aliases", "production"))
    assert resolved.uri == storage.absolute(second) and resolved.version == "transfer/run-b" and resolved.alias == "production"
    assert resolved.label == f"transfer/run-b:{resolved.meta['version']}"
    direct = resolve_model(first)
    assert direct.version == "custom/run-a" and direct.alias is None
    assert version_of(second) == (storage.absolute(root), "transfer/run-b")


def test_a_worse_model_is_refused_unless_forced(root):
    make_version(root, "transfer/good", 0.95)
    make_version(root, "custom/worse", 0.90)
    make_version(root, "custom/unknown", None)
    registry = Registry(root)
    registry.promote("transfer/good", "production")
    with pytest.raises(RegistryError, match=r"ROC-AUC 0\.9000, but transfer/good \(the current one\) has 0\.9500; pass --force"):
        registry.promote("custom/worse", "production")
    with pytest.raises(RegistryError, match="no validation ROC-AUC"):
        registry.promote("custom/unknown", "production")
    assert registry.resolve("production").id == "transfer/good"
    forced = registry.promote("custom/worse", "production", force=True, reason="site calibration")
    assert forced["forced"] and forced["reason"] == "site calibration"
    assert registry.resolve("production").id == "custom/worse"


def test_rollback_undoes_promotions_one_at_a_time(root):
    for i, auc in enumerate((0.90, 0.92, 0.94)):
        make_version(root, f"transfer/run-{i}", auc)
    registry = Registry(root)
    for i in range(3):
        registry.promote(f"transfer/run-{i}", "production")
    assert registry.rollback("production", reason="regression")["to"] == "transfer/run-1"
    assert registry.rollback("production")["to"] == "transfer/run-0"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("production")
    assert registry.resolve("production").id == "transfer/run-0"
    assert [r["action"] for r in registry.history("production")] == ["promote"] * 3 + ["rollback"] * 2


def test_two_promotions_racing_one_wins_and_the_loser_changes_nothing(root, monkeypatch):
    make_version(root, "custom/base", 0.80)
    make_version(root, "transfer/left", 0.90)
    make_version(root, "finetune/right", 0.91)
    Registry(root).promote("custom/base", "production")
    both_read = threading.Barrier(2, timeout=30)
    original = Registry._pointer

    def read_then_wait(self, alias):  # both racers read the pointer before either writes
        state = original(self, alias)
        both_read.wait()
        return state

    monkeypatch.setattr(Registry, "_pointer", read_then_wait)
    outcomes: dict[str, object] = {}

    def race(version: str) -> None:
        try:
            outcomes[version] = Registry(root).promote(version, "production")
        except ConflictError as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=race, args=(v,)) for v in ("transfer/left", "finetune/right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    monkeypatch.setattr(Registry, "_pointer", original)

    winners = [v for v, outcome in outcomes.items() if isinstance(outcome, dict)]
    losers = [v for v, outcome in outcomes.items() if isinstance(outcome, ConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    registry = Registry(root)
    assert registry.resolve("production").id == winners[0]
    assert [r["to"] for r in registry.history("production")] == ["custom/base", winners[0]]


def test_a_move_that_crashed_before_its_pointer_write_stays_off_the_history(root, monkeypatch):
    make_version(root, "custom/base", 0.80)
    make_version(root, "transfer/crashed", 0.90)
    make_version(root, "finetune/next", 0.91)
    registry = Registry(root)
    registry.promote("custom/base", "production")

    def crash(*_args):
        raise KeyboardInterrupt("killed between the log record and the pointer")

    monkeypatch.setattr(storage, "replace_tagged", crash)
    with pytest.raises(KeyboardInterrupt):
        registry.promote("transfer/crashed", "production")
    monkeypatch.undo()
    assert registry.resolve("production").id == "custom/base"  # readers never saw the half move
    record = registry.promote("finetune/next", "production")
    assert record["seq"] == 3 and record["parent"] == 1 and record["from"] == "custom/base"
    assert [r["to"] for r in registry.history("production")] == ["custom/base", "finetune/next"]


def test_conditional_writes_refuse_a_stale_tag_and_an_existing_object(root):
    uri = storage.join(root, "cas", "pointer")
    storage.write_new(uri, b"one")
    with pytest.raises(storage.PreconditionFailed):
        storage.write_new(uri, b"two")
    data, tag = storage.read_tagged(uri)
    storage.replace_tagged(uri, b"two", tag)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_tagged(uri, b"three", tag)  # the tag of "one": someone changed it since
    assert storage.read_bytes(uri) == b"two" and data == b"one"
    assert storage.read_tagged(storage.join(root, "cas", "absent")) is None


def test_an_alias_can_move_away_from_a_version_whose_folder_is_gone(tmp_path):
    root = str(tmp_path)
    make_version(root, "custom/gone", 0.99)
    make_version(root, "custom/next", 0.80)
    registry = Registry(root)
    registry.promote("custom/gone", "production")
    storage.delete(f"{root}/models/custom/gone")
    with pytest.raises(RegistryError, match="custom/gone"):
        registry.resolve("production")
    assert registry.promote("custom/next", "production")["from"] == "custom/gone"  # no figure to compare with
    assert registry.resolve("production").id == "custom/next"


def test_an_alias_whose_version_was_rewritten_is_refused(tmp_path):
    root = str(tmp_path)
    uri = make_version(root, "custom/run-a", 0.8)
    Registry(root).promote("custom/run-a", "production")
    meta = json.loads(storage.read_text(f"{uri}/pneumonet.json"))
    storage.write_text(f"{uri}/pneumonet.json", json.dumps({**meta, "version": "0123456789ab"}))
    with pytest.raises(RegistryError, match="rewritten"):
        resolve_model(f"{root}/models/aliases/production")


def test_cli_lists_promotes_rolls_back_and_mirrors_the_alias_to_wandb_offline(tmp_path, capsys):
    root = str(tmp_path / "store")
    make_version(root, "custom/run-a", 0.81)
    make_version(root, "transfer/run-b", 0.93)
    config = tmp_path / "tracking.yaml"
    config.write_text(yaml.safe_dump({"tracking": {"mode": "offline", "dir": str(tmp_path / "wandb")}}))
    for argv in (["promote", "custom/run-a"], ["promote", "transfer/run-b"], ["rollback"]):
        main(["models", *argv, "--alias", "production", "--storage", root, "--config", str(config), "--who", "ops"])
    out = capsys.readouterr().out
    assert "production: custom/run-a → transfer/run-b, val ROC-AUC 0.9300 (promote #2 by ops)" in out
    assert "production: transfer/run-b → custom/run-a" in out

    main(["models", "--storage", root])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["VERSION", "CREATED", "VAL"]
    assert [line.split()[0] for line in table[1:]] == ["custom/run-a", "transfer/run-b"]
    assert table[1].endswith("production") and "0.8100 (0.760-0.810)" in table[1]
    main(["models", "history", "--alias", "production", "--storage", root, "--json"])
    assert [r["action"] for r in json.loads(capsys.readouterr().out)] == ["promote", "promote", "rollback"]

    runs = [run for run in offline_runs(tmp_path / "wandb").values() if run.job_type == "promote"]
    assert len(runs) == 3
    moves = [(art["name"], art["metadata"]["uri"]) for run in runs for art in run.artifacts if "production" in art["aliases"]]
    assert sorted(moves) == sorted([("pneumonet", f"{root}/models/custom/run-a")] * 2 + [("pneumonet", f"{root}/models/transfer/run-b")])


def test_pin_rewrites_only_the_model_line_of_the_overlay(tmp_path, capsys):
    root = str(tmp_path / "store")
    make_version(root, "transfer/run-b", 0.93)
    Registry(root).promote("transfer/run-b", "production")
    overlay = tmp_path / "dev"
    shutil.copytree(REPO / "k8s" / "overlays" / "dev", overlay)
    patch = serve_patch(overlay)
    before = patch.read_text()

    main(["models", "pin", "production", str(overlay), "--storage", root])

    assert pinned_model(patch) == f"{root}/models/transfer/run-b"
    changed = [(a, b) for a, b in zip(before.splitlines(), patch.read_text().splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].strip() == f"model: {root}/models/transfer/run-b"
    assert "kubectl apply -k" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["models", "pin", "staging", str(overlay), "--storage", root])  # no such alias: one line, exit 1
    assert "alias 'staging' does not exist" in capsys.readouterr().err


def test_registry_commands_need_to_know_which_registry(monkeypatch, capsys):
    monkeypatch.delenv("PNEUMONET_STORAGE", raising=False)
    with pytest.raises(SystemExit):
        main(["models"])
    assert "--storage" in capsys.readouterr().err
    assert not Path("store").exists()
