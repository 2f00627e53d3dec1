"""Drift and out-of-distribution alarms: the statistics, the reference in the artifact, ``drift-reference``."""

from __future__ import annotations

import hashlib
import io
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
    _ARRAYS,
    Reference,
    build_reference,
    grouped_draws,
    holm,
    image_statistics,
    ks_statistics,
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
    # The MMD's coordinates: the principal ones in one unit for all (not whitened).
    expected = pca.transform(new) / np.sqrt(pca.explained_variance_.sum())
    np.testing.assert_allclose(np.abs(ref.project(new)), np.abs(expected), rtol=1e-4, atol=1e-6)


def test_the_gate_flags_about_the_quantile_of_new_in_distribution_images_and_every_far_one(reference) -> None:
    ref, record = reference
    rng = np.random.default_rng(2)
    inside, reasons = ref.gate(gaussian(rng, 4000), None)
    assert 0.003 <= 1 - inside.mean() <= 0.025  # ood_quantile 0.99, held out: about 1 %
    assert all((reason is None) == ok for ok, reason in zip(inside, reasons))
    far, reasons = ref.gate(gaussian(rng, 200, shift=10.0), None)  # another distribution altogether
    assert not far.any() and "beyond" in reasons[0]
    assert record["n_vectors"] == 1000 and record["n_images"] == 1200 and record["pca_components"] == 4
    assert record["ood"]["threshold"] == ref.ood_threshold and 0.005 <= record["ood"]["held_out_flagged"] <= 0.02


def test_window_tests_stay_quiet_on_the_same_distribution_and_fire_on_a_shift(reference) -> None:
    ref, _ = reference
    config = DriftConfig(pca_components=4, permutations=300)
    rng = np.random.default_rng(3)

    def window(n: int, score_a: float = 2, shift: float = 0.0) -> dict:
        embeddings = gaussian(rng, n, shift=shift)
        return window_tests(ref, rng.beta(score_a, 5, n), ref.project(embeddings), ref.gate(embeddings, None)[0], config, seed=4)

    quiet = [window(200) for _ in range(5)]
    assert all(v["verdict"] == "no drift" for v in quiet), [v["tests"] for v in quiet]
    scores_moved = window(200, score_a=4)
    assert scores_moved["verdict"] == "drift" and scores_moved["tests"]["scores_ks"]["p_adjusted"] <= 0.01
    features_moved = window(200, shift=1.5)  # a sixth of the embeddings' spread (unwhitened)
    assert features_moved["verdict"] == "drift" and features_moved["tests"]["embeddings_mmd"]["p_value"] <= 1 / 301 + 1e-12
    odd_inside = np.arange(200) >= 20  # a tenth flagged where the reference's held-out share is about 1 %
    odd = window_tests(ref, rng.beta(2, 5, 200), ref.project(gaussian(rng, 200)), odd_inside, config, seed=4)
    assert odd["tests"]["ood_share"]["p_adjusted"] <= 0.01 and odd["tests"]["ood_share"]["flagged"] == 20
    assert set(features_moved["tests"]) == {"scores_ks", "embeddings_mmd", "ood_share"}
    assert window(20)["verdict"] == "insufficient data"
    with pytest.raises(ValueError, match="can never give a p-value"):  # 1/201 > 0.01/3: it could never alarm
        DriftConfig(permutations=200)


def test_holm_and_the_ks_statistic_of_many_resamples_at_once() -> None:
    from scipy import stats

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(5)
    x, y = np.round(rng.random((6, 40)), 1), np.round(rng.random((6, 55)) ** 2, 1)  # rounded: many ties
    np.testing.assert_allclose(ks_statistics(x, y), [stats.ks_2samp(a, b).statistic for a, b in zip(x, y)])


def test_grouped_draws_take_whole_patients_until_the_size() -> None:
    groups = np.repeat(np.arange(50), np.arange(50) % 7 + 1)  # 1-7 images a patient
    draws = grouped_draws(groups, 120, 200, np.random.default_rng(8))
    assert draws.shape == (200, 120)
    for row in draws[:20]:
        patients, counts = np.unique(groups[row], return_counts=True)
        whole = np.array([np.sum(groups == patient) for patient in patients])
        assert (counts % whole == 0).sum() >= len(patients) - 1  # every patient whole (drawn once or more), but the last


def clustered(rng: np.random.Generator, patients: int, per_patient: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, embeddings and patient ids where one patient's images are alike (a shared offset)."""
    groups = np.repeat(np.arange(patients), per_patient)
    offset = rng.normal(size=(patients, 12))[groups]
    embeddings = 0.4 * gaussian(rng, len(groups)) + 2.0 * offset
    scores = 1 / (1 + np.exp(-(2.5 * offset[:, 0] + 0.3 * rng.normal(size=len(groups)))))
    return scores, embeddings, groups


def test_the_patient_grouped_null_stays_quiet_where_images_of_one_patient_are_alike() -> None:
    """New patients of the same population: the window tests' grouped bootstrap keeps them quiet, where
    the independent-image nulls (KS's own p-value, an image permutation) alarm on most windows."""
    from scipy import stats

    rng = np.random.default_rng(9)
    config = DriftConfig(pca_components=4, permutations=300)
    scores, embeddings, groups = clustered(rng, 80)
    ref, _ = build_reference(scores, embeddings, groups, config, seed=1)
    grouped, independent = [], []
    for _ in range(12):
        new_scores, new_embeddings, _ = clustered(rng, 25)  # 200 images of 25 new patients
        result = window_tests(ref, new_scores, ref.project(new_embeddings), ref.gate(new_embeddings, None)[0], config)
        grouped.append(result["verdict"] == "drift")
        independent.append(stats.ks_2samp(new_scores, ref.scores).pvalue <= 0.01)
    assert sum(grouped) <= 1 and sum(independent) >= 6, (sum(grouped), sum(independent))
    images_alone = DriftConfig(pca_components=4, permutations=300)
    one_each, _ = build_reference(scores, embeddings, np.arange(len(scores)), images_alone, seed=1)  # every image its own patient
    alarms = sum(window_tests(one_each, s, one_each.project(e), one_each.gate(e, None)[0], images_alone)["verdict"] == "drift"
                 for s, e, _ in (clustered(rng, 25) for _ in range(6)))  # fmt: skip
    assert alarms >= 3  # the same statistics with the patients forgotten: the null is too narrow


def textures(rng: np.random.Generator, n: int, drawn: bool, size: int = 48) -> np.ndarray:
    """Radiograph-like images (smooth shading, sharp-edged structures: heavy-tailed fine detail) or drawn
    ones (the same shading with Gaussian noise, as ``pneumonet data synth`` adds)."""
    v, u = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        base = 0.5 + 0.2 * np.cos(rng.uniform(1, 3) * u + rng.uniform()) * np.sin(rng.uniform(1, 3) * v)
        if drawn:
            base = base + rng.normal(0, rng.uniform(0.02, 0.04), base.shape)
        else:
            for _ in range(int(rng.integers(4, 9))):
                y, x, h, w = rng.integers(0, size - 8, 4)
                base[y : y + h // 3 + 2, x : x + w // 3 + 2] += rng.uniform(-0.25, 0.25)
            base = base + rng.normal(0, 0.004, base.shape)
        images.append(np.uint8(np.clip(base, 0, 1) * 255)[:, :, None])
    return np.stack(images)


def test_the_image_statistics_flag_drawn_images_whose_embeddings_look_in_distribution() -> None:
    rng = np.random.default_rng(10)
    n = 600
    ref, record = build_reference(rng.beta(2, 5, n), gaussian(rng, n), np.arange(n) // 2,
                                  DriftConfig(pca_components=4), seed=1, images=textures(rng, n, drawn=False))  # fmt: skip
    assert image_statistics(textures(rng, 3, drawn=False)).shape == (3, 11)
    assert record["ood"]["image_threshold"] == ref.image_threshold and 0.0 < record["ood"]["held_out_flagged"] <= 0.03
    embeddings = gaussian(rng, 300)  # the features cannot tell: like the reference's
    alike, _ = ref.gate(embeddings, textures(rng, 300, drawn=False))
    drawn, reasons = ref.gate(embeddings, textures(rng, 300, drawn=True))
    assert 1 - alike.mean() <= 0.03
    assert 1 - drawn.mean() >= 0.95 and "image statistics distance" in next(r for r in reasons if r)
    assert 1 - ref.gate(embeddings, None)[0].mean() <= 0.03  # the embedding alone lets them through


def test_a_format_1_reference_keeps_working_with_a_notice(reference, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref, record = reference
    old = {name: np.asarray(getattr(ref, name)) for name in _ARRAYS}
    old["projected"] = ref.projected * ref.scale / np.sqrt(ref.variances)  # format 1 stored whitened projections
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **old)
    record, files = reference_files(ref, record)
    files = {name: buffer.getvalue() for name in files}
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    uri = tiny_artifact(tmp_path / "m", meta_extra={DRIFT_KEY: {**record, "sha256": digest}}, files=files)
    caplog.set_level("WARNING", logger="pneumonet.evaluation.drift")
    legacy = read_reference(uri, load_artifact(uri).meta)
    assert legacy.legacy and not legacy.checks_images and "predates format 2" in caplog.text
    np.testing.assert_allclose(legacy.projected, ref.projected, rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(11)
    embeddings = gaussian(rng, 100)
    assert (legacy.gate(embeddings, textures(rng, 100, drawn=True))[0] == ref.gate(embeddings, None)[0]).all()
    result = window_tests(legacy, rng.beta(2, 5, 100), legacy.project(embeddings), np.ones(100, bool), DriftConfig(permutations=300))
    assert result["verdict"] == "no drift" and set(result["tests"]) == {"scores_ks", "embeddings_mmd", "ood_share"}


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
    window = DriftWindow(ref, DriftConfig(window=100, check_every=25, min_images=50, permutations=300), "m:1")
    rng = np.random.default_rng(7)
    caplog.set_level("INFO", logger="pneumonet.scoring.online")

    async def feed(shift: float, batches: int) -> None:
        for _ in range(batches):
            embeddings = gaussian(rng, 25, shift=shift)
            window.add(rng.beta(2, 5, 25), embeddings, None)
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
