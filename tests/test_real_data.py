"""Checks on the real chest X-rays in ../shared/data/chest-xray-224 (run with `pytest -m real_data`)."""

import numpy as np
import pytest
from conftest import REAL_DATA

from pneumonet.config import load_config
from pneumonet.data.catalog import scan, summarize
from pneumonet.data.pipeline import load_image_set
from pneumonet.data.split import assign_validation

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (REAL_DATA / "train").is_dir(), reason=f"real data not found at {REAL_DATA}/train"),
]


def test_catalog_of_the_original_release():
    summary = summarize(scan(str(REAL_DATA)))["train"]
    assert (summary["NORMAL"], summary["PNEUMONIA"]) == (1341, 3875)
    assert (summary["BACTERIA"], summary["VIRUS"], summary["UNKNOWN_SUBTYPE"]) == (2530, 1345, 0)
    assert summary["unusable"] == 0


def test_patient_split_of_the_real_data_never_leaks():
    rows = assign_validation(scan(str(REAL_DATA)), val_fraction=0.15, seed=42)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert 0.12 < len(val) / len(rows) < 0.18
    assert abs((val["label"] == "PNEUMONIA").mean() - (rows["label"] == "PNEUMONIA").mean()) < 0.03


def test_every_real_image_decodes():
    rows = scan(str(REAL_DATA))
    images = load_image_set(rows, 224, load_config().data)
    assert images.failures == {}
    assert images.images.shape == (5216, 224, 224, 1) and images.images.dtype == np.uint8


SITE = REAL_DATA.parent / "site-sample"


@pytest.mark.skipif(not (SITE / "test").is_dir(), reason=f"site sample not found at {SITE}/test")
def test_the_site_sample_parses():
    """The "version 3" names of the site sample give label, subtype and patient for every image."""
    site = scan(str(SITE))
    summary = summarize(site)["test"]
    assert (summary["NORMAL"], summary["PNEUMONIA"], summary["UNKNOWN_SUBTYPE"], summary["unusable"]) == (78, 130, 0, 0)
    assert summary["BACTERIA"] + summary["VIRUS"] == 130
    assert 0 < summary["patients"] < 208 and site["patient_id"].str.fullmatch(r"\d+").all()
