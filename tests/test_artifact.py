"""Artifacts: save/load round trips for every variant, local and on S3, and every way an artifact can be broken."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import pytest

import pneumonet
from pneumonet import storage
from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.config import Config
from pneumonet.errors import ArtifactError, StorageError
from pneumonet.models import build_model, unfreeze_tail

SIZE = 32
# DenseNet121: small file (moto serves big S3 objects slowly) and, unlike MobileNetV2, useful random features.
MODEL = dict(image_size=SIZE, backbone="DenseNet121", weights="none", head_units=8, custom_filters=[8, 16], custom_dense_units=8)


def config() -> Config:
    return Config(model=MODEL)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


def train_one_step(model: keras.Model) -> None:
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.train_on_batch(pixels(4).astype("float32"), np.array([[0], [1], [0], [1]], "float32"))


def metadata(variant: str) -> dict:
    return build_metadata(
        variant=variant, config=config(), threshold=0.4, val_metrics={"roc_auc": 0.9}, manifest_digest="abc123"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, keras.Model]:
    """One trained model per variant; finetune follows the real path: reload a transfer artifact, unfreeze, train."""
    models = {}
    for variant in ("custom", "transfer"):
        models[variant] = build_model(variant, config().model, seed=0)
        train_one_step(models[variant])
    uri = save_artifact(models["transfer"], metadata("transfer"), str(tmp_path_factory.mktemp("stage") / "transfer"))
    finetune = load_artifact(uri).model
    assert unfreeze_tail(finetune, 8)
    train_one_step(finetune)
    models["finetune"] = finetune
    return models


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid custom artifact that error tests copy and then break."""
    return Path(save_artifact(trained["custom"], metadata("custom"), str(tmp_path_factory.mktemp("good") / "art")))


@pytest.fixture()
def broken(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(saved, target)
    return target


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("variant", ["custom", "transfer", "finetune"])
def test_round_trip_gives_the_same_predictions(trained, variant: str, where: str, tmp_path: Path, request) -> None:
    model = trained[variant]
    uri = f"{request.getfixturevalue('s3_bucket')}/models/{variant}" if where == "s3" else str(tmp_path / variant)
    meta = metadata(variant)
    returned = save_artifact(model, meta, uri)
    assert returned == (uri if where == "s3" else str(Path(uri).absolute()))
    assert "version" not in meta  # the caller's dict is not modified

    artifact = load_artifact(uri)
    digest = hashlib.sha256(storage.read_bytes(storage.join(uri, "model.keras"))).hexdigest()[:12]
    assert artifact.version == digest
    assert artifact.name == f"pneumonet-{variant}-{digest}"
    assert artifact.meta == {**meta, "version": digest, "name": artifact.name}
    assert (artifact.threshold, artifact.image_size, artifact.class_names) == (0.4, SIZE, ["NORMAL", "PNEUMONIA"])

    images = pixels(10, seed=1)
    expected = np.asarray(model(images.astype("float32"), training=False))[:, 0]
    got = artifact.predict_proba(images, batch_size=4)
    assert got.shape == (10,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(artifact.model.weights) == len(model.weights)
    for saved_var, loaded_var in zip(model.weights, artifact.model.weights):
        np.testing.assert_array_equal(np.asarray(saved_var), np.asarray(loaded_var), err_msg=saved_var.path)


def test_name_is_kept_when_given(trained, tmp_path: Path) -> None:
    uri = save_artifact(trained["custom"], {**metadata("custom"), "name": "chest-v1"}, str(tmp_path / "a"))
    assert load_artifact(uri).name == "chest-v1"


def test_metadata_is_written_last(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(Path(uri).name), real(uri, data)))
    save_artifact(trained["custom"], metadata("custom"), str(tmp_path / "a"))
    assert written == ["model.keras", "pneumonet.json"]


def test_an_interrupted_overwrite_is_not_loadable(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = save_artifact(trained["custom"], metadata("custom"), str(tmp_path / "a"))
    real = storage.write_bytes

    def fail_on_model(target: str, data: bytes) -> None:
        if target.endswith("model.keras"):
            raise StorageError(f"{target}: connection reset")
        real(target, data)

    monkeypatch.setattr(storage, "write_bytes", fail_on_model)
    with pytest.raises(StorageError):
        save_artifact(trained["transfer"], metadata("transfer"), uri)
    with pytest.raises(ArtifactError, match="pneumonet.json is missing"):
        load_artifact(uri)


# --- predict_proba ----------------------------------------------------------------------------------------


def test_predict_proba_checks_its_input_and_batches(saved: Path) -> None:
    artifact = load_artifact(str(saved))
    images = pixels(5)
    np.testing.assert_allclose(artifact.predict_proba(images, batch_size=2), artifact.predict_proba(images), atol=1e-6)
    assert artifact.predict_proba(images[:0]).shape == (0,)
    for bad in (pixels(2)[:, :16], pixels(2)[..., 0], np.repeat(pixels(2), 3, axis=-1)):
        with pytest.raises(ValueError, match=f"\\(N, {SIZE}, {SIZE}, 1\\)"):
            artifact.predict_proba(bad)
    with pytest.raises(ValueError, match="uint8"):
        artifact.predict_proba(images.astype("float32"))


# --- broken artifacts -------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    uri = str(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="does not exist") as info:
        load_artifact(uri)
    assert uri in str(info.value)


def test_missing_s3_prefix(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/models/nothing"
    with pytest.raises(ArtifactError, match="does not exist") as info:
        load_artifact(uri)
    assert uri in str(info.value)


def test_missing_metadata(broken: Path) -> None:
    (broken / "pneumonet.json").unlink()
    with pytest.raises(ArtifactError, match=f"{broken}.*pneumonet.json is missing"):
        load_artifact(str(broken))


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format_version": 1}', "lacks required keys variant, image_size, threshold"),
    ],
)
def test_bad_metadata(broken: Path, text: str, why: str) -> None:
    (broken / "pneumonet.json").write_text(text)
    with pytest.raises(ArtifactError, match=why) as info:
        load_artifact(str(broken))
    assert str(broken) in str(info.value)


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("format_version", 2, "format_version 2"),
        ("threshold", 1.5, "threshold"),
        ("image_size", 64, "image_size 64"),
        ("class_names", ["PNEUMONIA"], "class_names"),
    ],
)
def test_inconsistent_metadata(broken: Path, key: str, value, why: str) -> None:
    meta = json.loads((broken / "pneumonet.json").read_text())
    (broken / "pneumonet.json").write_text(json.dumps({**meta, key: value}))
    with pytest.raises(ArtifactError, match=why):
        load_artifact(str(broken))


def test_missing_model(broken: Path) -> None:
    (broken / "model.keras").unlink()
    with pytest.raises(ArtifactError, match=f"{broken}.*model.keras is missing"):
        load_artifact(str(broken))


def test_replaced_model(broken: Path, trained) -> None:
    trained["transfer"].save(broken / "model.keras")
    with pytest.raises(ArtifactError, match="does not match version"):
        load_artifact(str(broken))


def test_unloadable_model(broken: Path) -> None:
    garbage = b"PK\x03\x04 this is not a keras archive"
    (broken / "model.keras").write_bytes(garbage)
    meta = json.loads((broken / "pneumonet.json").read_text())
    meta["version"] = hashlib.sha256(garbage).hexdigest()[:12]
    (broken / "pneumonet.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=f"{broken}.*model.keras cannot be loaded"):
        load_artifact(str(broken))


# --- metadata ---------------------------------------------------------------------------------------------


def test_build_metadata_describes_the_model() -> None:
    cfg = config()
    meta = build_metadata(
        variant="transfer",
        config=cfg,
        threshold=0.3,
        val_metrics={"roc_auc": 0.95},
        manifest_digest="d1",
        history={"loss": [0.7, 0.5]},
        extra={"parent": "s3://b/transfer"},
    )
    assert json.loads(json.dumps(meta)) == meta
    assert meta["format_version"] == 1 and meta["variant"] == "transfer" and meta["backbone"] == "DenseNet121"
    assert meta["image_size"] == SIZE
    assert meta["input"] == {"channels": 1, "dtype": "uint8", "resize": "bilinear", "color": "grayscale", "range": [0, 255]}
    assert "densenet.preprocess_input" in meta["preprocessing"]
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["positive_class"] == "PNEUMONIA"
    assert meta["threshold"] == 0.3
    assert meta["threshold_policy"] == {"policy": "min_sensitivity", "min_sensitivity": 0.95, "fixed": 0.5}
    assert meta["val_metrics"] == {"roc_auc": 0.95} and meta["manifest_digest"] == "d1"
    assert meta["history"] == {"loss": [0.7, 0.5]} and meta["parent"] == "s3://b/transfer"
    assert Config.model_validate(meta["config"]) == cfg
    assert datetime.fromisoformat(meta["created_at"]).utcoffset().total_seconds() == 0
    assert meta["packages"]["pneumonet"] == pneumonet.__version__
    assert {"tensorflow", "keras", "numpy", "python"} <= set(meta["packages"])


def test_build_metadata_for_custom_and_bad_input() -> None:
    meta = metadata("custom")
    assert meta["backbone"] is None and "Rescaling(1/255)" in meta["preprocessing"] and meta["history"] is None
    with pytest.raises(ValueError, match="threshold"):
        build_metadata(variant="custom", config=config(), threshold=1.5, val_metrics={}, manifest_digest=None)
    with pytest.raises(ValueError, match="threshold"):
        build_metadata(
            variant="custom", config=config(), threshold=0.5, val_metrics={}, manifest_digest=None, extra={"threshold": 0.1}
        )
