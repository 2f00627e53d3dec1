"""Patient-grouped, label-stratified validation split.

Several X-rays of one patient look alike; if they sit on both sides of the split the validation
score (and the decision threshold chosen on it) is optimistic. So whole patients are held out,
keeping the NORMAL/PNEUMONIA ratio, reproducibly for a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from pneumonet.data.catalog import labels_of, usable
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
