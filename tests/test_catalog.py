import shutil

import pandas as pd
import pytest

from pneumonet import storage
from pneumonet.data.catalog import (
    manifest_digest,
    parse_name,
    read_manifest,
    require_classes,
    scan,
    shared_patients,
    summarize,
    usable,
    write_manifest,
)
from pneumonet.data.split import assign_validation
from pneumonet.errors import DataError


@pytest.mark.parametrize(
    ("name", "label", "subtype", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "PNEUMONIA", "bacteria", "person1000"),
        ("person1_virus_6.jpeg", "PNEUMONIA", "virus", "person1"),
        ("IM-0115-0001.jpeg", "NORMAL", "normal", "IM-0115"),
        ("NORMAL2-IM-0007-0001.jpeg", "NORMAL", "normal", "NORMAL2-IM-0007"),
        ("BACTERIA-7422-0001.jpeg", "PNEUMONIA", "bacteria", "7422"),
        ("VIRUS-1010277-0002.png", "PNEUMONIA", "virus", "1010277"),
        ("NORMAL-1003233-0001.jpeg", "NORMAL", "normal", "1003233"),
        ("normal-28-0001.JPEG", "NORMAL", "normal", "28"),
        ("IM-0429-0001-0002.jpeg", "NORMAL", "normal", "IM-0429"),
        ("NORMAL2-IM-0429-0001-0002.jpeg", "NORMAL", "normal", "NORMAL2-IM-0429"),
        ("person447_virus_921_1.jpeg", "PNEUMONIA", "virus", "person447"),
    ],
)
def test_both_naming_conventions(name, label, subtype, patient):
    parsed = parse_name(name)
    assert (parsed.label, parsed.subtype, parsed.patient_id) == (label, subtype, patient)


@pytest.mark.parametrize("name", ["scan.jpeg", "person_bacteria.jpeg", "IM-0115.jpeg", "FUNGUS-1-0001.jpeg"])
def test_unknown_names_are_not_guessed(name):
    assert parse_name(name) is None


def _touch(root, relative, data=b"\xff\xd8fake"):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_nested_and_odd_layouts(tmp_path):
    root = tmp_path / "kaggle"
    _touch(root, "chest_xray/train/NORMAL/IM-0001-0001.jpeg")
    _touch(root, "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg")
    _touch(root, "chest_xray/Test/normal/NORMAL-5-0001.jpeg")  # case-insensitive folders
    _touch(root, "chest_xray/test/PNEUMONIA/sub/VIRUS-9-0001.jpeg")  # deeper nesting
    _touch(root, "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg")
    _touch(root, "chest_xray/train/NORMAL/notes.txt", b"hello")
    _touch(root, "chest_xray/train/NORMAL/IM-0002-0001.jpeg", b"")
    _touch(root, "chest_xray/train/NORMAL/person3_virus_4.jpeg")  # label conflict
    _touch(root, "README.md", b"x")
    manifest = scan(str(root))
    ok = manifest[manifest["error"].isna()]
    assert sorted(ok["split"]) == ["test", "test", "train", "train"]
    errors = dict(zip(manifest["uri"].map(lambda u: u.rsplit("/", 1)[1]), manifest["error"], strict=True))
    assert errors["notes.txt"] == "not an image file (unknown extension)"
    assert errors["IM-0002-0001.jpeg"] == "empty file (0 bytes)"
    assert "says PNEUMONIA" in errors["person3_virus_4.jpeg"]
    assert summarize(manifest)["train"]["unusable"] == 3


def test_files_outside_the_layout_are_kept_counted_and_reported(tmp_path, caplog):
    root = tmp_path / "archive"
    _touch(root, "train/NORMAL/IM-0001-0001.jpeg")
    _touch(root, "train/PNEUMONIA/person1_bacteria_1.jpeg")
    _touch(root, "train/scan-without-class.jpeg")  # a split but no class folder
    _touch(root, "incoming/PNEUMONIA-maybe/person2_virus_2.jpeg")
    _touch(root, "__MACOSX/train/NORMAL/IM-0001-0001.jpeg")
    _touch(root, "README.md", b"x")
    with caplog.at_level("WARNING", logger="pneumonet.data.catalog"):
        manifest = scan(str(root))
    assert len(manifest) == 6  # one row per file, none dropped
    unplaced = manifest[manifest["split"].isna()]
    assert len(unplaced) == 4 and unplaced["error"].notna().all() and unplaced["label"].isna().all()
    outside = unplaced[unplaced["uri"].str.endswith("README.md")]["error"].iloc[0]
    assert outside.startswith("outside the <split>/<CLASS>/ layout")
    assert "__MACOSX" in unplaced[unplaced["uri"].str.contains("__MACOSX")]["error"].iloc[0]
    summary = summarize(manifest)
    assert summary["unplaced"]["unusable"] == 4 and summary["unplaced"]["NORMAL"] == 0
    assert summary["train"]["NORMAL"] == summary["train"]["PNEUMONIA"] == 1 and summary["train"]["unusable"] == 0
    assert "skipping 4 unusable files" in caplog.text and "scan-without-class.jpeg: outside" in caplog.text


def test_names_in_neither_convention_are_reported_as_one_patient_each(tmp_path, caplog):
    root = tmp_path / "site"
    _touch(root, "train/NORMAL/IM-0001-0001.jpeg")
    _touch(root, "train/NORMAL/IM-0001-0002.jpeg")
    for name in ("scan_001.jpeg", "scan_002.jpeg", "xr 7.png"):
        _touch(root, f"train/PNEUMONIA/{name}")
    with caplog.at_level("WARNING", logger="pneumonet.data.catalog"):
        manifest = scan(str(root))
    assert manifest["error"].isna().all()
    assert summarize(manifest)["train"]["patients"] == 4  # IM-0001 once, three unknown names as three
    assert "3 of 5 images have names in neither naming convention (3 in train/), e.g. scan_001.jpeg" in caplog.text
    assert "each counts as its own patient" in caplog.text


def test_scan_of_synthetic_data(synthetic_root):
    manifest = scan(str(synthetic_root))
    summary = summarize(manifest)
    assert set(summary) == {"train", "val", "test"}
    train = summary["train"]
    assert train["NORMAL"] > 0 and train["PNEUMONIA"] == train["BACTERIA"] + train["VIRUS"]
    assert 0 < train["patients"] < train["NORMAL"] + train["PNEUMONIA"]  # several images per patient
    assert manifest["error"].isna().all()


def test_empty_folder_and_missing_class(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        scan(str(tmp_path / "empty"))
    _touch(tmp_path, "one/train/NORMAL/IM-0001-0001.jpeg")
    manifest = scan(str(tmp_path / "one"))
    with pytest.raises(DataError, match="no PNEUMONIA images"):
        require_classes(manifest, "train", "one")


def test_patient_split_never_leaks_and_keeps_ratio(synthetic_root):
    manifest = scan(str(synthetic_root))
    rows = assign_validation(manifest, val_fraction=0.2, seed=1)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert len(val) > 0 and set(val["label"]) == {"NORMAL", "PNEUMONIA"}
    pool = rows[rows["split"].isin(["train", "val"])]
    ratio = (pool["label"] == "PNEUMONIA").mean()
    assert abs((val["label"] == "PNEUMONIA").mean() - ratio) < 0.2
    assert (rows["split"] == "test").sum() == (manifest["split"] == "test").sum()
    again = assign_validation(manifest, val_fraction=0.2, seed=1)
    pd.testing.assert_frame_equal(rows, again)
    other = assign_validation(manifest, val_fraction=0.2, seed=2)
    assert set(other[other["split"] == "val"]["uri"]) != set(val["uri"])


def test_split_on_a_larger_layout_is_stratified(tmp_path):
    # 60 normal patients (1 image), 60 pneumonia patients (3 images each)
    rows = []
    for p in range(60):
        rows.append({"uri": f"n{p}", "split": "train", "label": "NORMAL", "subtype": "normal", "patient_id": f"IM-{p}", "bytes": 1, "error": None})
        for i in range(3):
            rows.append({"uri": f"p{p}-{i}", "split": "train", "label": "PNEUMONIA", "subtype": "bacteria", "patient_id": f"person{p}", "bytes": 1, "error": None})
    split = assign_validation(pd.DataFrame(rows), 0.2, seed=0)
    val = split[split["split"] == "val"]
    assert val.groupby("label")["patient_id"].nunique().to_dict() == {"NORMAL": 12, "PNEUMONIA": 12}


def test_manifest_round_trip_local_and_s3(synthetic_root, tmp_path, s3_bucket):
    manifest = scan(str(synthetic_root))
    for uri in (str(tmp_path / "m.parquet"), s3_bucket + "/m.parquet"):
        write_manifest(manifest, uri)
        back = read_manifest(uri)
        assert manifest_digest(back) == manifest_digest(manifest)
        assert list(back.columns) == ["uri", "split", "label", "subtype", "patient_id", "bytes", "content", "error"]


def test_scan_s3_prefix(synthetic_root, s3_bucket):
    storage.upload_dir(synthetic_root, s3_bucket + "/xray")
    local = scan(str(synthetic_root))
    remote = scan(s3_bucket + "/xray")
    assert summarize(remote) == summarize(local)
    assert remote["uri"].str.startswith(s3_bucket + "/xray/").all()


def test_limit_per_class_keeps_columns_and_caps_each_class(synthetic_root):
    from pneumonet.data.split import limit_per_class

    rows = assign_validation(scan(str(synthetic_root)), val_fraction=0.2, seed=1)
    limited = limit_per_class(rows, 3, seed=0)
    assert list(limited.columns) == list(rows.columns)
    assert limited.groupby(["split", "label"]).size().max() == 3
    assert set(limited["split"]) == set(rows["split"])


def test_a_flat_sample_counts_as_test(tmp_path):
    """<root>/NORMAL and <root>/PNEUMONIA with no split folder: a site's sample, catalogued as test."""
    storage.write_bytes(str(tmp_path / "NORMAL" / "NORMAL-1-0001.jpeg"), b"x")
    storage.write_bytes(str(tmp_path / "PNEUMONIA" / "VIRUS-2-0001.jpeg"), b"x")
    storage.write_bytes(str(tmp_path / "other" / "NORMAL" / "NORMAL-3-0001.jpeg"), b"x")  # not flat: unplaced
    scanned = scan(str(tmp_path))
    assert scanned["split"].isna().sum() == 1 and summarize(scanned)["unplaced"]["unusable"] == 1
    manifest = usable(scanned)
    assert sorted(manifest["label"]) == ["NORMAL", "PNEUMONIA"]
    assert set(manifest["split"]) == {"test"}
    assert sorted(manifest["patient_id"]) == ["1", "2"]


def test_a_test_patient_with_training_images_is_named_when_cataloging(synthetic_root, tmp_path, caplog):
    """A child in both train/ and test/ makes test figures optimistic: cataloging says so, naming the patient."""
    with caplog.at_level("WARNING", logger="pneumonet.data.catalog"):
        assert shared_patients(scan(str(synthetic_root))) == []
    assert "test/ AND in train/" not in caplog.text
    root = tmp_path / "leaky"
    shutil.copytree(synthetic_root, root)
    source = sorted((root / "train" / "PNEUMONIA").glob("person*_bacteria_*"))[0]
    patient = source.name.split("_")[0]
    shutil.copyfile(source, root / "test" / "PNEUMONIA" / f"{patient}_bacteria_9999{source.suffix}")
    with caplog.at_level("WARNING", logger="pneumonet.data.catalog"):
        manifest = scan(str(root))
    assert shared_patients(manifest) == [patient]
    assert f"1 patients have images in test/ AND in train/ or val/: {patient}." in caplog.text


def test_the_manifest_digest_covers_file_contents(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    before = scan(str(root))
    assert before["content"].str.startswith("sha256:").all()
    victim = sorted((root / "train" / "NORMAL").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # same name, same size, other pixels
    victim.write_bytes(bytes(data))
    after = scan(str(root))
    assert (before["bytes"] == after["bytes"]).all()
    assert manifest_digest(usable(before)) != manifest_digest(usable(after))


def test_s3_manifests_carry_etags(synthetic_root, s3_bucket):
    storage.upload_dir(synthetic_root / "test", f"{s3_bucket}/data/test")
    manifest = scan(f"{s3_bucket}/data")
    assert manifest["content"].str.match(r"^etag:[0-9a-f]{32}(-[0-9]+)?$").all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"PAR1 not really parquet PAR1", "is not a readable Parquet file"), (b"", "is not a readable Parquet file"),
     (None, "lacks the columns")],
    ids=["garbage", "empty", "foreign"],
)  # fmt: skip
def test_a_damaged_manifest_is_a_clear_error(tmp_path, data, reason):
    uri = str(tmp_path / "manifest.parquet")
    if data is None:
        write_manifest(pd.DataFrame({"uri": ["a.png"], "label": ["NORMAL"]}), uri)
    else:
        storage.write_bytes(uri, data)
    with pytest.raises(DataError, match=rf"^manifest {uri} {reason}"):
        read_manifest(uri)
