"""Synthetic chest-X-ray-like data for demos, smoke runs and tests (no downloads, no patient data).

The images are cartoons of a PA chest radiograph: bright body and mediastinum, two dark lung
fields crossed by faint ribs, noise and pose/intensity jitter. PNEUMONIA images add opacities in
the lungs: dense lobar consolidation (bacteria) or diffuse patchy haze (virus), some of them faint,
and a few NORMAL images carry faint haze too, so a model can learn the task but not trivially.
Images of one patient share anatomy and disease, so only a patient-grouped split is honest.
File names follow both real naming conventions (see :func:`synthesize_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pneumonet.errors import DataError

_IMAGES_PER_PATIENT = (1, 2, 3, 4)
_IMAGES_PER_PATIENT_P = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class _Patient:
    split: str
    label: str  # NORMAL | PNEUMONIA
    subtype: str  # normal | bacteria | virus
    names: tuple[str, ...]


def _split_counts(n: int) -> dict[str, tuple[int, int]]:
    """(normal, pneumonia) images per split: ~1:3 in train and test, a small balanced val."""
    test = round(n / 4)
    test_normal = max(8, round(test / 4))
    val = max(2, round(n / 50))
    train_normal = max(1, round(n / 4))
    return {
        "train": (train_normal, n - train_normal),
        "val": (val, val),
        "test": (test_normal, max(8, test - test_normal)),
    }


class _Namer:
    """Unique file names in both conventions; patient numbers are unique across the dataset."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self.rng = rng
        self.used: set[int] = set()
        self.space = 10_000 + 10 * n
        self.counters = {"bacteria": int(rng.integers(1, 3000)), "virus": int(rng.integers(1, 1500))}

    def _patient_number(self, low: int, high: int) -> int:
        while True:
            number = int(self.rng.integers(low, high))
            if number not in self.used:
                self.used.add(number)
                return number

    def original(self, subtype: str, k: int) -> tuple[str, ...]:
        """Original release: IM-0115-0001, NORMAL2-IM-0007-0001, person1000_bacteria_2931.

        Like the real data, some multi-image NORMAL patients carry a fourth number
        (IM-0429-0001-0002); the patient is always the part before the second number.
        """
        pid = self._patient_number(1, self.space)
        if subtype == "normal":
            prefix = "IM" if self.rng.random() < 0.5 else "NORMAL2-IM"
            if k > 1 and self.rng.random() < 0.5:
                return tuple(f"{prefix}-{pid:04d}-0001-{i:04d}.jpeg" for i in range(1, k + 1))
            return tuple(f"{prefix}-{pid:04d}-{i:04d}.jpeg" for i in range(1, k + 1))
        names = []
        for _ in range(k):
            self.counters[subtype] += 1
            names.append(f"person{pid}_{subtype}_{self.counters[subtype]}.jpeg")
        return tuple(names)

    def version3(self, subtype: str, k: int) -> tuple[str, ...]:
        """Version 3: NORMAL-<id>-0001, BACTERIA-<id>-0001, VIRUS-<id>-0001."""
        pid = self._patient_number(1000, 10_000_000)
        return tuple(f"{subtype.upper()}-{pid}-{i:04d}.jpeg" for i in range(1, k + 1))


def _plan(n: int, rng: np.random.Generator) -> list[_Patient]:
    """Patients with 1-4 images each, conventions alternating within every split and class."""
    namer = _Namer(rng, n)
    patients = []
    for split, counts in _split_counts(n).items():
        for label, total in zip(("NORMAL", "PNEUMONIA"), counts):
            left, flip = total, int(rng.integers(2))
            while left > 0:
                k = min(left, int(rng.choice(_IMAGES_PER_PATIENT, p=_IMAGES_PER_PATIENT_P)))
                subtype = "normal" if label == "NORMAL" else ("bacteria" if rng.random() < 2 / 3 else "virus")
                names = namer.original(subtype, k) if flip % 2 == 0 else namer.version3(subtype, k)
                patients.append(_Patient(split, label, subtype, names))
                left, flip = left - k, flip + 1
    return patients


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1]."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def _anatomy(rng: np.random.Generator) -> dict:
    """What stays the same across one patient's images."""
    return {
        "body_w": rng.uniform(0.78, 0.92),
        "body": rng.uniform(0.55, 0.7),
        "lung_x": rng.uniform(0.36, 0.44),
        "lung_y": rng.uniform(-0.1, 0.02),
        "lung_w": rng.uniform(0.25, 0.31),
        "lung_h": rng.uniform(0.5, 0.62),
        "lung_depth": rng.uniform(0.3, 0.42),
        "heart": (rng.uniform(0.08, 0.16), rng.uniform(0.3, 0.4), rng.uniform(0.24, 0.32), rng.uniform(0.18, 0.25)),
        "mediastinum_w": rng.uniform(0.09, 0.13),
        "rib_curve": rng.uniform(1.0, 1.6),
        "rib_offset": rng.uniform(0.0, 0.12),
        "rib_amp": rng.uniform(0.04, 0.08),
    }


def _disease(rng: np.random.Generator, subtype: str, anatomy: dict) -> list[tuple]:
    """Opacities as (x, y, sx, sy, amplitude) blobs; amplitude is the share of lung darkness filled.

    One in ten sick patients has only a faint opacity, hard to tell from a healthy lung, and a
    third of NORMAL patients get faint haze (vessels, soft tissue) to blur the line further: with
    this mix a small CNN needs several epochs on a few hundred images to pass ROC-AUC 0.9 and does
    not reach 1.0. (With one in five faint, the demo's CNN stayed near 0.8 at its size: the task was
    not learnable from what the demo can afford to train on.)
    """
    strength = rng.uniform(0.1, 0.35) if rng.random() < 0.1 else rng.uniform(0.45, 1.0)
    if subtype == "normal":
        if rng.random() > 1 / 3:
            return []
        count, strength, spread = int(rng.integers(3, 8)), rng.uniform(0.04, 0.14), (0.04, 0.08)
    elif subtype == "bacteria":  # lobar consolidation: one or two large dense patches
        count, spread = int(rng.integers(1, 3)), (0.2, 0.35)
    else:  # viral: many smaller, softer patches over both lungs
        count, spread = int(rng.integers(8, 16)), (0.1, 0.2)
    side = rng.choice((-1.0, 1.0))  # lobar consolidation sits in one lung; haze is bilateral
    blobs = []
    for _ in range(count):
        if subtype != "bacteria":
            side = rng.choice((-1.0, 1.0))
        radius, angle = rng.uniform(0.0, 0.7), rng.uniform(0.0, 2 * np.pi)
        x = side * anatomy["lung_x"] + radius * anatomy["lung_w"] * np.cos(angle)
        y = anatomy["lung_y"] + radius * anatomy["lung_h"] * np.sin(angle)
        amplitude = strength * rng.uniform(0.7, 1.0) * (1.0 if subtype == "bacteria" else 0.8)
        blobs.append((x, y, rng.uniform(*spread), rng.uniform(*spread), amplitude))
    return blobs


def _render(rng: np.random.Generator, size: int, anatomy: dict, blobs: list[tuple]) -> np.ndarray:
    """One radiograph as uint8 (size, size); ``rng`` supplies this image's pose, noise and jitter."""
    theta, scale = np.deg2rad(rng.uniform(-4, 4)), rng.uniform(0.93, 1.07)
    dx, dy = rng.uniform(-0.05, 0.05, 2)
    v, u = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    x = ((u - dx) * np.cos(theta) + (v - dy) * np.sin(theta)) / scale
    y = (-(u - dx) * np.sin(theta) + (v - dy) * np.cos(theta)) / scale
    edge = 2.0 / size

    body = _ellipse(x, y, 0.0, 0.2, anatomy["body_w"], 1.15, 0.02 + edge)
    hx, hy, hw, hh = anatomy["heart"]
    heart = _ellipse(x, y, hx, hy, hw, hh, 0.1)
    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        # narrower at the apex than at the base, as real lung fields are
        width = anatomy["lung_w"] * np.clip(0.8 + 0.25 * (y - anatomy["lung_y"]) / anatomy["lung_h"], 0.5, 1.1)
        lung = _ellipse(x, y, side * anatomy["lung_x"], anatomy["lung_y"], width, anatomy["lung_h"], 0.06)
        lungs = np.maximum(lungs, lung)
    lungs *= 1.0 - 0.8 * heart

    img = 0.08 + (anatomy["body"] - 0.08) * body
    img += 0.18 * np.exp(-((x / anatomy["mediastinum_w"]) ** 2)) * body + 0.06 * heart
    # nine arcs, 0.15 apart: distance to the nearest one, with a single exp over the grid
    phase = y - anatomy["rib_curve"] * (np.abs(x) - 0.38) ** 2 - anatomy["rib_offset"] + 0.75
    nearest = np.abs(phase - 0.15 * np.clip(np.rint(phase / 0.15), 0, 8))
    ribs = np.exp(-((nearest / 0.022) ** 2))
    depth = anatomy["lung_depth"] * lungs * (1.0 - anatomy["rib_amp"] / anatomy["lung_depth"] * ribs)
    for bx, by, sx, sy, amplitude in blobs:
        jitter_x, jitter_y = rng.normal(0.0, 0.02, 2)
        blob = np.exp(-(((x - bx - jitter_x) / sx) ** 2 + ((y - by - jitter_y) / sy) ** 2))
        depth *= 1.0 - np.clip(amplitude * rng.uniform(0.85, 1.15) * blob * 1.6, 0.0, 0.95)
    img -= depth
    img += 0.03 * _smooth_noise(rng, size, 5) * body

    gamma, contrast, brightness = rng.uniform(0.8, 1.25), rng.uniform(0.85, 1.15), rng.uniform(-0.06, 0.06)
    img = np.clip(img, 0.0, 1.0) ** gamma
    img = (img - 0.5) * contrast + 0.5 + brightness + rng.normal(0.0, rng.uniform(0.015, 0.04), img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def synthesize_dataset(out: str | Path, n: int = 200, size: int = 128, seed: int = 0) -> Path:
    """Write a synthetic dataset in the Kaggle layout under ``out`` and return ``out``.

    ``train/``, ``val/`` and ``test/`` each hold ``NORMAL/`` and ``PNEUMONIA/`` 8-bit grayscale
    JPEGs: ``n`` training images (~1:3 normal:pneumonia), about ``n/4`` test images (at least 8
    per class) and a small balanced val (at least 2 per class). Patients have 1-4 images and use
    either naming convention (alternating, so both appear in every split and class of reasonable
    size): ``IM-0115-0001`` / ``NORMAL2-IM-0007-0001`` / ``person12_bacteria_45`` /
    ``person12_virus_9`` or ``NORMAL-<id>-0001`` / ``BACTERIA-<id>-0001`` / ``VIRUS-<id>-0001``.
    The same ``seed`` gives byte-identical files; files of the same name are overwritten.
    """
    if n < 8:
        raise DataError(f"synthetic dataset: n={n} training images is too few (need at least 8)")
    if size < 16:
        raise DataError(f"synthetic dataset: size={size} px is too small (need at least 16)")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for patient in _plan(n, rng):
        folder = out / patient.split / patient.label
        folder.mkdir(parents=True, exist_ok=True)
        anatomy = _anatomy(rng)
        blobs = _disease(rng, patient.subtype, anatomy)
        for name in patient.names:
            pixels = _render(rng, size, anatomy, blobs)
            Image.fromarray(pixels).save(folder / name, format="JPEG", quality=90)
    return out
