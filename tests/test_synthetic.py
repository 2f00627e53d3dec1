"""The synthetic dataset: Kaggle layout, both naming conventions, patients, determinism, pixels."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pneumonet.data.images import load_image, load_many
from pneumonet.data.synthetic import synthesize_dataset
from pneumonet.errors import DataError

# Patient id = the name up to the image counter; the class each pattern may appear in.
CONVENTIONS = {
    "original": [
        (re.compile(r"^((?:NORMAL2-)?IM-\d{4,})-\d{4}(?:-\d{4})?\.jpeg$"), "NORMAL", "normal"),
        (re.compile(r"^(person\d+)_(bacteria)_\d+\.jpeg$"), "PNEUMONIA", "bacteria"),
        (re.compile(r"^(person\d+)_(virus)_\d+\.jpeg$"), "PNEUMONIA", "virus"),
    ],
    "version3": [
        (re.compile(r"^(NORMAL-\d+)-\d{4}\.jpeg$"), "NORMAL", "normal"),
        (re.compile(r"^(BACTERIA-\d+)-\d{4}\.jpeg$"), "PNEUMONIA", "bacteria"),
        (re.compile(r"^(VIRUS-\d+)-\d{4}\.jpeg$"), "PNEUMONIA", "virus"),
    ],
}


def parse(name: str) -> tuple[str, str, str, str]:
    """(convention, label, subtype, patient) of a synthetic file name; fails the test if none fits."""
    hits = [
        (convention, label, subtype, match.group(1))
        for convention, patterns in CONVENTIONS.items()
        for pattern, label, subtype in patterns
        if (match := pattern.match(name))
    ]
    assert len(hits) == 1, f"{name} matches {len(hits)} naming patterns"
    return hits[0]


def files_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpeg"))


def test_layout_and_counts(synthetic_root: Path):
    files = files_of(synthetic_root)
    assert {p.relative_to(synthetic_root).parent.as_posix() for p in files} == {
        f"{split}/{label}" for split in ("train", "val", "test") for label in ("NORMAL", "PNEUMONIA")
    }
    assert len(list(synthetic_root.rglob("*"))) == len(files) + 9  # nothing but the 9 folders and images
    counts = Counter(p.relative_to(synthetic_root).parent.as_posix() for p in files)
    assert counts["train/NORMAL"] + counts["train/PNEUMONIA"] == 96
    assert counts["train/PNEUMONIA"] == 3 * counts["train/NORMAL"]
    assert counts["test/NORMAL"] >= 8 and counts["test/PNEUMONIA"] >= 8
    assert counts["test/NORMAL"] + counts["test/PNEUMONIA"] <= 96 // 4 + 8
    assert 2 <= counts["val/NORMAL"] <= 8 and 2 <= counts["val/PNEUMONIA"] <= 8


def test_names_follow_both_conventions_with_several_images_per_patient(synthetic_root: Path):
    files = files_of(synthetic_root)
    assert len({p.name for p in files}) == len(files), "file names must be unique across the dataset"
    conventions: dict[str, Counter] = defaultdict(Counter)
    subtypes: Counter = Counter()
    patients: dict[str, set[str]] = defaultdict(set)
    for path in files:
        convention, label, subtype, patient = parse(path.name)
        split, folder = path.parent.parent.name, path.parent.name
        assert label == folder, f"{path} is in the wrong class folder"
        conventions[label][convention] += 1
        subtypes[subtype] += 1
        patients[patient].add(f"{split}/{folder}")
    for label in ("NORMAL", "PNEUMONIA"):
        share = conventions[label]["original"] / sum(conventions[label].values())
        assert 0.2 < share < 0.8, f"{label}: {dict(conventions[label])}"
    assert subtypes["bacteria"] > subtypes["virus"] > 0
    assert all(len(places) == 1 for places in patients.values()), "a patient spans splits or classes"
    images_per_patient = Counter(parse(p.name)[3] for p in files)
    assert max(images_per_patient.values()) <= 4
    assert sum(n > 1 for n in images_per_patient.values()) >= 5
    assert len(images_per_patient) < len(files)


def test_images_are_grayscale_jpegs_that_decode(synthetic_root: Path):
    files = files_of(synthetic_root)
    with Image.open(files[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "L", (64, 64))
    for path in files[:: len(files) // 10]:
        pixels = load_image(path.read_bytes(), str(path), 32)
        assert pixels.shape == (32, 32, 1) and pixels.dtype == np.uint8
        assert pixels.std() > 20 and pixels.min() < 60 and pixels.max() > 150


def test_pneumonia_brightens_the_lungs_but_not_trivially(synthetic_root: Path):
    files = [str(p) for p in files_of(synthetic_root)]
    sick = np.array(["PNEUMONIA" in f for f in files])
    images = load_many(files, 64).images[..., 0].astype(float)
    lungs = np.concatenate([images[:, 22:38, 10:22], images[:, 22:38, 42:54]], axis=2).mean(axis=(1, 2))
    spine = images[:, 10:50, 29:35].mean(axis=(1, 2))
    score = lungs / spine  # a crude hand-made feature: lung brightness relative to the mediastinum
    assert score[sick].mean() - score[~sick].mean() > 0.05
    assert 0.65 < roc_auc_score(sick, score) < 0.98


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path: Path):
    def snapshot(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in files_of(root)}

    first = snapshot(synthesize_dataset(tmp_path / "a", n=16, size=32, seed=3))
    again = snapshot(synthesize_dataset(tmp_path / "b", n=16, size=32, seed=3))
    other = snapshot(synthesize_dataset(tmp_path / "c", n=16, size=32, seed=4))
    assert first == again
    assert set(first) != set(other)


def test_returns_root_and_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = synthesize_dataset(tmp_path / "data", n=8, size=16, seed=0)
    assert root == tmp_path / "data"
    assert sum(1 for _ in (root / "train").rglob("*.jpeg")) == 8
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(("n", "size"), [(7, 64), (100, 8)])
def test_refuses_unusable_sizes(tmp_path: Path, n: int, size: int):
    with pytest.raises(DataError, match="too"):
        synthesize_dataset(tmp_path, n=n, size=size)
