"""Drift and out-of-distribution alarms: is what the model sees now what it learned from?

A model is only as good as the resemblance of its inputs to its validation patients. The artifact
therefore carries a *reference* (``drift_reference.npz`` beside ``model.keras``, described under
``drift_reference`` in ``pneumonet.json``): the validation images' raw P(PNEUMONIA) and a bounded
summary of the model's penultimate-layer embeddings. Two questions are asked against it:

- **Is this one image like them?** (the per-image gate). The reference embeddings are summarised by a
  PCA (scikit-learn's ``PCA``, ``pca_components`` directions); an image's distance is Hotelling's T²
  in those directions (the squared Mahalanobis distance of its whitened coordinates) plus its residual
  energy off them in units of the reference's mean residual (the SPE or Q statistic), compared with the
  ``ood_quantile`` quantile of *held-out* reference distances (five patient-grouped folds: each
  fold's distances come from a PCA fitted without its patients), so about ``1 - ood_quantile`` of new
  images from the validation distribution are flagged, and an image unlike any of them is far off.
  The distance grows with anything the model's features have not seen: noise, text, photographs.
  (A probabilistic-PCA Mahalanobis distance, the residual divided by the noise variance, was tried
  first: with 384 dimensions and a few hundred images its residual term dominated and flagged 3–4 %
  of new validation patients where the held-out estimate promised 1 %; docs/drift.md.)
- **Is this window of images like them?** (the window tests, "black-box shift detection" of Rabanser
  et al. 2019). Three tests on a window (an archive's uniform sample, an endpoint's recent images):
  Kolmogorov–Smirnov on the raw scores (``scipy.stats.ks_2samp``), the maximum mean discrepancy of
  the whitened PCA embeddings with a Gaussian kernel (median-heuristic bandwidth) and a permutation
  p-value, and a one-sided binomial test of the share of out-of-distribution images against the share
  expected from the reference (``scipy.stats.binomtest``). **Alarm rule**: the verdict is ``"drift"``
  when any Holm-adjusted p-value is at most ``alpha`` (family-wise error ``alpha`` over the three), else
  ``"no drift"``; a window of fewer than ``min_images`` scored images gets ``"insufficient data"``.

Everything here is numpy/scipy/scikit-learn, with no TensorFlow: the batch driver and the Serve
replicas test windows, the model computes the embeddings (:mod:`pneumonet.models.embedding`).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold

from pneumonet import storage
from pneumonet.artifact_meta import DRIFT_FILE as REFERENCE_FILE
from pneumonet.artifact_meta import DRIFT_KEY as REFERENCE_KEY
from pneumonet.config import DriftConfig
from pneumonet.errors import ArtifactError

FOLDS = 5
MMD_MAX = 500  # images per side of the MMD test: its cost grows with the square
VERDICTS = ("drift", "no drift", "insufficient data")
_ARRAYS = ("scores", "mean", "components", "variances", "residual_mean", "projected", "ood_threshold", "ood_rate")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Reference:
    """What new images are compared with: the validation scores and a PCA of their embeddings."""

    scores: np.ndarray  # (n,) raw P(PNEUMONIA) of every validation image
    mean: np.ndarray  # (d,) of the reference embeddings
    components: np.ndarray  # (k, d) principal directions
    variances: np.ndarray  # (k,) variance along each
    residual_mean: float  # mean squared residual of the reference embeddings off the k directions
    projected: np.ndarray  # (m, k) the reference embeddings, whitened: what the MMD test compares with
    ood_threshold: float  # squared distance beyond which an image is out of distribution
    ood_rate: float  # share of held-out reference images beyond it: what to expect of in-distribution images

    def _centred(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = np.asarray(embeddings, np.float64) - self.mean
        if centred.ndim != 2 or centred.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings must be (N, {self.mean.shape[0]}), got {np.shape(embeddings)}")
        return centred, centred @ self.components.T

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        """Hotelling's T² in the principal directions plus the squared residual in units of the reference's mean."""
        centred, z = self._centred(embeddings)
        residual = np.maximum((centred**2).sum(axis=1) - (z**2).sum(axis=1), 0.0)
        return (z**2 / self.variances).sum(axis=1) + residual / self.residual_mean

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Whitened coordinates in the principal directions (unit variance on the reference)."""
        return (self._centred(embeddings)[1] / np.sqrt(self.variances)).astype(np.float32)

    def gate(self, embeddings: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Per image: in distribution?, and when not, why (the distance and the threshold it passed)."""
        distances = self.distance(embeddings)
        inside = distances <= self.ood_threshold
        reasons = [None if ok else f"embedding distance {d:.1f} is beyond {self.ood_threshold:.1f}, the reference's "
                   "held-out limit: not like the validation images the model was checked on"
                   for d, ok in zip(distances, inside)]  # fmt: skip
        return inside, reasons

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(getattr(self, name)) for name in _ARRAYS})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Reference:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in _ARRAYS}
        except (ValueError, KeyError, OSError) as exc:
            raise ArtifactError(f"{where}: not a drift reference ({exc})") from None
        for name in ("residual_mean", "ood_threshold", "ood_rate"):
            values[name] = float(values[name])
        return cls(**values)


def _fit(embeddings: np.ndarray, components: int, seed: int) -> PCA:
    return PCA(n_components=components, svd_solver="full", random_state=seed).fit(embeddings)


def _reference_of(pca: PCA, scores: np.ndarray, embeddings: np.ndarray, threshold: float, rate: float) -> Reference:
    floor = 1e-9 * max(float(pca.explained_variance_.sum()), 1e-12)  # a degenerate (constant) direction stays finite
    ref = Reference(
        scores=np.asarray(scores, np.float32), mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64),
        variances=np.maximum(pca.explained_variance_, floor), residual_mean=1.0,
        projected=np.zeros((0, pca.n_components_), np.float32), ood_threshold=threshold, ood_rate=rate,
    )  # fmt: skip
    centred, z = ref._centred(embeddings)
    ref.residual_mean = max(float(np.mean((centred**2).sum(axis=1) - (z**2).sum(axis=1))), floor)
    ref.projected = ref.project(embeddings)
    return ref


def build_reference(scores: np.ndarray, embeddings: np.ndarray, groups: list[str] | np.ndarray, config: DriftConfig,
                    seed: int = 0) -> tuple[Reference, dict[str, Any]]:  # fmt: skip
    """The reference of validation images (raw scores, penultimate embeddings, patient ids) and its
    description for ``pneumonet.json`` (without the file's digest, which the writer adds).

    At most ``config.max_vectors`` embeddings are kept (a uniform sample of images); the
    out-of-distribution threshold is the ``ood_quantile`` quantile of their held-out distances.
    """
    scores, embeddings, groups = np.asarray(scores, np.float64), np.asarray(embeddings, np.float64), np.asarray(groups)
    n, dim = embeddings.shape
    if len(scores) != n or len(groups) != n:
        raise ValueError(f"{len(scores)} scores, {n} embeddings and {len(groups)} patient ids: they must match")
    if len(np.unique(groups)) < FOLDS or n < 2 * FOLDS:
        raise ValueError(f"a drift reference needs at least {FOLDS} patients and {2 * FOLDS} images, got "
                         f"{len(np.unique(groups))} and {n}")  # fmt: skip
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(n, config.max_vectors, replace=False)) if n > config.max_vectors else np.arange(n)
    vectors, kept_groups = embeddings[kept], groups[kept]
    folds = min(FOLDS, len(np.unique(kept_groups)))
    components = max(1, min(config.pca_components, dim - 1, len(kept) * (folds - 1) // folds - 1))
    held_out = np.empty(len(kept))
    for fit, test in GroupKFold(folds).split(vectors, groups=kept_groups):
        held_out[test] = _reference_of(_fit(vectors[fit], components, seed), scores[:0], vectors[fit], 0.0, 0.0).distance(vectors[test])
    threshold = float(np.quantile(held_out, config.ood_quantile))
    rate = float(np.mean(held_out > threshold))
    pca = _fit(vectors, components, seed)
    ref = _reference_of(pca, scores, vectors, threshold, rate)
    record = {
        "file": REFERENCE_FILE,
        "method": "validation patients: raw scores of every image; penultimate-layer embeddings, a PCA (scikit-learn) "
                  "with the whitened projections of the kept embeddings and their mean squared residual",
        "n_images": n, "n_patients": int(len(np.unique(groups))), "n_vectors": int(len(kept)),
        "embedding_dim": int(dim), "pca_components": int(components),
        "explained_variance_ratio": round(float(pca.explained_variance_ratio_.sum()), 4),
        "ood": {"statistic": "Hotelling's T² in the principal directions + squared residual / its reference mean",
                "quantile": config.ood_quantile, "threshold": threshold, "held_out_flagged": rate, "folds": folds},
    }  # fmt: skip
    return ref, record


def reference_files(ref: Reference, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``drift_reference`` record with the file's digest, and the file, as the artifact writer takes them."""
    data = ref.to_bytes()
    return {**record, "sha256": _sha256(data), "bytes": len(data)}, {REFERENCE_FILE: data}


def read_reference(artifact_uri: str, meta: dict[str, Any]) -> Reference | None:
    """The artifact's reference, checked against its digest; None for an artifact made without one."""
    record = meta.get(REFERENCE_KEY)
    if record is None:
        return None
    uri = storage.join(artifact_uri, record.get("file", REFERENCE_FILE))
    if not storage.exists(uri):
        raise ArtifactError(f"artifact {artifact_uri}: {REFERENCE_KEY} names {record.get('file')}, which is missing")
    data = storage.read_bytes(uri)
    if _sha256(data) != record.get("sha256"):
        raise ArtifactError(f"artifact {artifact_uri}: {uri} does not have the sha256 pneumonet.json records; it was changed")
    return Reference.from_bytes(data, uri)


NO_REFERENCE = ("this model artifact has no drift reference (made before pneumonet had one): images are not checked; "
                "add one with `pneumonet drift-reference --model M --data DATA --out M2`")  # fmt: skip


def sample_key(uri: str) -> float:
    """A uniform number in [0, 1) fixed by the URI: the images with the smallest keys are a uniform sample
    of an archive that every worker draws alike, without coordination, and a resumed job draws again."""
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "big") / 2.0**64


def sample_rate(size: int, files: int) -> float:
    """Share of an archive of ``files`` to keep so that about 1.5 × ``size`` images are kept (the
    driver then takes the ``size`` smallest keys: exactly uniform, and enough despite chance)."""
    return min(1.0, 1.5 * size / max(files, 1))


# --- window tests ----------------------------------------------------------------------------------


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator) -> dict[str, float]:
    """Squared MMD of ``x`` and ``y`` (Gaussian kernel, median-heuristic bandwidth) and its permutation p-value.

    All permutations at once: with ``a`` the ±1/n weights of a labelling, MMD² = aᵀKa, so a matrix of
    labellings costs one matrix product with the kernel.
    """
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = np.maximum((pooled**2).sum(1)[:, None] + (pooled**2).sum(1)[None, :] - 2 * pooled @ pooled.T, 0.0)
    bandwidth = float(np.median(squared[np.triu_indices(len(pooled), 1)])) or 1.0
    kernel = np.exp(-squared / bandwidth)
    labels = np.zeros((len(pooled), permutations + 1), bool)
    labels[: len(x), 0] = True
    for column in range(1, permutations + 1):
        labels[rng.permutation(len(pooled))[: len(x)], column] = True
    weights = np.where(labels, 1.0 / len(x), -1.0 / len(y))
    mmd2 = np.einsum("ip,ip->p", weights, kernel @ weights)
    return {"statistic": float(mmd2[0]), "p_value": float((1 + np.sum(mmd2[1:] >= mmd2[0])) / (permutations + 1)),
            "bandwidth": bandwidth}  # fmt: skip


def _subsample(values: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= size else values[rng.choice(len(values), size, replace=False)]


def window_tests(ref: Reference, scores: np.ndarray, projected: np.ndarray, inside: np.ndarray, config: DriftConfig,
                 seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The verdict on a window of scored images (raw scores, whitened projections, gate results)."""
    scores, inside = np.asarray(scores, np.float64), np.asarray(inside, bool)
    n = len(scores)
    result: dict[str, Any] = {"n": n, "alpha": config.alpha, "correction": "holm",
                              "rule": f"drift when any Holm-adjusted p-value <= {config.alpha} (at least {config.min_images} images)"}  # fmt: skip
    if n < config.min_images:
        return {"verdict": "insufficient data", **result, "tests": {}}
    rng = np.random.default_rng(seed)
    ks = stats.ks_2samp(scores, ref.scores)
    mmd = mmd_test(_subsample(np.asarray(projected), MMD_MAX, rng), _subsample(ref.projected, MMD_MAX, rng), config.permutations, rng)
    flagged = int((~inside).sum())
    binomial = stats.binomtest(flagged, n, max(ref.ood_rate, 1e-6), alternative="greater")
    tests = {
        "scores_ks": {"statistic": float(ks.statistic), "p_value": float(ks.pvalue), "n": n, "n_reference": len(ref.scores)},
        "embeddings_mmd": {**mmd, "permutations": config.permutations, "n": min(n, MMD_MAX), "n_reference": min(len(ref.projected), MMD_MAX)},
        "ood_share": {"observed": flagged / n, "expected": ref.ood_rate, "flagged": flagged, "p_value": float(binomial.pvalue)},
    }  # fmt: skip
    for test, adjusted in zip(tests.values(), holm([t["p_value"] for t in tests.values()])):
        test["p_adjusted"] = adjusted
    drift = any(test["p_adjusted"] <= config.alpha for test in tests.values())
    return {"verdict": "drift" if drift else "no drift", **result, "tests": tests}


def drift_png(ref: Reference, scores: np.ndarray, verdict: dict[str, Any], title: str) -> bytes:
    """The window's raw-score histogram over the reference's (densities: the two sizes differ)."""
    bins = np.linspace(0.0, 1.0, 21)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.hist(ref.scores, bins=bins, density=True, color="#999999", alpha=0.6, label=f"reference (validation, n={len(ref.scores)})")
    ax.hist(np.asarray(scores), bins=bins, density=True, histtype="step", linewidth=2, color="#c44e52",
            label=f"these images (n={len(scores)})")  # fmt: skip
    ax.set_xlabel("P(PNEUMONIA), before any site recalibration")
    ax.set_ylabel("density")
    tests = verdict.get("tests", {})
    detail = ", ".join(f"{name} p={test['p_adjusted']:.3g}" for name, test in tests.items())
    ax.set_title(f"{title}\n{verdict['verdict']}" + (f" ({detail}, Holm)" if detail else ""), fontsize=8)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
