import pytest

from pneumonet import storage
from pneumonet.errors import StorageError


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_write_read_list_delete(kind, tmp_path, request):
    root = str(tmp_path / "root") if kind == "local" else request.getfixturevalue("s3_bucket") + "/prefix"
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"123")
    storage.write_text(storage.join(root, "b.txt"), "hello")
    storage.write_bytes(storage.join(root, ".hidden"), b"skip me")
    entries = storage.list_files(root)
    assert [e.uri for e in entries] == [storage.join(root, "a", "x.bin"), storage.join(root, "b.txt")]
    assert [e.size for e in entries] == [3, 5]
    assert storage.read_text(storage.join(root, "b.txt")) == "hello"
    assert storage.exists(storage.join(root, "a", "x.bin"))
    storage.check_access(root, write=True)
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))


def test_dir_round_trip_through_s3(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("x")
    storage.upload_dir(src, s3_bucket + "/dir")
    with storage.local_path(s3_bucket + "/dir") as local:
        assert (local / "sub" / "f.txt").read_text() == "x"


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(StorageError, match="nope"):
        storage.list_files(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope.bin"))


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz"):
        storage.check_access("s3://no-such-bucket-xyz/data")


def test_wrong_credentials_are_a_clear_error(s3_bucket, monkeypatch):
    # moto accepts any key, so point at a closed port to get a connection failure instead.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError) as err:
        storage.check_access(s3_bucket + "/data")
    assert s3_bucket in str(err.value)
    assert "cannot reach" in str(err.value)
    assert "testing" not in str(err.value)  # the secret never appears in messages


def test_a_root_reached_through_dotdot_or_a_hidden_folder_is_listed(tmp_path, monkeypatch):
    """Only the parts below the listed root count as hidden: ``../data`` and ``~/.cache/x`` must list."""
    root = tmp_path / ".cache" / "data"
    storage.write_bytes(str(root / "a.bin"), b"1")
    storage.write_bytes(str(root / ".skip" / "b.bin"), b"2")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert [e.size for e in storage.list_files("../.cache/data")] == [1]
    assert [e.size for e in storage.list_files(str(root))] == [1]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_read_bytes_refuses_a_file_over_max_bytes_from_its_size(kind, tmp_path, request):
    root = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(root, "scan.dcm")
    storage.write_bytes(uri, b"x" * 1000)
    assert storage.read_bytes(uri, max_bytes=1000) == b"x" * 1000
    with pytest.raises(StorageError, match=rf"^{uri}: file is 1000 bytes, over the limit of 999 \(data\.max_image_bytes\); not read$"):
        storage.read_bytes(uri, max_bytes=999)
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(storage.join(root, "missing.dcm"), max_bytes=999)


def test_a_local_path_is_never_reported_as_a_network_error(tmp_path):
    folder = tmp_path / "connect-timeout-curl-resolve"
    folder.mkdir()
    with pytest.raises(StorageError) as missing:
        storage.read_bytes(str(folder / "scan.png"))
    assert str(missing.value) == f"{folder / 'scan.png'}: no such file or folder"
    with pytest.raises(StorageError) as directory:
        storage.read_bytes(str(folder))
    assert "is a directory" in str(directory.value) and "cannot reach" not in str(directory.value)


def test_s3_errors_are_classified_by_aws_error_code(s3_bucket, monkeypatch):
    with pytest.raises(StorageError, match="the bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-for-codes/x", b"1")
    with pytest.raises(StorageError, match="no such file or folder"):
        storage.read_bytes(f"{s3_bucket}/timeout/connect.png")  # words in the key say nothing
    denied = OSError("When reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) "
                     "during HeadObject operation: No response body.")  # fmt: skip
    assert "access denied" in str(storage._explain("s3://b/k", denied))
    assert "access denied" not in str(storage._explain("/data/AWS Error ACCESS_DENIED during x", OSError("boom")))


@pytest.mark.parametrize(("key", "secret"), [("AKIAEXAMPLE", None), ("AKIAEXAMPLE", ""), (None, "s3cr3t-never-shown")])
def test_half_a_credential_pair_is_refused_not_replaced_by_the_default_chain(key, secret, monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match=r"is set but AWS_\w+ is not \(or is empty\): set both, or neither") as caught:
        storage.read_bytes("s3://bucket/scan.png")
    assert "s3cr3t" not in str(caught.value) and "AKIA" not in str(caught.value)
