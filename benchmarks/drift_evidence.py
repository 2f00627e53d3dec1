"""Evidence for the drift and out-of-distribution alarms on real images (docs/drift.md).

    python benchmarks/drift_evidence.py --model runs/drift/custom --data ../shared/data/chest-xray-224 \
        --site ../shared/data/site-sample --out runs/drift/evidence [--figures docs]

``--model`` must carry a drift reference (``pneumonet drift-reference`` adds one). Prints and writes
(``evidence.json``):

1. **False alarms**: the window tests on 20 random patient-grouped subsets of about 200 images of the
   model's validation patients, two ways: against the artifact's reference (built on all of them: the
   subsets are drawn from the reference itself, the issue's protocol) and, the honest version, each
   subset against a reference built here on a fresh random half of the validation patients, the subset
   drawn from the other half (so the 20 windows are independent trials, not 20 looks at one pool).
2. **The site sample**: the verdict on all its images, the p-values, the share flagged; and how large
   a window of site-like images (resampled) the alarm needs to fire.
3. **Out-of-distribution inputs**: uniform and Gaussian noise, gradients, rendered text, synthetic
   chest images of ``pneumonet data synth`` (the demo's), and RGB photographs (scikit-learn's two
   sample photos, random crops): the share the per-image gate flags, beside the share of held-out
   validation images it flags.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pneumonet.artifact import load_artifact  # noqa: E402
from pneumonet.config import Config  # noqa: E402
from pneumonet.data.images import load_image  # noqa: E402
from pneumonet.evaluation.drift import (  # noqa: E402
    Reference,
    build_reference,
    drift_png,
    image_statistics,
    read_reference,
    window_tests,
)
from pneumonet.evaluation.run import decode_split  # noqa: E402

SUBSETS = 20
SUBSET_IMAGES = 200
PER_KIND = 40


def patient_subsets(patients: np.ndarray, rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    """``count`` random sets of whole patients, each as few as reach ``size`` images (indices into ``patients``)."""
    unique = np.unique(patients)
    subsets = []
    for _ in range(count):
        chosen: list[int] = []
        for patient in rng.permutation(unique):
            chosen += np.flatnonzero(patients == patient).tolist()
            if len(chosen) >= size:
                break
        subsets.append(np.array(chosen))
    return subsets


def verdicts(refs: list[Reference], raw: np.ndarray, emb: np.ndarray, images: np.ndarray, subsets: list[np.ndarray],
             config: Config) -> dict:  # fmt: skip
    """The window tests on each subset against its reference (one per subset)."""
    results = []
    for seed, (ref, index) in enumerate(zip(refs, subsets)):
        inside, _ = ref.gate(emb[index], images[index])
        results.append(window_tests(ref, raw[index], ref.project(emb[index]), inside, config.drift, seed=seed))
    tested = [r for r in results if r["tests"]]
    return {
        "alarms": sum(r["verdict"] == "drift" for r in results),
        "subsets": len(results),
        "tested": len(tested),
        "images": [r["n"] for r in results],
        "min_p_adjusted": {name: min(r["tests"][name]["p_adjusted"] for r in tested) for name in (tested or [{"tests": {}}])[0]["tests"]},
        "alarmed_on": [[name for name, t in r["tests"].items() if t["p_adjusted"] <= r["alpha"]] for r in results if r["verdict"] == "drift"],
        "flagged_share": float(np.mean([r["tests"]["ood_share"]["observed"] for r in tested])) if tested else None,
    }


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def ood_inputs(rng: np.random.Generator, folder: Path) -> dict[str, list[bytes]]:
    """Encoded images of each kind, PER_KIND of each."""
    from sklearn.datasets import load_sample_images

    from pneumonet.data.synthetic import synthesize_dataset

    side = 512
    kinds: dict[str, list[bytes]] = {"uniform noise": [], "gaussian noise": [], "gradient": [], "rendered text": [],
                                     "synthetic chest (demo data)": [], "RGB photograph": []}  # fmt: skip
    words = "patient chest radiograph left right report normal findings lungs heart clear no acute process".split()
    photos = load_sample_images().images
    v, u = np.mgrid[0:side, 0:side] / side
    for i in range(PER_KIND):
        kinds["uniform noise"].append(png_bytes(rng.integers(0, 256, (side, side), dtype=np.uint8)))
        kinds["gaussian noise"].append(png_bytes(np.uint8(np.clip(rng.normal(128, rng.uniform(20, 70), (side, side)), 0, 255))))
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * u + np.sin(angle) * v if i % 2 else np.hypot(u - rng.uniform(), v - rng.uniform())
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) or 1)
        kinds["gradient"].append(png_bytes(np.uint8(255 * ramp)))
        page = Image.new("L", (side, side), 255 if i % 2 else 0)
        draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=int(rng.integers(18, 40)))
        for line in range(12):
            draw.text((10, 10 + line * 42), " ".join(rng.choice(words, 5)), fill=0 if i % 2 else 255, font=font)
        kinds["rendered text"].append(png_bytes(np.asarray(page), "JPEG"))
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        crop = int(rng.integers(200, min(h, w)))
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        kinds["RGB photograph"].append(png_bytes(np.ascontiguousarray(photo[y : y + crop, x : x + crop]), "JPEG"))
    demo = synthesize_dataset(folder / "synthetic", n=PER_KIND, size=224, seed=0)
    kinds["synthetic chest (demo data)"] = [p.read_bytes() for p in sorted(demo.rglob("*.jpeg"))[:PER_KIND]]
    return kinds


def smallest_alarming_window(ref: Reference, raw: np.ndarray, emb: np.ndarray, images: np.ndarray, config: Config,
                             rng: np.random.Generator) -> dict:  # fmt: skip
    """Windows of site-like images (resampled with replacement): how many images until the alarm fires
    in at least 9 of 10 windows."""
    found = {}
    for size in (100, 200, 400, 800, 1600):
        fired = 0
        for seed in range(10):
            index = rng.integers(0, len(raw), size)
            inside, _ = ref.gate(emb[index], images[index])
            fired += window_tests(ref, raw[index], ref.project(emb[index]), inside, config.drift, seed=seed)["verdict"] == "drift"
        found[size] = fired
        if fired >= 9:
            break
    return {"fired_of_10_by_window_size": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the training data root (its validation patients)")
    parser.add_argument("--site", required=True, help="a site sample root (test/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--figures", help="also write the figures here (docs/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()

    artifact = load_artifact(args.model)
    ref = read_reference(args.model, artifact.meta)
    if ref is None:
        raise SystemExit(f"{args.model} has no drift reference: add one with pneumonet drift-reference")
    config = Config.model_validate(artifact.meta["config"])
    val = decode_split(artifact, args.data, "val")
    raw, emb = artifact.predict_with_embeddings(val.images)
    patients = val.rows["patient_id"].to_numpy()
    evidence: dict = {"model": args.model, "name": artifact.name, "version": artifact.version,
                      "reference": artifact.meta["drift_reference"], "load_average": os.getloadavg()}  # fmt: skip

    images = val.images
    # 1. False alarms.
    subsets = patient_subsets(patients, rng, SUBSETS, SUBSET_IMAGES)
    evidence["false_alarms_in_sample"] = verdicts([ref] * SUBSETS, raw, emb, images, subsets, config)
    half_refs, subsets, held_out_flagged, sizes = [], [], [], []
    for _ in range(SUBSETS):  # a fresh half of the patients for each window: independent trials
        unique = rng.permutation(np.unique(patients))
        half = np.isin(patients, unique[: len(unique) // 2])
        half_ref, _ = build_reference(raw[half], emb[half], patients[half], config.drift, config.seed, images[half])
        other = np.flatnonzero(~half)
        half_refs.append(half_ref)
        subsets.append(other[patient_subsets(patients[other], rng, 1, SUBSET_IMAGES)[0]])
        held_out_flagged.append(float(1 - half_ref.gate(emb[other], images[other])[0].mean()))
        sizes.append(int(half.sum()))
    evidence["false_alarms_held_out_half"] = {**verdicts(half_refs, raw, emb, images, subsets, config),
                                              "reference_images": sizes}  # fmt: skip
    evidence["val_flagged"] = {
        "artifact_reference_in_sample": float(1 - ref.gate(emb, images)[0].mean()),
        "held_out_half": float(np.mean(held_out_flagged)),
        "held_out_half_max": float(np.max(held_out_flagged)),
        "reference_cross_fitted": artifact.meta["drift_reference"]["ood"]["held_out_flagged"],
    }

    # 2. The site sample.
    site = decode_split(artifact, args.site, "test")
    site_raw, site_emb = artifact.predict_with_embeddings(site.images)
    site_inside, _ = ref.gate(site_emb, site.images)
    site_verdict = window_tests(ref, site_raw, ref.project(site_emb), site_inside, config.drift)
    evidence["site"] = {"verdict": site_verdict, "flagged_share": float(1 - site_inside.mean()),
                        "mean_score": float(site_raw.mean()), "reference_mean_score": float(ref.scores.mean()),
                        **smallest_alarming_window(ref, site_raw, site_emb, site.images, config, rng)}  # fmt: skip
    plots = {"drift-site.png": drift_png(ref, site_raw, site_verdict, f"{artifact.name}: site sample vs validation reference")}

    # 3. Out-of-distribution inputs.
    with tempfile.TemporaryDirectory() as tmp:
        kinds = ood_inputs(rng, Path(tmp))
    size = artifact.image_size
    distances = {"validation (held-out half)": half_ref.distance(emb[~half]), "site sample": ref.distance(site_emb)}
    image_distances = {"validation (held-out half)": half_ref.image_distance(image_statistics(images[~half])),
                       "site sample": ref.image_distance(image_statistics(site.images))}  # fmt: skip
    flagged = {}
    for kind, files in kinds.items():
        images = np.stack([load_image(data, f"{kind}.img", size) for data in files])
        kind_raw, kind_emb = artifact.predict_with_embeddings(images)
        inside, _ = ref.gate(kind_emb, images)
        flagged[kind] = {"n": len(files), "flagged_share": float(1 - inside.mean()), "mean_score": float(kind_raw.mean()),
                         "embedding_flagged": float(np.mean(ref.distance(kind_emb) > ref.ood_threshold)),
                         "image_flagged": float(np.mean(ref.image_distance(image_statistics(images)) > ref.image_threshold))}  # fmt: skip
        distances[kind] = ref.distance(kind_emb)
        image_distances[kind] = ref.image_distance(image_statistics(images))
    real_ood = [k for k in flagged if not k.startswith("synthetic")]
    evidence["ood"] = {"kinds": flagged, "flagged_share_all": float(np.mean([flagged[k]["flagged_share"] for k in flagged])),
                       "flagged_share_not_xray_like": float(np.mean([flagged[k]["flagged_share"] for k in real_ood])),
                       "threshold": ref.ood_threshold}  # fmt: skip
    plots["drift-distances.png"] = distance_png(distances, ref.ood_threshold, artifact.name,
                                                "embedding: T² in the reference PCA + residual / its reference mean")
    plots["drift-image-distances.png"] = distance_png(image_distances, ref.image_threshold, artifact.name,
                                                      "image statistics: squared Mahalanobis distance (Ledoit-Wolf)")
    evidence["cost"] = model_stage_cost(artifact, ref, val.images)
    evidence["seconds"] = round(time.monotonic() - started, 1)

    (out / "evidence.json").write_text(json.dumps(evidence, indent=2, default=float) + "\n")
    for folder in filter(None, (out, args.figures and Path(args.figures))):
        for name, data in plots.items():
            (folder / name).write_bytes(data)
    print(json.dumps({key: value for key, value in evidence.items() if key != "reference"}, indent=2, default=float))


def model_stage_cost(artifact, ref: Reference, images: np.ndarray, batch: int = 64, rounds: int = 3) -> dict:
    """Seconds per image of the batch scorer's model stage without and with the drift bookkeeping
    (one forward pass with the embedding, the gate, the projection), alternated, best of ``rounds``."""
    images = images[: 4 * batch]
    artifact.predict_proba(images[:batch], batch)  # trace both graphs first
    artifact.predict_with_embeddings(images[:batch], batch)
    plain, drift = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        artifact.predict_proba(images, batch)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, emb = artifact.predict_with_embeddings(images, batch)
        ref.gate(emb, images)
        ref.project(emb)
        drift.append(time.perf_counter() - start)
    return {"images": len(images), "batch": batch, "plain_s_per_image": min(plain) / len(images),
            "with_drift_s_per_image": min(drift) / len(images), "overhead": min(drift) / min(plain) - 1,
            "load_average": os.getloadavg()}  # fmt: skip


def distance_png(distances: dict[str, np.ndarray], threshold: float, title: str, xlabel: str) -> bytes:
    """Box plots of the gate's distance per kind of input, log scale, with the threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    names = list(distances)
    ax.boxplot([np.maximum(distances[n], 1e-3) for n in names], orientation="horizontal", tick_labels=names, showfliers=True)
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"out-of-distribution threshold {threshold:.0f}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
