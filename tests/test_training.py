"""Single-process training pieces (the loop every Ray worker runs) and the `pneumonet train` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, TINY_MODEL, _free_port

from pneumonet import storage
from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.cli import main
from pneumonet.config import load_config
from pneumonet.errors import ConfigError
from pneumonet.models.transfer import find_backbone
from pneumonet.training import loop
from pneumonet.training.checkpoint import read_checkpoint, save_checkpoint
from pneumonet.training.ingest import prepare_data
from pneumonet.training.loop import (
    FitSettings,
    FitState,
    Fitter,
    balanced_class_weight,
    fit,
)
from pneumonet.registry import load_latest_artifact, resolve_artifact_uri
from pneumonet.training.runs import RunLayout
from pneumonet.training.stages import build_stage, stage_settings, train_stage

TINY = [
    *TINY_MODEL,
    "train.epochs=1",
    "train.finetune_epochs=1",
    "train.steps_per_epoch=1",
    "data.decode_workers=2",
]


@pytest.fixture(scope="module")
def data(synthetic_root):
    return prepare_data(load_config(None, TINY), str(synthetic_root))


@pytest.fixture(scope="module")
def transfer_uri(data, tmp_path_factory) -> str:
    """A saved (untrained) transfer model to finetune from."""
    config = load_config(None, TINY)
    model = build_stage("transfer", config).model
    meta = build_metadata(variant="transfer", config=config, threshold=0.5, val_metrics={}, manifest_digest=data.digest)
    return save_artifact(model, meta, str(tmp_path_factory.mktemp("transfer") / "artifact"))


def _train(variant, config, data, **kwargs):
    """train_stage on the splits decoded in this process: (full model with the best weights, state)."""
    stage, state = train_stage(variant, config, (data.train.images, data.train.labels), (data.val.images, data.val.labels), **kwargs)
    return stage.model, state


def _scripted_validation(monkeypatch, aucs: list[float]) -> None:
    """Make fit() see these validation ROC-AUCs, one per epoch."""
    scores = iter(aucs)
    monkeypatch.setattr(
        loop, "global_validation", lambda *_: {"val_loss": 0.5, "val_accuracy": 0.5, "val_roc_auc": next(scores)}
    )


def _toy(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])


def _toy_data(n: int = 32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 2)).astype("float32"), (np.arange(n) % 2).astype("int32")


@pytest.mark.parametrize(
    "variant, extra", [("custom", []), ("transfer", []), ("transfer", ["train.cache_features=false"]), ("finetune", [])]
)
def test_each_variant_trains_a_step(data, transfer_uri, variant, extra):
    config = load_config(None, [*TINY, *extra])
    before = build_stage(variant, config, transfer_uri)
    model, state = _train(variant, config, data, transfer_uri=transfer_uri if variant == "finetune" else None)
    assert state.epoch == 1 and state.history["images"] == [8.0]
    changed = [not np.array_equal(a, b) for a, b in zip(before.model.get_weights(), model.get_weights(), strict=True)]
    assert any(changed)
    if variant == "transfer":  # the frozen backbone (and its BatchNorm statistics) never move
        frozen = find_backbone(model).get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(find_backbone(before.model).get_weights(), frozen, strict=True))


def test_finetune_unfreezes_only_the_last_layers_and_no_batchnorm(transfer_uri):
    config = load_config(None, TINY)
    stage = build_stage("finetune", config, transfer_uri)
    backbone = find_backbone(stage.model)
    tail = {id(layer) for layer in backbone.layers[-config.model.finetune_layers :]}
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.trainable_weights]
    assert trainable, "nothing was unfrozen"
    assert all(id(layer) in tail for layer in trainable)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert stage.trained is stage.model and stage.features is None


def test_class_weights_balance_the_classes_and_weight_the_loss():
    assert balanced_class_weight(np.array([0, 1, 1, 1])) == pytest.approx((2.0, 2 / 3))
    assert balanced_class_weight(np.array([1, 1])) == (1.0, 1.0)  # one class: no weighting
    config = load_config(None, ["train.class_weight=none"])
    assert stage_settings(config, (2.0, 0.5), "custom").class_weight == (1.0, 1.0)

    model = _toy()
    x, y = _toy_data(8)
    weights = (3.0, 0.5)
    fitter = Fitter(model, FitSettings(epochs=1, batch_size=8, learning_rate=1e-9, patience=1, seed=0, class_weight=weights))
    probs = model(x, training=True).numpy().reshape(-1)
    bce = -(y * np.log(probs) + (1 - y) * np.log(1 - probs))
    expected = float(np.sum(bce * np.where(y == 1, weights[1], weights[0])))
    loss_sum, _, seen = fitter._step(tf.constant(x), tf.constant(y, tf.float32), tf.constant(8.0))
    assert float(loss_sum) == pytest.approx(expected, rel=1e-4) and float(seen) == 8


def test_early_stopping_stops_and_best_weights_come_back(monkeypatch):
    _scripted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8, 0.95, 0.99])
    model = _toy()
    x, y = _toy_data()
    weights_after: dict[int, list[np.ndarray]] = {}

    def remember(_, state: FitState, __) -> None:
        weights_after[state.epoch] = [w.copy() for w in model.get_weights()]

    settings = FitSettings(epochs=6, batch_size=8, learning_rate=0.05, patience=2, seed=0)
    state = fit(model, (x, y), (x, y), settings, on_epoch_end=remember)
    assert state.epoch == 4 and state.best_epoch == 2  # epochs 3 and 4 did not beat epoch 2
    assert len(state.history["val_roc_auc"]) == 4
    for restored, best in zip(model.get_weights(), weights_after[2], strict=True):
        np.testing.assert_array_equal(restored, best)
    assert not np.array_equal(model.get_weights()[0], weights_after[4][0])


def test_checkpoint_round_trip_restores_weights_optimizer_and_state(tmp_path):
    x, y = _toy_data()
    settings = FitSettings(epochs=2, batch_size=8, learning_rate=0.01, patience=5, seed=0)
    model = _toy()
    fitter = Fitter(model, settings)
    state = fit(model, (x, y), (x, y), settings, fitter=fitter)
    state.resumed_from = [1]
    save_checkpoint(tmp_path, model, fitter.optimizer, state)

    fresh = _toy(seed=1)
    fresh_fitter = Fitter(fresh, settings)
    restored = read_checkpoint(tmp_path).restore(fresh, fresh_fitter.optimizer)
    assert (restored.epoch, restored.best_epoch, restored.history, restored.resumed_from) == (
        state.epoch, state.best_epoch, state.history, [1],
    )  # fmt: skip
    assert restored.best_auc == pytest.approx(state.best_auc)
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fresh_fitter.optimizer.iterations.numpy()) == int(fitter.optimizer.iterations.numpy()) > 0
    for a, b in zip(fresh_fitter.optimizer.variables, fitter.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixed_float16_trains_with_loss_scaling_and_exports_float32(data):
    from pneumonet.training.worker import _export, precision_policy

    with pytest.MonkeyPatch.context() as patch:  # both answers of "auto", on any machine
        patch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
        assert precision_policy("auto") == "float32"  # CPU runs stay float32
        patch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
        assert precision_policy("auto") == "mixed_float16"
    assert precision_policy("off") == "float32" and precision_policy("mixed_bfloat16") == "mixed_bfloat16"
    config = load_config(None, TINY)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        stage = build_stage("custom", config)
        settings = stage_settings(config, (1.0, 1.0), "custom", loss_scale=True)
        fitter = Fitter(stage.trained, settings)
        assert isinstance(fitter.optimizer, keras.optimizers.LossScaleOptimizer)
        state = fit(stage.trained, (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                    settings, fitter=fitter)  # fmt: skip
        assert np.isfinite(state.history["loss"][0])
        assert stage.model.get_layer("block1a_conv").compute_dtype == "float16"
        export = _export(stage, "custom", config, None)
    finally:
        keras.config.set_dtype_policy("float32")
    assert {layer.dtype_policy.name for layer in export.layers} == {"float32"}
    for a, b in zip(export.get_weights(), stage.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gather_and_digest_are_trivial_in_one_process():
    strategy = tf.distribute.get_strategy()
    rows = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(loop.gather_rows(strategy, rows), rows)
    assert loop.worker_position(strategy) == (0, 1)
    assert loop.weights_digest(_toy(0)) == loop.weights_digest(_toy(0)) != loop.weights_digest(_toy(1))


GATHER_WORKER = """
import json, os, sys
import numpy as np
import tensorflow as tf
from pneumonet.training import loop

strategy = tf.distribute.MultiWorkerMirroredStrategy()
rank = int(sys.argv[1])
rows = np.arange(rank * 100, rank * 100 + 3 * (1 - rank) + 2 * rank, dtype=float).reshape(-1, 1) * [1, -1]
print(json.dumps({"position": loop.worker_position(strategy), "rows": loop.gather_rows(strategy, rows).tolist(),
                  "min": loop.agree_min(strategy, 7 - rank), "sum": loop.all_sum(strategy, np.array([rank + 1.0])).tolist()}))
"""


def test_gather_rows_across_two_workers_keeps_worker_order_and_uneven_shards(tmp_path):
    """Two real TensorFlow workers (MultiWorkerMirroredStrategy on 127.0.0.1): 3 rows and 2 rows."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    script = tmp_path / "gather.py"
    script.write_text(GATHER_WORKER)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}}),
               "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(rank)], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1]) for proc in procs]
    expected = [[0.0, -0.0], [1.0, -1.0], [2.0, -2.0], [100.0, -100.0], [101.0, -101.0]]
    for rank, output in enumerate(outputs):
        assert output["position"] == [rank, 2]
        assert output["rows"] == expected and output["min"] == 6 and output["sum"] == [3.0]


def test_pneumonet_train_end_to_end(synthetic_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(synthetic_root.parent)  # --data as a relative path, as users type it
    main(["train", "--variant", "custom", "--data", synthetic_root.name, "--out", str(out), "--workers", "1",
          "--cpus-per-worker", "1", *TINY, "train.epochs=2", "train.steps_per_epoch=null"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "custom" in printed and f"→ {out / 'custom'}" in printed
    artifact = load_artifact(str(out / "custom"))  # published as before: OUT/<variant>/
    assert artifact.meta["epochs_run"] == 2 and len(artifact.meta["history"]["loss"]) == 2
    assert artifact.meta["data_root"] == str(synthetic_root)  # absolute: evaluate --split val works from anywhere
    run_id = artifact.meta["run_id"]
    assert (out / "models" / "custom" / run_id / "evaluation" / "test" / "metrics.json").is_file()
    assert load_latest_artifact(str(out), "custom").version == artifact.version
    assert resolve_artifact_uri(str(out / "models" / "custom")) == str(out / "models" / "custom" / run_id)
    assert (out / "manifest.parquet").is_file() and (out / "runs" / run_id / "custom").is_dir()
    assert list((out / "wandb").glob("wandb/offline-run-*"))  # offline tracking by default


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    *before, err = lines
    assert all(" INFO pneumonet: log: " in line for line in before) and len(before) <= 1, lines  # the log file named first
    assert err.startswith("pneumonet: error: "), lines
    return err


def test_bad_inputs_are_one_line_errors(synthetic_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = tmp_path / "no-such-data"
    assert str(missing) in _error_line(capsys, ["train", "--data", str(missing), "--out", out, *TINY])

    one_class = tmp_path / "one-class"
    shutil.copytree(synthetic_root, one_class)
    shutil.rmtree(one_class / "train" / "NORMAL")
    shutil.rmtree(one_class / "val" / "NORMAL", ignore_errors=True)
    assert "class" in _error_line(capsys, ["train", "--data", str(one_class), "--out", out, *TINY])

    assert "--out" in _error_line(capsys, ["train", "--data", str(synthetic_root), *TINY])

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    message = _error_line(capsys, ["evaluate", "--model", str(empty), "--data", str(synthetic_root), "--out", out])
    assert "pneumonet.json" in message and str(empty) in message
    assert not storage.exists(str(tmp_path / "out" / "runs"))  # nothing was started


def test_job_entrypoint_help_runs_from_the_repo_root():
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--variant", "--data", "--storage", "--workers", "--cpus-per-worker", "--gpus-per-worker",
                 "--resume", "--run-id", "--out", "KEY=VALUE"):  # fmt: skip
        assert flag in result.stdout


def test_an_ensemble_trains_each_member_on_its_own_loss_and_averages_them(data) -> None:
    """model.members: one artifact, several networks; the trained model has one output column per member."""
    from pneumonet.explain import gradcam

    config = load_config(None, [*TINY, "model.members=3", "train.steps_per_epoch=2"])
    stage = build_stage("custom", config)
    assert stage.trained.output_shape == (None, 3) and stage.model.output_shape == (None, 1)
    before = [np.array(w) for w in stage.model.get_weights()]
    model, state = _train("custom", config, data)
    assert state.epoch == 1
    images = data.val.images[:4].astype("float32")
    columns = np.asarray(build_stage("custom", config).trained(images))
    assert not np.allclose(columns[:, 0], columns[:, 1])  # members start from different weights
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    members = [model.get_layer(f"member{i}") for i in range(3)]
    mean = np.mean([np.asarray(member(images)) for member in members], axis=0)
    np.testing.assert_allclose(np.asarray(model(images)), mean, rtol=1e-5)
    assert gradcam(model, data.val.images[0]).shape == data.val.images[0].shape[:2]


def test_select_last_keeps_the_final_weights_and_runs_every_epoch(data, monkeypatch) -> None:
    """train.select=last: no early stop on a validation plateau, and the last epoch's weights are the model."""

    def run(*overrides: str):
        _scripted_validation(monkeypatch, [0.9, 0.5, 0.5, 0.5])
        seen: list[list[np.ndarray]] = []
        config = load_config(None, [*TINY, "train.epochs=4", "train.patience=1", *overrides])
        model, state = _train(
            "custom", config, data, on_epoch_end=lambda fitter, *_: seen.append([np.array(w) for w in fitter.model.get_weights()])
        )
        return model, state, seen

    model, state, seen = run("train.select=last")
    assert state.epoch == 4 and state.best_epoch == 1
    assert all(np.array_equal(got, want) for got, want in zip(model.get_weights(), seen[-1], strict=True))
    model, state, seen = run()  # the default: early stop after the plateau, epoch 1 kept
    assert state.epoch == 2 and len(seen) == 2
    assert all(np.array_equal(got, want) for got, want in zip(model.get_weights(), seen[0], strict=True))


@pytest.mark.parametrize(
    ("text", "reason"),
    [("{\"data_root\": \"/d\", \"config\"", "is not valid JSON"), ("[1, 2]", "lacks data_root, config"),
     ("{\"data_root\": \"/d\"}", "lacks config"), ("\udcff", "is not valid JSON")],
    ids=["cut", "list", "no-config", "binary"],
)  # fmt: skip
def test_a_damaged_run_json_is_a_clear_error(tmp_path, text, reason):
    layout = RunLayout(str(tmp_path), "r1")
    storage.write_bytes(layout.run_file, text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=rf"^cannot resume run r1: {layout.run_file} {reason}"):
        layout.read_run()


def test_a_run_json_with_an_invalid_config_is_a_clear_error(tmp_path):
    from pneumonet.training.driver import _check_resumable

    layout = RunLayout(str(tmp_path), "r1")
    with pytest.raises(ConfigError, match=r"^cannot resume run r1: the config in .*run\.json is not valid \(1 errors"):
        _check_resumable(load_config(), {"data_root": "/d", "config": {"seed": "forty-two"}}, layout)


def test_finish_stores_a_drift_reference_of_the_validation_patients(data, tmp_path):
    from pneumonet.evaluation.drift import read_reference
    from pneumonet.training.finishing import finish

    config = load_config(None, TINY)
    model, state = _train("custom", config, data)
    uri = str(tmp_path / "artifact")
    finish("custom", model, state, config, data, uri)

    artifact = load_artifact(uri)
    record = artifact.meta["drift_reference"]
    assert (record["n_images"], record["n_patients"]) == (len(data.val.labels), data.val.rows["patient_id"].nunique())
    ref = read_reference(uri, artifact.meta)
    raw, embeddings = artifact.predict_with_embeddings(data.val.images)
    np.testing.assert_allclose(ref.scores, raw, atol=1e-5)  # the validation images' own scores, in order
    assert ref.projected.shape == (len(raw), record["pca_components"]) and embeddings.shape[1] == record["embedding_dim"]
    assert ref.checks_images and record["ood"]["image_threshold"] == ref.image_threshold  # the image gate too
