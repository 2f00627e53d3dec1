"""Patient-grouped, label-stratified validation split, and the plan of a training run drawn from it.

Several X-rays of one patient look alike; if they sit on both sides of the split the validation
score (and the decision threshold chosen on it) is optimistic. So whole patients are held out,
keeping the NORMAL/PNEUMONIA ratio, reproducibly for a seed. :func:`plan_splits` draws it once per
run, on the driver; the run's manifest keeps it (:func:`saved_plan` reads it back on ``--resume``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from pneumonet.config import Config
from pneumonet.data.catalog import labels_of, manifest_digest, require_classes, scan, usable
from pneumonet.errors import DataError


def _validation_mask(pool: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    labels = labels_of(pool)
    groups = pool["patient_id"].to_numpy()
    n_splits = max(2, round(1 / val_fraction))
    per_class_patients = pool.groupby("label")["patient_id"].nunique()
    if per_class_patients.min() >= n_splits:
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val_index = next(folds.split(np.zeros(len(pool)), labels, groups))
    else:  # too few patients to stratify by folds: a plain grouped draw
        draw = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        _, val_index = next(draw.split(np.zeros(len(pool)), labels, groups))
    mask = np.zeros(len(pool), dtype=bool)
    mask[val_index] = True
    return mask


def assign_validation(manifest: pd.DataFrame, val_fraction: float, seed: int, merge_val_folder: bool = True) -> pd.DataFrame:
    """Usable rows with ``split`` set to train/val/test, validation patients drawn from the training pool.

    With ``merge_val_folder`` the official ``val/`` images (16 in the Kaggle release, too few to pick a
    threshold on) join the pool first; otherwise the ``val/`` folder is used as it is.
    """
    rows = usable(manifest).copy()
    if not merge_val_folder and (rows["split"] == "val").any():
        return rows
    pool_mask = rows["split"].isin(["train", "val"])
    pool = rows[pool_mask]
    if pool.empty:
        raise DataError("no training images: the train/ split is empty")
    if pool["patient_id"].nunique() < 4 or pool["label"].nunique() < 2:
        raise DataError(
            f"cannot draw a validation split from {len(pool)} training images of "
            f"{pool['patient_id'].nunique()} patients and {pool['label'].nunique()} class(es): need both classes "
            "and at least 4 patients"
        )
    is_val = _validation_mask(pool.reset_index(drop=True), val_fraction, seed)
    rows.loc[pool.index, "split"] = np.where(is_val, "val", "train")
    for split in ("train", "val"):
        part = rows[rows["split"] == split]
        if part["label"].nunique() < 2:
            raise DataError(
                f"the patient-grouped {split} split has only {part['label'].unique().tolist()} images; "
                "add images of both classes or change data.val_fraction"
            )
    return rows.reset_index(drop=True)


def limit_per_class(rows: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows per (split, label), drawn reproducibly; for quick runs on big archives."""
    if limit is None:
        return rows
    shuffled = rows.sample(frac=1.0, random_state=seed)
    return shuffled.groupby(["split", "label"]).head(limit).reset_index(drop=True)


@dataclass
class SplitPlan:
    """The catalog of a dataset and its rows per split, drawn once (patient-grouped validation)."""

    root: str
    manifest: pd.DataFrame  # every file, with the final split and an error for unusable ones
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def with_failures(self, failed: dict[str, str]) -> SplitPlan:
        """The plan after decoding: failed files get their reason in the manifest and leave the splits;
        DataError when that leaves train or val without a class."""
        manifest = self.manifest.copy()
        manifest.loc[manifest["uri"].isin(failed), "error"] = manifest["uri"].map(failed)

        def keep(rows: pd.DataFrame) -> pd.DataFrame:
            return rows[~rows["uri"].isin(failed)].reset_index(drop=True)

        plan = SplitPlan(self.root, manifest, keep(self.train), keep(self.val), keep(self.test))
        for split in ("train", "val"):
            if getattr(plan, split)["label"].nunique() < 2:
                raise DataError(f"{self.root}: after skipping unreadable files the {split} split lacks a class")
        return plan

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest[self.manifest["error"].isna()])


def plan_splits(config: Config, root: str) -> SplitPlan:
    """Catalog ``root`` and split validation patients off train/ (DataError when a split lacks a class)."""
    manifest = scan(root)
    rows = assign_validation(manifest, config.data.val_fraction, config.seed, config.data.merge_val_folder)
    rows = limit_per_class(rows, config.data.limit_per_class, config.seed)
    return saved_plan(root, pd.concat([rows, manifest[manifest["error"].notna()]], ignore_index=True))


def saved_plan(root: str, manifest: pd.DataFrame) -> SplitPlan:
    """The plan of a manifest whose split is final (a resumed run trains on the patients it started with)."""
    rows = manifest[manifest["error"].isna()]
    train, val = (require_classes(rows, split, root) for split in ("train", "val"))
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    return SplitPlan(root, manifest.reset_index(drop=True), train, val, test)
