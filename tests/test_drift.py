"""Drift and out-of-distribution alarms: the statistics, the reference in the artifact, ``drift-reference``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA

from pneumonet.artifact import DRIFT_FILE, DRIFT_KEY, build_metadata, derive_artifact, load_artifact, save_artifact
from pneumonet.cli import main
from pneumonet.config import DriftConfig, load_config
from pneumonet.data.catalog import write_manifest
from pneumonet.errors import ArtifactError
from pneumonet.evaluation.drift import (
    Reference,
    build_reference,
    holm,
    mmd_test,
    read_reference,
    reference_files,
    window_tests,
)

SIZE = 32
MODEL = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]


def gaussian(rng: np.random.Generator, n: int, dim: int = 12, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian embeddings: a few strong directions, the rest weak (like a network's features)."""
    scales = np.linspace(3.0, 0.2, dim)
    return rng.normal(size=(n, dim)) * scales + shift


@pytest.fixture(scope="module")
def reference() -> tuple[Reference, dict]:
    rng = np.random.default_rng(0)
    n = 1200
    scores = rng.beta(2, 5, n)
    return build_reference(scores, gaussian(rng, n), np.arange(n) // 3, DriftConfig(pca_components=4, max_vectors=1000), seed=1)


def test_the_distance_is_hotellings_t2_plus_the_residual_in_units_of_the_references_mean() -> None:
    rng = np.random.default_rng(1)
    train, new = gaussian(rng, 500), gaussian(rng, 20, shift=0.5)
    ref, _ = build_reference(np.zeros(500), train, np.arange(500), DriftConfig(pca_components=4))
    pca = PCA(n_components=4, svd_solver="full").fit(train)
    t2 = (pca.transform(new) ** 2 / pca.explained_variance_).sum(axis=1)
    residual = ((new - pca.inverse_transform(pca.transform(new))) ** 2).sum(axis=1)
    reference_residual = ((train - pca.inverse_transform(pca.transform(train))) ** 2).sum(axis=1).mean()
    np.testing.assert_allclose(ref.distance(new), t2 + residual / reference_residual, rtol=1e-6)
    assert ref.project(train).std(axis=0) == pytest.approx(np.ones(4), rel=0.01)  # whitened


def test_the_gate_flags_about_the_quantile_of_new_in_distribution_images_and_every_far_one(reference) -> None:
    ref, record = reference
    rng = np.random.default_rng(2)
    inside, reasons = ref.gate(gaussian(rng, 4000))
    assert 0.003 <= 1 - inside.mean() <= 0.025  # ood_quantile 0.99, held out: about 1 %
    assert all((reason is None) == ok for ok, reason in zip(inside, reasons))
    far, reasons = ref.gate(gaussian(rng, 200, shift=10.0))  # another distribution altogether
    assert not far.any() and "beyond" in reasons[0]
    assert record["n_vectors"] == 1000 and record["n_images"] == 1200 and record["pca_components"] == 4
    assert record["ood"]["threshold"] == ref.ood_threshold and 0.005 <= record["ood"]["held_out_flagged"] <= 0.02


def test_window_tests_stay_quiet_on_the_same_distribution_and_fire_on_a_shift(reference) -> None:
    ref, _ = reference
    config = DriftConfig(pca_components=4, permutations=300)
    rng = np.random.default_rng(3)

    def window(n: int, score_a: float = 2, shift: float = 0.0) -> dict:
        embeddings = gaussian(rng, n, shift=shift)
        return window_tests(ref, rng.beta(score_a, 5, n), ref.project(embeddings), ref.gate(embeddings)[0], config, seed=4)

    quiet = [window(200) for _ in range(5)]
    assert all(v["verdict"] == "no drift" for v in quiet), [v["tests"] for v in quiet]
    scores_moved = window(200, score_a=4)
    assert scores_moved["verdict"] == "drift" and scores_moved["tests"]["scores_ks"]["p_adjusted"] <= 0.01
    features_moved = window(200, shift=0.6)
    assert features_moved["verdict"] == "drift" and features_moved["tests"]["embeddings_mmd"]["p_value"] <= 1 / 301 + 1e-12
    assert set(features_moved["tests"]) == {"scores_ks", "embeddings_mmd", "ood_share"}
    assert window(20)["verdict"] == "insufficient data"


def test_holm_and_the_mmd_permutation_p_value() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(5)
    same = [mmd_test(rng.normal(size=(60, 3)), rng.normal(size=(80, 3)), 200, rng)["p_value"] for _ in range(40)]
    assert 0.3 < np.mean(same) < 0.7  # uniform under the null
    assert mmd_test(rng.normal(size=(60, 3)), rng.normal(1.0, size=(80, 3)), 200, rng)["p_value"] == pytest.approx(1 / 201)


def tiny_artifact(path: Path, seed: int = 3, meta_extra: dict | None = None, files: dict | None = None) -> str:
    from pneumonet.models import build_model

    config = load_config(None, MODEL)
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=None, extra=meta_extra)
    return save_artifact(build_model("custom", config.model, seed=seed), meta, str(path), files)


def test_the_reference_travels_with_the_artifact_and_is_checked(reference, tmp_path: Path) -> None:
    ref, record = reference
    record, files = reference_files(ref, record)
    uri = tiny_artifact(tmp_path / "m", meta_extra={DRIFT_KEY: record}, files=files)
    artifact = load_artifact(uri)
    again = read_reference(uri, artifact.meta)
    np.testing.assert_array_equal(again.projected, ref.projected)
    assert again.ood_threshold == ref.ood_threshold
    # Calibration derives artifacts: the reference is copied along.
    derived = derive_artifact(artifact, {**artifact.meta, "note": "x"}, str(tmp_path / "derived"))
    assert read_reference(derived, load_artifact(derived).meta).ood_rate == ref.ood_rate
    data = bytearray(files[DRIFT_FILE])
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m" / DRIFT_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not have the sha256"):
        read_reference(uri, artifact.meta)
    assert read_reference(tiny_artifact(tmp_path / "old"), load_artifact(str(tmp_path / "old")).meta) is None


def test_one_forward_pass_gives_the_score_and_the_penultimate_embedding(tmp_path: Path) -> None:
    artifact = load_artifact(tiny_artifact(tmp_path / "m"))
    images = np.random.default_rng(6).integers(0, 256, (5, SIZE, SIZE, 1), dtype=np.uint8)
    raw, embeddings = artifact.predict_with_embeddings(images, batch_size=2)
    np.testing.assert_allclose(raw, artifact.predict_proba(images), atol=1e-6)
    dense = artifact.model.get_layer("dense")
    import keras

    expected = keras.Model(artifact.model.input, dense.output).predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    assert embeddings.shape == (5, 8)


def test_drift_reference_adds_a_reference_of_the_validation_patients(synthetic_root: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from pneumonet.models import build_model
    from pneumonet.data.split import plan_splits

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    config = load_config(None, MODEL)
    plan = plan_splits(config, str(data))
    meta = build_metadata(variant="custom", config=config, threshold=0.5, val_metrics={}, manifest_digest=plan.digest,
                          extra={"data_root": str(data)})  # fmt: skip
    uri = str(tmp_path / "model")
    write_manifest(plan.manifest, f"{uri}/manifest.parquet")
    save_artifact(build_model("custom", config.model, seed=1), meta, uri)
    out = tmp_path / "with-reference"

    main(["drift-reference", "--model", uri, "--data", str(data), "--out", str(out), "drift.pca_components=3"])

    assert "drift reference:" in capsys.readouterr().out
    source, derived = load_artifact(uri), load_artifact(str(out))
    assert derived.version == source.version and DRIFT_KEY not in source.meta
    record = derived.meta[DRIFT_KEY]
    assert record["n_images"] == len(plan.val) and record["pca_components"] == 3
    assert record["source"]["version"] == source.version
    ref = read_reference(str(out), derived.meta)
    from pneumonet.evaluation.run import decode_split

    images = decode_split(source, str(data), "val")
    raw, _ = source.predict_with_embeddings(images.images)
    np.testing.assert_allclose(np.sort(ref.scores), np.sort(raw), atol=1e-6)
    assert (out / "manifest.parquet").exists() and json.loads((out / "pneumonet.json").read_text())[DRIFT_KEY]["sha256"]
    with pytest.raises(SystemExit):  # the source is never overwritten
        main(["drift-reference", "--model", uri, "--data", str(data), "--out", uri])


def test_a_replicas_window_is_bounded_retested_as_images_arrive_and_logs_each_turn(reference, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from pneumonet.scoring.online import DriftWindow

    ref, _ = reference
    window = DriftWindow(ref, DriftConfig(window=100, check_every=25, min_images=50, permutations=200), "m:1")
    rng = np.random.default_rng(7)
    caplog.set_level("INFO", logger="pneumonet.scoring.online")

    async def feed(shift: float, batches: int) -> None:
        for _ in range(batches):
            embeddings = gaussian(rng, 25, shift=shift)
            window.add(rng.beta(2, 5, 25), embeddings)
            await asyncio.sleep(0.5)  # the re-test runs in a thread while images keep coming
            for _ in range(100):
                if not window._checking:
                    break
                await asyncio.sleep(0.05)

    asyncio.run(feed(0.0, 4))
    assert window.verdict == "no drift" and len(window.items) == 100
    asyncio.run(feed(10.0, 4))  # the window now holds images from elsewhere only
    assert window.verdict == "drift" and window.test()["window"] == {"images": 100, "capacity": 100}
    turns = [r.getMessage() for r in caplog.records if "turned from" in r.getMessage()]
    assert len(turns) == 2 and "'no drift' to 'drift'" in turns[-1] and caplog.records[-1].levelname == "WARNING"
