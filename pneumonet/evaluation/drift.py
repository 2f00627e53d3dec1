"""Drift and out-of-distribution alarms: is what the model sees now what it learned from?

A model is only as good as the resemblance of its inputs to its validation patients. The artifact
therefore carries a *reference* (``drift_reference.npz`` beside ``model.keras``, described under
``drift_reference`` in ``pneumonet.json``): the validation images' raw P(PNEUMONIA) and a bounded
summary of the model's penultimate-layer embeddings. Two questions are asked against it:

- **Is this one image like them?** (the per-image gate). Two distances, each against its own threshold:
  the *embedding distance*, Hotelling's T² in the reference embeddings' ``pca_components`` principal
  directions (scikit-learn's ``PCA``) plus the residual energy off them in units of the reference's mean
  residual (the SPE or Q statistic); and the *image distance*, the squared Mahalanobis distance of 11
  low-level statistics of the decoded input (:func:`image_statistics`: intensity quantiles, Laplacian
  energy and its tail shape at three scales) from the reference's, with a Ledoit-Wolf covariance. An
  image is out of distribution when either passes its threshold. Both thresholds sit at one quantile of
  *held-out* reference distances (five patient-grouped folds: each fold's distances come from a PCA and
  statistics fitted without its patients), chosen so that about ``1 - ood_quantile`` of them pass either.
  The embedding distance grows with what the network's features have not seen (noise, text, photographs);
  the image distance with what they represent wrongly: the demo's drawn chests, which the features take for
  radiographs, have Gaussian rather than heavy-tailed fine detail. (A probabilistic-PCA Mahalanobis
  distance was tried first: with 384 dimensions and a few hundred images its residual term dominated and
  flagged 3–4 % of new validation patients where the held-out estimate promised 1 %; docs/drift.md.)
- **Is this window of images like them?** (the window tests, "black-box shift detection" of Rabanser
  et al. 2019). Three statistics on a window (an archive's uniform sample, an endpoint's recent images):
  Kolmogorov–Smirnov on the raw scores (``scipy.stats.ks_2samp``'s statistic), the maximum mean discrepancy of the
  projected embeddings (Gaussian kernel, the reference's median distance as bandwidth), and the number of
  images the gate flags. Each p-value comes from a *patient-grouped bootstrap* of the reference
  (:func:`null_distributions`): one patient's images are alike, so the independent-image nulls (KS's own,
  an image permutation, a binomial) are too narrow and fired on other validation patients.
  **Alarm rule**: the verdict is ``"drift"`` when any Holm-adjusted p-value is at most ``alpha``
  (family-wise error ``alpha`` over the three), else ``"no drift"``; a window of fewer than
  ``min_images`` scored images gets ``"insufficient data"``.

Everything here is numpy/scipy/scikit-learn, with no TensorFlow: the batch driver and the Serve
replicas test windows, the model computes the embeddings (:mod:`pneumonet.models.embedding`).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold

from pneumonet import storage
from pneumonet.artifact_meta import DRIFT_FILE as REFERENCE_FILE
from pneumonet.artifact_meta import DRIFT_KEY as REFERENCE_KEY
from pneumonet.config import DriftConfig
from pneumonet.errors import ArtifactError

log = logging.getLogger(__name__)

FOLDS = 5
MMD_MAX = 500  # images per side of the MMD test: its cost grows with the square
MAX_NULLS = 16  # window sizes whose null distributions a reference keeps (an endpoint's window grows to one size)
FORMAT = 2  # of the reference file: 1 (before patient groups, the image gate and unwhitened projections)
VERDICTS = ("drift", "no drift", "insufficient data")
_ARRAYS = ("scores", "mean", "components", "variances", "residual_mean", "projected", "ood_threshold", "ood_rate")
_ARRAYS_2 = ("score_groups", "vector_groups", "held_out_outside", "image_mean", "image_precision", "image_threshold")
LEGACY_NOTICE = ("this model's drift reference predates format 2: images are gated on the embedding only (no image "
                 "statistics), and the window tests treat every reference image as its own patient; rebuild it with "
                 "`pneumonet drift-reference --model M --data DATA --out M2`")  # fmt: skip
IMAGE_STATISTICS = ("intensity quantiles 5/25/50/75/95 % of the 4x-pooled image; log mean |Laplacian| and log RMS "
                    "Laplacian at three scales (1x, 2x, 4x pooled): 11 numbers per image")  # fmt: skip
_QUANTILES = np.array([0.05, 0.25, 0.5, 0.75, 0.95])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(N, 11) low-level statistics of decoded model inputs (N, H, W, 1) uint8: the input-space half of the gate.

    The network's penultimate features represent anything chest-like as a chest X-ray, the demo's drawn
    chests included. The texture of a radiograph is not theirs: its fine detail (the Laplacian) is
    heavy-tailed, sharp edges on smooth tissue, where a drawing with added noise has Gaussian detail, so the
    ratio of mean |Laplacian| to its RMS differs; photographs, text and noise differ in intensities too.
    About 0.1 ms an image (numpy, no model).
    """
    x = np.asarray(images, np.float32)[..., 0] / 255.0
    features = []
    for level in range(3):
        if level:  # 2x2 mean pooling, four strided sums (reshape-mean is several times slower)
            h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
            x = 0.25 * (x[:, 0:h:2, 0:w:2] + x[:, 1:h:2, 0:w:2] + x[:, 0:h:2, 1:w:2] + x[:, 1:h:2, 1:w:2])
        lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
        features += [np.log(np.abs(lap).mean(axis=(1, 2)) + 1e-3), 0.5 * np.log(np.einsum("nij,nij->n", lap, lap) / lap[0].size + 1e-6)]
    quantiles = np.quantile(x.reshape(len(x), -1), _QUANTILES, axis=1)
    return np.column_stack([*quantiles, *features]).astype(np.float64)


@dataclass
class Reference:
    """What new images are compared with: the validation scores, a PCA of their embeddings, their image statistics."""

    scores: np.ndarray  # (n,) raw P(PNEUMONIA) of every validation image
    mean: np.ndarray  # (d,) of the reference embeddings
    components: np.ndarray  # (k, d) principal directions
    variances: np.ndarray  # (k,) variance along each
    residual_mean: float  # mean squared residual of the reference embeddings off the k directions
    projected: np.ndarray  # (m, k) the reference embeddings' coordinates (``project``): what the MMD test compares with
    ood_threshold: float  # squared embedding distance beyond which an image is out of distribution
    ood_rate: float  # share of held-out reference images the gate flags: what to expect of in-distribution images
    score_groups: np.ndarray  # (n,) patient index of each score (0..P-1; no patient ids are stored)
    vector_groups: np.ndarray  # (m,) patient index of each kept embedding
    held_out_outside: np.ndarray  # (m,) the gate's held-out verdict on each kept image (empty: format 1)
    image_mean: np.ndarray  # (f,) of the reference's image statistics (empty: no image gate, format 1)
    image_precision: np.ndarray  # (f, f) their inverse (Ledoit-Wolf) covariance
    image_threshold: float  # squared Mahalanobis distance of the statistics beyond which an image is out of distribution
    legacy: bool = False  # read from a format-1 file
    _nulls: dict = field(default_factory=dict, repr=False, compare=False)  # window size -> null distributions

    @property
    def scale(self) -> float:
        """One length for every direction of ``project`` (the coordinates are not whitened; see ``project``)."""
        return float(np.sqrt(self.variances.sum()))

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

    def image_distance(self, statistics: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of image statistics (``image_statistics``) from the reference's."""
        centred = np.asarray(statistics, np.float64) - self.image_mean
        return np.einsum("ni,ij,nj->n", centred, self.image_precision, centred)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Coordinates in the principal directions, in one unit for all (``scale``): what the MMD test compares.

        Not whitened: the reference's variance along its trailing directions is underestimated in-sample (the
        PCA was fitted to it), so whitened, new images of the same patients look more spread out than the
        reference and the MMD test fired on them; unwhitened, those directions weigh what they measure.
        """
        return (self._centred(embeddings)[1] / self.scale).astype(np.float32)

    @property
    def checks_images(self) -> bool:
        return self.image_mean.size > 0

    def gate(self, embeddings: np.ndarray, images: np.ndarray | None) -> tuple[np.ndarray, list[str | None]]:
        """Per image: in distribution?, and when not, why (which distance passed which limit).

        ``images``: the decoded model inputs (N, H, W, 1) uint8, for the image statistics (None: embedding only,
        as for a format-1 reference).
        """
        distances = self.distance(embeddings)
        far = distances > self.ood_threshold
        image = np.zeros(len(far)) if images is None or not self.checks_images else self.image_distance(image_statistics(images))
        odd = image > self.image_threshold if self.checks_images and images is not None else np.zeros(len(far), bool)
        reasons: list[str | None] = []
        for d, s, f, o in zip(distances, image, far, odd):
            why = ([f"embedding distance {d:.1f} is beyond {self.ood_threshold:.1f}"] if f else []) + \
                  ([f"image statistics distance {s:.1f} is beyond {self.image_threshold:.1f}"] if o else [])
            reasons.append("; ".join(why) + ", the reference's held-out limits: not like the validation images the model "
                           "was checked on" if why else None)  # fmt: skip
        return ~(far | odd), reasons

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, format=FORMAT, **{name: np.asarray(getattr(self, name)) for name in _ARRAYS + _ARRAYS_2})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Reference:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in _ARRAYS}
                legacy = "format" not in arrays
                if not legacy:
                    values.update({name: arrays[name] for name in _ARRAYS_2})
        except (ValueError, KeyError, OSError) as exc:
            raise ArtifactError(f"{where}: not a drift reference ({exc})") from None
        if legacy:  # format 1: whitened projections, no groups, no held-out verdicts, no image statistics
            values["projected"] = values["projected"] * np.sqrt(values["variances"]) / np.sqrt(values["variances"].sum())
            values.update(score_groups=np.arange(len(values["scores"])), vector_groups=np.arange(len(values["projected"])),
                          held_out_outside=np.zeros(0, bool), image_mean=np.zeros(0), image_precision=np.zeros((0, 0)),
                          image_threshold=np.inf)  # fmt: skip
        for name in ("residual_mean", "ood_threshold", "ood_rate", "image_threshold"):
            values[name] = float(values[name])
        return cls(**values, legacy=legacy)


def _fit(embeddings: np.ndarray, components: int, seed: int) -> PCA:
    return PCA(n_components=components, svd_solver="full", random_state=seed).fit(embeddings)


def _reference_of(pca: PCA, embeddings: np.ndarray) -> Reference:
    """The embedding half of a reference (the gate's PCA, thresholds and the rest to be filled in)."""
    floor = 1e-9 * max(float(pca.explained_variance_.sum()), 1e-12)  # a degenerate (constant) direction stays finite
    empty = np.zeros(0)
    ref = Reference(
        scores=empty, mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64),
        variances=np.maximum(pca.explained_variance_, floor), residual_mean=1.0, projected=empty, ood_threshold=np.inf,
        ood_rate=0.0, score_groups=empty, vector_groups=empty, held_out_outside=empty, image_mean=empty,
        image_precision=np.zeros((0, 0)), image_threshold=np.inf,
    )  # fmt: skip
    centred, z = ref._centred(embeddings)
    ref.residual_mean = max(float(np.mean((centred**2).sum(axis=1) - (z**2).sum(axis=1))), floor)
    ref.projected = ref.project(embeddings)
    return ref


def _joint_thresholds(distances: list[np.ndarray], quantile: float) -> tuple[list[float], float]:
    """Thresholds at one common held-out quantile q' ≥ ``quantile`` of each distance, the smallest q' for which
    at most ``1 - quantile`` of the held-out images pass any of them (each alone would flag that share, and
    together up to the sum); and the share they flag."""
    for q in np.linspace(quantile, 1.0, 201):
        thresholds = [float(np.quantile(d, q)) for d in distances]
        rate = float(np.mean(np.any([d > t for d, t in zip(distances, thresholds)], axis=0)))
        if rate <= 1.0 - quantile:
            return thresholds, rate
    return thresholds, rate  # q = 1: the largest of each, nothing beyond


def build_reference(scores: np.ndarray, embeddings: np.ndarray, groups: list[str] | np.ndarray, config: DriftConfig,
                    seed: int = 0, images: np.ndarray | None = None) -> tuple[Reference, dict[str, Any]]:  # fmt: skip
    """The reference of validation images (raw scores, penultimate embeddings, patient ids, and the decoded
    model inputs for the image statistics: None leaves the image gate out) and its description for
    ``pneumonet.json`` (without the file's digest, which the writer adds).

    At most ``config.max_vectors`` embeddings are kept (a uniform sample of images). The gate's thresholds
    come from held-out distances: five patient-grouped folds, each fold's distances from a PCA and image
    statistics fitted without its patients, set so that about ``1 - ood_quantile`` of them are flagged.
    """
    scores, embeddings = np.asarray(scores, np.float64), np.asarray(embeddings, np.float64)
    groups = np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int32)
    n, dim = embeddings.shape
    if len(scores) != n or len(groups) != n or (images is not None and len(images) != n):
        raise ValueError(f"{len(scores)} scores, {n} embeddings, {len(groups)} patient ids"
                         f"{'' if images is None else f' and {len(images)} images'}: they must match")  # fmt: skip
    if len(np.unique(groups)) < FOLDS or n < 2 * FOLDS:
        raise ValueError(f"a drift reference needs at least {FOLDS} patients and {2 * FOLDS} images, got "
                         f"{len(np.unique(groups))} and {n}")  # fmt: skip
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(n, config.max_vectors, replace=False)) if n > config.max_vectors else np.arange(n)
    vectors, kept_groups = embeddings[kept], groups[kept]
    statistics = None if images is None else image_statistics(images[kept])
    folds = min(FOLDS, len(np.unique(kept_groups)))
    components = max(1, min(config.pca_components, dim - 1, len(kept) * (folds - 1) // folds - 1))
    held_out = np.empty((2, len(kept)))
    splits = list(GroupKFold(folds).split(vectors, groups=kept_groups))
    for fit, test in splits:
        held_out[0, test] = _reference_of(_fit(vectors[fit], components, seed), vectors[fit]).distance(vectors[test])
        if statistics is not None:
            lw = LedoitWolf().fit(statistics[fit])
            held_out[1, test] = lw.mahalanobis(statistics[test])
    held_out = held_out[: 1 if statistics is None else 2]
    thresholds, _ = _joint_thresholds(list(held_out), config.ood_quantile)
    # What the gate flags of new images: each fold against thresholds chosen on the other folds' distances.
    # (Against the thresholds chosen on its own distances the share is ~1 - ood_quantile by construction, and new
    # patients' images passed them about twice as often: the extreme quantile of a few hundred images is noisy.)
    outside = np.zeros(len(kept), bool)
    for fit, test in splits:
        fold_thresholds, _ = _joint_thresholds(list(held_out[:, fit]), config.ood_quantile)
        outside[test] = np.any([d[test] > t for d, t in zip(held_out, fold_thresholds)], axis=0)
    rate = float(outside.mean())
    pca = _fit(vectors, components, seed)
    ref = _reference_of(pca, vectors)
    ref.scores, ref.score_groups, ref.vector_groups = scores.astype(np.float32), groups, kept_groups
    ref.ood_threshold, ref.ood_rate = thresholds[0], rate
    ref.held_out_outside = outside
    record = {
        "file": REFERENCE_FILE, "format": FORMAT,
        "method": "validation patients: raw scores of every image; penultimate-layer embeddings, a PCA (scikit-learn) "
                  "with the projections of the kept embeddings and their mean squared residual; the images' low-level "
                  "statistics (mean and Ledoit-Wolf precision); patient indices (no ids) for the window tests' "
                  "patient-grouped bootstrap",
        "n_images": n, "n_patients": int(len(np.unique(groups))), "n_vectors": int(len(kept)),
        "embedding_dim": int(dim), "pca_components": int(components),
        "explained_variance_ratio": round(float(pca.explained_variance_ratio_.sum()), 4),
        "ood": {"statistic": "Hotelling's T² in the principal directions + squared residual / its reference mean",
                "quantile": config.ood_quantile, "threshold": thresholds[0], "held_out_flagged": rate, "folds": folds},
    }  # fmt: skip
    if statistics is not None:
        lw = LedoitWolf().fit(statistics)
        ref.image_mean, ref.image_precision, ref.image_threshold = lw.location_, lw.precision_, thresholds[1]
        record["ood"].update(image_statistics=IMAGE_STATISTICS, image_statistic="squared Mahalanobis distance "
                             "(scikit-learn LedoitWolf)", image_threshold=thresholds[1],
                             rule="out of distribution when either distance is beyond its threshold")  # fmt: skip
    return ref, record


def reference_files(ref: Reference, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``drift_reference`` record with the file's digest and size, and the file, as the artifact writer takes them."""
    data = ref.to_bytes()
    return {**record, "sha256": _sha256(data), "bytes": len(data)}, {REFERENCE_FILE: data}


def read_reference(artifact_uri: str, meta: dict[str, Any]) -> Reference | None:
    """The artifact's reference, checked against its digest; None for an artifact made without one.
    A format-1 reference is read and used, with a logged notice of what it lacks."""
    record = meta.get(REFERENCE_KEY)
    if record is None:
        return None
    uri = storage.join(artifact_uri, record.get("file", REFERENCE_FILE))
    if not storage.exists(uri):
        raise ArtifactError(f"artifact {artifact_uri}: {REFERENCE_KEY} names {record.get('file')}, which is missing")
    data = storage.read_bytes(uri)
    if _sha256(data) != record.get("sha256"):
        raise ArtifactError(f"artifact {artifact_uri}: {uri} does not have the sha256 pneumonet.json records; it was changed")
    ref = Reference.from_bytes(data, uri)
    if ref.legacy:
        log.warning("%s: %s", artifact_uri, LEGACY_NOTICE)
    return ref


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


def grouped_draws(groups: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, size) indices into ``groups``: per row, whole patients drawn with replacement until ``size``
    images (the last patient's cut short). A window of images that arrive patient by patient, as the
    validation images did, varies this much by chance: more than images drawn one by one, because one
    patient's images are alike."""
    order = np.argsort(groups, kind="stable")
    _, starts, sizes = np.unique(groups[order], return_index=True, return_counts=True)
    patients = rng.integers(0, len(sizes), (count, size))  # size patients always hold at least size images
    lengths = sizes[patients].ravel()
    ends = np.cumsum(lengths)
    flat = order[np.arange(ends[-1]) - np.repeat(ends - lengths, lengths) + np.repeat(starts[patients.ravel()], lengths)]
    row_starts = np.concatenate([[0], ends[size - 1 :: size][:-1]])
    return flat[row_starts[:, None] + np.arange(size)]


def ks_statistics(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The two-sample Kolmogorov–Smirnov statistic of each row of ``x`` (B, n) against the same row of ``y``
    (B, m), as ``scipy.stats.ks_2samp`` computes it (ties included), for a thousand resamples at once:
    scipy's own call costs ~9 ms each, most of it argument checking."""
    values = np.concatenate([x, y], axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    steps = np.concatenate([np.full(x.shape, 1.0 / x.shape[1]), np.full(y.shape, -1.0 / y.shape[1])], axis=1)
    gap = np.abs(np.cumsum(np.take_along_axis(steps, order, axis=1), axis=1))
    ordered = np.take_along_axis(values, order, axis=1)
    gap[:, :-1][ordered[:, 1:] == ordered[:, :-1]] = 0.0  # within a run of equal values only its end counts
    return gap.max(axis=1)


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum((x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def _mmd2(kernel: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Squared MMD (V-statistic) of each column of ``weights`` (+1/n on one sample, -1/m on the other): aᵀKa,
    so many resampled pairs of samples cost one matrix product with the kernel."""
    return np.einsum("ip,ip->p", weights, kernel @ weights)


def _mmd_reference(ref: Reference) -> tuple[np.ndarray, np.ndarray, float]:
    """The reference side of the MMD test (at most ``MMD_MAX`` kept embeddings, a fixed sample), their patient
    indices and the bandwidth: the reference's median squared distance, fixed so that the null distribution
    does not depend on the window."""
    index = np.arange(len(ref.projected))
    if len(index) > MMD_MAX:
        index = np.sort(np.random.default_rng(0).choice(len(index), MMD_MAX, replace=False))
    points = ref.projected[index].astype(np.float64)
    bandwidth = float(np.median(_squared_distances(points, points)[np.triu_indices(len(points), 1)])) or 1.0
    return points, ref.vector_groups[index], bandwidth


def null_distributions(ref: Reference, n: int, resamples: int) -> dict[str, np.ndarray]:
    """What the three statistics do on windows of ``n`` images from the reference's own population, by a
    patient-grouped bootstrap of the reference: a pseudo-window of ``n`` images against a pseudo-reference of
    the reference's size, both drawn patient by patient. Cached per window size (an endpoint's window has one).

    Why not the textbook nulls (KS's, an image permutation, a binomial): they assume independent images,
    and one patient's images are alike (the validation set has 1-30 images a patient); windows of other
    validation patients then differ from the reference by more than those nulls allow, and alarmed in 3 of 20
    (docs/drift.md). The bootstrap keeps the patients together on both sides.
    """
    key = (n, resamples)
    if key in ref._nulls:
        return ref._nulls[key]
    rng = np.random.default_rng(n)
    window = ref.scores[grouped_draws(ref.score_groups, n, resamples, rng)]
    ks = ks_statistics(window, ref.scores[grouped_draws(ref.score_groups, len(ref.scores), resamples, rng)])
    points, groups, bandwidth = _mmd_reference(ref)
    n_mmd = min(n, MMD_MAX)
    weights = np.zeros((len(points), resamples))
    columns = np.arange(resamples)[:, None]
    np.add.at(weights, (grouped_draws(groups, n_mmd, resamples, rng), columns), 1.0 / n_mmd)
    np.add.at(weights, (grouped_draws(groups, len(points), resamples, rng), columns), -1.0 / len(points))
    nulls = {"scores_ks": ks, "embeddings_mmd": _mmd2(np.exp(-_squared_distances(points, points) / bandwidth), weights)}
    if ref.held_out_outside.size:  # the share flagged, less the reference's own held-out share: both are estimates
        flags = ref.held_out_outside
        nulls["ood_share"] = (flags[grouped_draws(ref.vector_groups, n, resamples, rng)].mean(axis=1)
                              - flags[grouped_draws(ref.vector_groups, len(flags), resamples, rng)].mean(axis=1))  # fmt: skip
    if len(ref._nulls) >= MAX_NULLS:
        ref._nulls.pop(next(iter(ref._nulls)))
    ref._nulls[key] = nulls
    return nulls


def _p_value(null: np.ndarray, observed: float) -> float:
    return float((1 + np.sum(null >= observed)) / (len(null) + 1))


def _subsample(values: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= size else values[rng.choice(len(values), size, replace=False)]


def window_tests(ref: Reference, scores: np.ndarray, projected: np.ndarray, inside: np.ndarray, config: DriftConfig,
                 seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The verdict on a window of scored images (raw scores, ``project``ed embeddings, gate results).

    Each statistic's p-value comes from :func:`null_distributions` (``config.permutations`` resamples);
    a format-1 reference has no held-out gate verdicts and tests the share flagged binomially.
    """
    scores, inside = np.asarray(scores, np.float64), np.asarray(inside, bool)
    n = len(scores)
    result: dict[str, Any] = {"n": n, "alpha": config.alpha, "correction": "holm",
                              "null": "patient-grouped bootstrap of the reference",
                              "rule": f"drift when any Holm-adjusted p-value <= {config.alpha} (at least {config.min_images} images)"}  # fmt: skip
    if n < config.min_images:
        return {"verdict": "insufficient data", **result, "tests": {}}
    rng = np.random.default_rng(seed)
    nulls = null_distributions(ref, n, config.permutations)
    ks = float(ks_statistics(scores[None], ref.scores[None].astype(np.float64))[0])
    points, _, bandwidth = _mmd_reference(ref)
    window = _subsample(np.asarray(projected, np.float64), MMD_MAX, rng)
    weights = np.concatenate([np.full(len(window), 1.0 / len(window)), np.full(len(points), -1.0 / len(points))])[:, None]
    pooled = np.concatenate([window, points])
    mmd = float(_mmd2(np.exp(-_squared_distances(pooled, pooled) / bandwidth), weights)[0])
    flagged = int((~inside).sum())
    share = {"observed": flagged / n, "expected": ref.ood_rate, "flagged": flagged}
    if "ood_share" in nulls:
        share["p_value"] = _p_value(nulls["ood_share"], flagged / n - float(ref.held_out_outside.mean()))
    else:
        share["p_value"] = float(stats.binomtest(flagged, n, max(ref.ood_rate, 1e-6), alternative="greater").pvalue)
    tests = {
        "scores_ks": {"statistic": ks, "p_value": _p_value(nulls["scores_ks"], ks), "n": n, "n_reference": len(ref.scores)},
        "embeddings_mmd": {"statistic": mmd, "p_value": _p_value(nulls["embeddings_mmd"], mmd), "bandwidth": bandwidth,
                           "n": len(window), "n_reference": len(points)},
        "ood_share": share,
    }  # fmt: skip
    for test in tests.values():
        test["resamples"] = config.permutations
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
