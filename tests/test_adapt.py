"""Site adaptation (``pneumonet adapt``): fine-tuning on the site sample, judged out of fold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.cli import main
from pneumonet.config import AdaptConfig, ThresholdConfig, load_config
from pneumonet.errors import ArtifactError, ConfigError, DataError
from pneumonet.evaluation.metrics import choose_threshold
from pneumonet.evaluation.run import decode_split
from pneumonet.training import adapt
from pneumonet.training.adapt import adapt_artifact, patient_folds

SIZE = 32
MODEL = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8", "model.members=2"]
# An untrained source model must learn here, so faster than the built-in setting for a trained one.
QUICK = AdaptConfig(folds=4, epochs=6, learning_rate=3e-3, repeat=3)
POLICY = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95)


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site sample the model can learn: pneumonia images brighter than normal ones, overlapping a little.

    "Version 3" names, two images per patient: 32 pneumonia and 20 normal patients.
    """
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(5)
    for label, kind, patients, first_id, mean in (("PNEUMONIA", "BACTERIA", 32, 100, 150), ("NORMAL", "NORMAL", 20, 2000, 95)):
        folder = root / "test" / label
        folder.mkdir(parents=True)
        for patient in range(first_id, first_id + patients):
            for image in (1, 2):
                pixels = np.clip(rng.normal(mean + rng.normal(0, 18), 30, (48, 48)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{kind}-{patient}-{image:04d}.jpeg", quality=95)
    return root


def _artifact(tmp_path_factory: pytest.TempPathFactory, variant: str) -> str:
    from pneumonet.models import build_model

    config = load_config(None, MODEL)
    meta = build_metadata(variant=variant, config=config, threshold=0.4, val_metrics={"roc_auc": 0.9}, manifest_digest=None)
    return save_artifact(build_model("custom", config.model, seed=1), meta, str(tmp_path_factory.mktemp(variant) / "model"))


@pytest.fixture(scope="module")
def source_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained two-member ensemble: it ranks the site at chance before adapting."""
    return _artifact(tmp_path_factory, "custom")


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _weights_digest(model) -> str:
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()


@pytest.fixture(scope="module")
def adapted(source_uri: str, site_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One adaptation, with every fine-tuning call's training and monitored images recorded."""
    calls: list[tuple[set[str], set[str]]] = []
    starts: list[str] = []  # the weights each fine-tuning started from
    real = adapt.fine_tune

    def spy(model, images, labels, monitor, *args, **kwargs):
        calls.append(({_digest(i) for i in images}, {_digest(i) for i in monitor[0]}))
        starts.append(_weights_digest(model))
        return real(model, images, labels, monitor, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(adapt, "fine_tune", spy)
    try:
        out = str(tmp_path_factory.mktemp("adapted") / "model")
        record = adapt_artifact(source_uri, str(site_root), out, POLICY, QUICK, n_bootstrap=50)
    finally:
        patch.undo()
    return {"record": record, "out": out, "calls": calls, "starts": starts}


def test_folds_hold_whole_patients_and_both_classes() -> None:
    labels = np.array([1] * 30 + [0] * 20)
    patients = np.array([f"p{i // 2}" for i in range(30)] + [f"n{i // 2}" for i in range(20)])
    folds = patient_folds(labels, patients, 4, seed=0)
    assert sorted(np.concatenate(folds)) == list(range(50))
    for held in folds:
        assert set(labels[held]) == {0, 1}
        others = np.setdiff1d(np.arange(50), held)
        assert not set(patients[held]) & set(patients[others])
    with pytest.raises(DataError, match="needs at least 11 patients of each class"):
        patient_folds(labels, patients, 11, seed=0)


def test_each_image_is_scored_by_a_model_that_never_saw_its_patient(adapted: dict, source_uri: str, site_root: Path) -> None:
    images = decode_split(load_artifact(source_uri), str(site_root), "test")
    patient_of = {_digest(i): p for i, p in zip(images.images, images.rows["patient_id"], strict=True)}
    *folds, final = adapted["calls"]
    assert len(folds) == QUICK.folds
    scored: set[str] = set()
    for trained, held_out in folds:
        assert not {patient_of[d] for d in trained} & {patient_of[d] for d in held_out}
        scored |= held_out
    assert scored == set(patient_of)  # every image was held out once
    assert final[0] == set(patient_of)  # the deployed model learns from the whole sample
    # Every fold model, and the deployed one, starts from the source's weights, not from another fold's.
    assert adapted["starts"] == [_weights_digest(load_artifact(source_uri).model)] * (QUICK.folds + 1)


def test_adapting_learns_the_site_and_the_threshold_comes_from_out_of_fold_scores(
    adapted: dict, source_uri: str, site_root: Path
) -> None:
    record, source = adapted["record"], load_artifact(source_uri)
    assert record["roc_auc_before"] < 0.75 and record["roc_auc_out_of_fold"] > 0.9, record
    assert [fold["fold"] for fold in record["folds"]] == [1, 2, 3, 4]
    model = load_artifact(adapted["out"])
    assert model.version != source.version  # new weights, new version
    assert model.threshold_source == "site" and model.meta["threshold"] == pytest.approx(0.4)  # training threshold kept
    site, adaptation = model.meta["site_calibration"], model.meta["site_adaptation"]
    assert adaptation["source"]["version"] == source.version and adaptation["settings"]["folds"] == 4
    assert site["scores"] == "out_of_fold" and site["sample"]["n"] == 104 and site["sample"]["n_patients"] == 52
    predictions = pd.read_csv(Path(adapted["out"]) / "evaluation" / "site" / "predictions.csv")
    labels = (predictions["label"] == "PNEUMONIA").to_numpy().astype(int)
    assert roc_auc_score(labels, predictions["probability"]) == pytest.approx(record["roc_auc_out_of_fold"])
    assert site["threshold"] == pytest.approx(choose_threshold(labels, predictions["probability"].to_numpy(), POLICY))
    # The figures at the training threshold are the source model's, for comparison.
    source_probs = source.predict_proba(decode_split(source, str(site_root), "test").images)
    before = np.mean((source_probs >= 0.4) == decode_split(source, str(site_root), "test").labels)
    assert site["at_training_threshold"]["accuracy"] == pytest.approx(before)
    assert (Path(adapted["out"]) / "evaluation" / "site" / "roc_curve.png").stat().st_size > 0


def test_adapt_refuses_its_source_other_variants_and_small_samples(
    source_uri: str, site_root: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with pytest.raises(ArtifactError, match="refusing to overwrite the source artifact"):
        adapt_artifact(source_uri, str(site_root), source_uri, POLICY, QUICK)
    with pytest.raises(ConfigError, match="adapt fine-tunes the custom CNN"):
        adapt_artifact(_artifact(tmp_path_factory, "transfer"), str(site_root), str(tmp_path / "t"), POLICY, QUICK)
    strict = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.98)
    with pytest.raises(DataError, match="too small to calibrate on: 64 PNEUMONIA images"):
        adapt_artifact(source_uri, str(site_root), str(tmp_path / "s"), strict, QUICK)
    assert not (tmp_path / "s" / "pneumonet.json").exists()


def test_adapt_cli_takes_overrides_and_evaluate_uses_the_site_threshold(
    source_uri: str, site_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "adapted"
    main(["adapt", "--model", source_uri, "--data", str(site_root), "--out", str(out), "adapt.folds=2",
          "adapt.epochs=1", "--seed", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("held-out images") == 2 and "out of fold" in printed, printed
    meta = json.loads((out / "pneumonet.json").read_text())
    assert meta["site_adaptation"]["settings"]["epochs"] == 1 and meta["site_adaptation"]["seed"] == 2
    main(["evaluate", "--model", str(out), "--data", str(site_root), "--out", str(tmp_path / "eval")])
    assert "the site one" in capsys.readouterr().out
