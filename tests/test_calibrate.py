"""Evaluating exactly the split asked for, and site calibration (``pneumonet evaluate`` / ``calibrate``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score as skm_auc

from pneumonet import storage
from pneumonet.artifact import build_metadata, load_artifact, save_artifact
from pneumonet.cli import main
from pneumonet.config import ThresholdConfig, load_config
from pneumonet.data.catalog import manifest_digest, scan, usable, write_manifest
from pneumonet.errors import DataError
from pneumonet.evaluation.calibrate import calibrate_artifact, held_out_estimate, patient_half, rates_at, required_positives
from pneumonet.evaluation.metrics import choose_threshold
from pneumonet.evaluation.run import decode_split, evaluate_artifact
from pneumonet.scoring.predict import predict_files

SIZE = 32
MODEL = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with only test/ (~75 pneumonia, ~25 normal images): what a hospital's labelled sample looks like."""
    from pneumonet.data.synthetic import synthesize_dataset

    full = synthesize_dataset(tmp_path_factory.mktemp("full"), n=400, size=48, seed=11)
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(full / "test", root / "test")
    return root


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained tiny CNN: its scores are arbitrary but deterministic, which is all calibration needs."""
    from pneumonet.models import build_model

    config = load_config(None, MODEL)
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    return save_artifact(build_model("custom", config.model, seed=3), meta, str(tmp_path_factory.mktemp("m") / "model"))


def counts(root: Path) -> tuple[int, int]:
    rows = usable(scan(str(root)))
    return int((rows["label"] == "PNEUMONIA").sum()), int((rows["label"] == "NORMAL").sum())


def test_evaluate_a_root_that_holds_only_test(model_uri: str, site_root: Path, tmp_path: Path) -> None:
    metrics = evaluate_artifact(model_uri, str(site_root), "test", str(tmp_path / "eval"))
    positives, negatives = counts(site_root)
    assert metrics["n"] == positives + negatives
    assert metrics["threshold_source"] == "validation" and metrics["threshold"] == 0.5
    assert metrics["ci95_grouped_by"] == "patient"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == metrics["n"]


def test_evaluate_a_flat_folder(model_uri: str, site_root: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(site_root / "test" / label, flat / label)
    flat_metrics = evaluate_artifact(model_uri, str(flat), "test", str(tmp_path / "a"))
    nested_metrics = evaluate_artifact(model_uri, str(site_root), "test", str(tmp_path / "b"))
    assert flat_metrics["n"] == nested_metrics["n"]
    assert flat_metrics["roc_auc"] == pytest.approx(nested_metrics["roc_auc"])


def test_evaluate_a_missing_split_names_what_exists(model_uri: str, synthetic_root: Path, tmp_path: Path) -> None:
    only_train = tmp_path / "only-train"
    shutil.copytree(synthetic_root / "train", only_train / "train")
    with pytest.raises(DataError, match=r"no usable images in the test split \(splits found: train\)"):
        evaluate_artifact(model_uri, str(only_train), "test", str(tmp_path / "eval"))
    with pytest.raises(DataError, match=r"has no manifest\.parquet, so the images of its training run are not known"):
        evaluate_artifact(model_uri, str(synthetic_root), "train", str(tmp_path / "eval"))


def test_evaluate_val_uses_the_saved_manifest_and_names_what_changed(synthetic_root: Path, tmp_path: Path) -> None:
    """val/train come from the manifest saved with the artifact; a file gone or changed (same size) is named."""
    from pneumonet.models import build_model
    from pneumonet.data.split import plan_splits

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    config = load_config(None, [*MODEL, "data.limit_per_class=6"])
    plan = plan_splits(config, str(data))
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=plan.digest,
                          extra={"data_root": str(data)})  # fmt: skip
    uri = str(tmp_path / "model")
    write_manifest(plan.manifest, f"{uri}/manifest.parquet")  # as training writes it, before pneumonet.json
    save_artifact(build_model("custom", config.model, seed=1), meta, uri)

    metrics = evaluate_artifact(uri, str(data), "val", str(tmp_path / "eval"))
    assert metrics["n"] == len(plan.val) <= 12  # the limit of the run holds
    assert evaluate_artifact(uri, str(data), "test", str(tmp_path / "t1"))["patients_also_in_train"] == []
    trained = Path(plan.train.loc[plan.train["patient_id"].str.startswith("person"), "uri"].iloc[0])
    patient = trained.name.split("_")[0]
    shutil.copyfile(trained, data / "test" / "PNEUMONIA" / f"{patient}_bacteria_9999{trained.suffix}")
    assert evaluate_artifact(uri, str(data), "test", str(tmp_path / "t2"))["patients_also_in_train"] == [patient]

    victim = data / plan.val["uri"].iloc[0].split(str(data) + "/", 1)[1]
    original = victim.read_bytes()
    victim.write_bytes(original[:-3] + bytes(b ^ 0xFF for b in original[-3:]))
    with pytest.raises(DataError, match=rf"1 with other contents \(e\.g\. {victim.relative_to(data)}\)"):
        evaluate_artifact(uri, str(data), "val", str(tmp_path / "eval2"))
    victim.unlink()
    with pytest.raises(DataError, match=rf"of the {len(plan.val)} val images of its run .* 1 missing"):
        evaluate_artifact(uri, str(data), "val", str(tmp_path / "eval3"))
    write_manifest(plan.manifest.iloc[1:], f"{uri}/manifest.parquet")
    with pytest.raises(DataError, match="was changed after training"):
        evaluate_artifact(uri, str(data), "val", str(tmp_path / "eval4"))


def test_calibrate_chooses_the_site_threshold_and_keeps_the_model(model_uri: str, site_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibrated"
    policy = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95)
    record = calibrate_artifact(model_uri, str(site_root), str(out), policy, n_bootstrap=200)

    source, calibrated = load_artifact(model_uri), load_artifact(str(out))
    images = decode_split(source, str(site_root), "test")
    probs = source.predict_proba(images.images)
    assert record["threshold"] == choose_threshold(images.labels, probs, policy)
    assert calibrated.version == source.version  # the very same model.keras
    assert calibrated.meta["threshold"] == source.meta["threshold"] == 0.5  # training threshold kept
    assert calibrated.threshold == record["threshold"] and calibrated.threshold_source == "site"
    sample = record["sample"]
    assert sample["n"] == len(images.labels) and sample["manifest_digest"] == manifest_digest(images.rows)
    assert record["at_site_threshold"]["sensitivity"] >= 0.95
    assert record["at_site_threshold"]["ci95_grouped_by"] == "patient"
    assert record["at_training_threshold"]["threshold"] == 0.5
    patients = images.rows["patient_id"].to_numpy()
    assert record["held_out_estimate"] == held_out_estimate(images.labels, probs, patients, policy)

    # Every door decides with the site threshold and says so.
    metrics = evaluate_artifact(str(out), str(site_root), "test", str(tmp_path / "eval"))
    assert metrics["threshold"] == record["threshold"] and metrics["threshold_source"] == "site"
    assert metrics["sensitivity"] >= 0.95
    uri = images.rows["uri"].iloc[0]
    assert predict_files(str(out), [uri])[0]["threshold_source"] == "site"
    assert (out / "evaluation" / "site" / "roc_curve.png").exists()
    assert (out / "evaluation" / "site" / "predictions.csv").exists()


def test_the_held_out_estimate_judges_each_threshold_on_the_other_patients() -> None:
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(60), 2)  # two images a patient: halves must keep them together
    labels = (patients % 3 != 0).astype(int)
    probs = np.clip(labels * 0.35 + rng.normal(0.3, 0.2, len(labels)), 0, 1)  # overlapping classes
    policy = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95)

    half = patient_half(patients, np.random.default_rng(0))
    assert not set(patients[half]) & set(patients[~half]) and abs(half.mean() - 0.5) < 0.05

    one = held_out_estimate(labels, probs, patients, policy, splits=1, seed=7)
    fit = patient_half(patients, np.random.default_rng(7))
    expected = rates_at(labels[~fit], probs[~fit], choose_threshold(labels[fit], probs[fit], policy))
    assert one == {**expected, "splits": 1}
    in_sample = rates_at(labels, probs, choose_threshold(labels, probs, policy))
    many = held_out_estimate(labels, probs, patients, policy)
    assert many["splits"] == 50 and many["sensitivity"] < in_sample["sensitivity"]  # chosen on itself, it flatters
    separable = held_out_estimate(labels, labels * 0.8 + 0.1, patients, policy)
    assert separable["accuracy"] == separable["sensitivity"] == separable["specificity"] == 1.0
    with pytest.raises(DataError, match="both classes"):
        held_out_estimate(np.ones(8, int), np.full(8, 0.9), np.arange(8), policy)


def test_calibrate_refuses_a_sample_too_small(model_uri: str, site_root: Path, tmp_path: Path) -> None:
    positives, _ = counts(site_root)
    assert 60 <= positives < 300, "the fixture must support 0.95 but not 0.99"
    assert required_positives(ThresholdConfig(min_sensitivity=0.99)) == 300
    with pytest.raises(DataError, match=rf"too small .*{positives} PNEUMONIA images, and sensitivity >= 0.99 needs at least 300"):
        calibrate_artifact(model_uri, str(site_root), str(tmp_path / "c"), ThresholdConfig(min_sensitivity=0.99))
    assert not (tmp_path / "c").exists()


def test_calibrate_refuses_to_overwrite_its_source(model_uri: str, site_root: Path) -> None:
    from pneumonet.errors import ArtifactError

    with pytest.raises(ArtifactError, match="refusing to overwrite the source artifact"):
        calibrate_artifact(model_uri, str(site_root), model_uri, ThresholdConfig(), n_bootstrap=0)


def test_calibrate_cli_from_and_to_s3(model_uri: str, site_root: Path, s3_bucket: str, capsys) -> None:
    storage.upload_dir(site_root, f"{s3_bucket}/site")
    storage.upload_dir(model_uri, f"{s3_bucket}/models/m")
    main(["calibrate", "--model", f"{s3_bucket}/models/m", "--data", f"{s3_bucket}/site", "--out",
          f"{s3_bucket}/models/m-site", "--policy", "youden"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "site threshold" in printed and "training threshold 0.500" in printed
    assert "on patients it was not chosen on" in printed
    calibrated = load_artifact(f"{s3_bucket}/models/m-site")
    assert calibrated.threshold_source == "site"
    assert calibrated.meta["site_calibration"]["policy"]["policy"] == "youden"


def test_calibrate_cli_rejects_a_bad_sensitivity(model_uri: str, site_root: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", model_uri, "--data", str(site_root), "--out", str(tmp_path / "x"),
              "--min-sensitivity", "1.5"])  # fmt: skip
    assert "--min-sensitivity must be between 0 and 1" in capsys.readouterr().err


def test_a_damaged_site_threshold_is_refused(model_uri: str, tmp_path: Path) -> None:
    from pneumonet.errors import ArtifactError

    target = tmp_path / "m"
    shutil.copytree(model_uri, target)
    meta = json.loads((target / "pneumonet.json").read_text())
    meta["site_calibration"] = {"threshold": 1.7}
    (target / "pneumonet.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"site_calibration.threshold must be a number in \[0, 1\]"):
        load_artifact(str(target))



@pytest.fixture(scope="module")
def ranking_model_uri(site_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model that ranks the sample the right way round: a logistic function of the mean pixel value."""
    import keras

    from pneumonet.data.pipeline import load_image_set

    config = load_config(None, MODEL)
    images = load_image_set(usable(scan(str(site_root))), SIZE, config.data)
    means = images.images.reshape(len(images), -1).mean(axis=1)
    sign = 1.0 if means[images.labels == 1].mean() > means[images.labels == 0].mean() else -1.0
    middle = float(np.median(means))
    image = keras.Input((SIZE, SIZE, 1))
    mean = keras.layers.GlobalAveragePooling2D()(image)
    output = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(sign * 0.2),
                                bias_initializer=keras.initializers.Constant(-sign * 0.2 * middle))(mean)  # fmt: skip
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    return save_artifact(keras.Model(image, output), meta, str(tmp_path_factory.mktemp("ranking") / "model"))


def test_platt_recalibration_keeps_the_order_and_is_measured_out_of_sample(
    ranking_model_uri: str, site_root: Path, tmp_path: Path
) -> None:
    from scipy.stats import spearmanr

    out = tmp_path / "platt"
    source = load_artifact(ranking_model_uri)
    images = decode_split(source, str(site_root), "test")
    raw = source.predict_proba(images.images)
    assert skm_auc(images.labels, raw) > 0.55, "the fixture must rank the sample the right way round"
    record = calibrate_artifact(ranking_model_uri, str(site_root), str(out), ThresholdConfig(), n_bootstrap=0, recalibrate=True)
    platt = record["platt"]
    assert platt["a"] > 0 and {"brier_before", "brier_after", "ece_before", "ece_after"} <= set(platt)
    scaled = load_artifact(str(out)).predict_proba(images.images)
    assert not np.allclose(scaled, raw)
    assert spearmanr(scaled, raw).statistic == pytest.approx(1.0)
    assert record["at_site_threshold"]["sensitivity"] >= 0.95
    # Calibrating the calibrated artifact again starts from the model's own probabilities.
    again = calibrate_artifact(str(out), str(site_root), str(tmp_path / "again"), ThresholdConfig(), n_bootstrap=0)
    assert "platt" not in again and again["threshold"] == choose_threshold(images.labels, raw, ThresholdConfig())


def test_platt_refuses_a_model_that_ranks_the_site_inversely(ranking_model_uri: str, site_root: Path, tmp_path: Path) -> None:
    from pneumonet.evaluation.calibrate import platt_record

    labels = usable(scan(str(site_root)))["label"].eq("PNEUMONIA").to_numpy().astype(int)
    probs = np.where(labels == 1, 0.2, 0.8) + np.linspace(0, 0.01, len(labels))
    with pytest.raises(DataError, match="no better than chance"):
        platt_record(labels, probs, np.arange(len(labels)))
