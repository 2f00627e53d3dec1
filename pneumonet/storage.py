"""Local folders and ``s3://`` URIs behind one small interface (pyarrow filesystems).

S3 settings come from the usual AWS environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible servers.
Credentials are never put into messages or logs; errors name the URI and the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow
import pyarrow.fs as pafs

from pneumonet.errors import StorageError

S3_SCHEME = "s3://"
# pyarrow's S3 errors read "... AWS Error <CODE> during <Operation> operation: ...", with
# "UNKNOWN (HTTP status 403)" for codes the AWS SDK has no name for: the code, not the wording, says why.
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)(?: \(HTTP status (\d+)\))? during ")
_DENIED = frozenset({"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_CLIENT_TOKEN_ID",
                     "MISSING_AUTHENTICATION_TOKEN", "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT"})  # fmt: skip
_UNREACHABLE = frozenset({"NETWORK_CONNECTION", "REQUEST_TIMEOUT", "ENDPOINT_RESOLUTION_FAILURE"})
_MISSING = frozenset({"NO_SUCH_KEY", "RESOURCE_NOT_FOUND"})


class PreconditionFailed(StorageError):
    """A conditional write lost: the object already exists, or changed since it was read."""


@dataclass(frozen=True)
class FileEntry:
    """One file found under a root."""

    uri: str
    size: int


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def s3_endpoint() -> str | None:
    """The S3 endpoint override, if any (MinIO, moto, a private gateway)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_settings() -> tuple:
    """The environment that shapes an S3 client; the cache key of :func:`_s3_filesystem`."""
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
    )
    return tuple(os.environ.get(name) for name in names)


def _check_credentials(settings: tuple) -> None:
    """A key without its secret (or the reverse) is a mistake, say an empty Secret: it must not
    silently fall back to the default credential chain (instance role, ~/.aws) and its identity."""
    key, secret = settings[:2]
    if bool(key) != bool(secret):
        have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        raise StorageError(
            f"{have} is set but {lack} is not (or is empty): set both, or neither to use the default credential chain"
        )


@lru_cache(maxsize=8)
def _s3_filesystem(settings: tuple) -> pafs.S3FileSystem:
    key, secret, token, region, default_region, _, _ = settings
    kwargs: dict = {
        "region": region or default_region or "us-east-1",
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path to pass to it.

    Not ``pyarrow.fs.FileSystem.from_uri``: it builds a new S3 client per call, from the URI alone, without
    the endpoint override, timeouts and retries of :func:`_s3_filesystem` (cached per environment).
    """
    uri = str(uri)
    if is_s3(uri):
        path = uri[len(S3_SCHEME) :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket name")
        settings = _s3_settings()
        _check_credentials(settings)
        return _s3_filesystem(settings), path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def absolute(uri: str) -> str:
    """Local paths made absolute (as :func:`list_files` returns them); ``s3://`` without a trailing slash."""
    return str(uri).rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """Join path parts onto a folder or ``s3://`` prefix."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _explain(uri: str, exc: Exception) -> StorageError:
    """The reason, from the exception's type and (for S3) its AWS error code; never from a path's words."""
    text = str(exc)
    found = _AWS_ERROR.findall(text) if is_s3(uri) else []
    code, status = found[-1] if found else ("", "")
    if code in _DENIED or status == "403":
        why = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
    elif code == "NO_SUCH_BUCKET":
        why = "the bucket does not exist"
    elif code in _UNREACHABLE:
        endpoint = s3_endpoint() or "the default AWS endpoint"
        why = f"cannot reach the S3 endpoint ({endpoint}); check AWS_ENDPOINT_URL and the network"
    elif code in _MISSING or isinstance(exc, FileNotFoundError):
        why = "no such file or folder"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = text.splitlines()[0] if text else type(exc).__name__
    return StorageError(f"{uri}: {why}")


@contextlib.contextmanager
def _reported(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, pyarrow.ArrowException) as exc:
        raise _explain(uri, exc) from None


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """A whole file; with ``max_bytes``, a larger one is refused from its size before any of it is read."""
    fs, path = filesystem(uri)
    if max_bytes is None:
        with _reported(uri), fs.open_input_stream(path) as stream:
            return stream.read()
    with _reported(uri), fs.open_input_file(path) as file:  # its size comes with the open (stat, HEAD)
        size = file.size()
        if size <= max_bytes:
            data = file.read(max_bytes + 1)  # bounded even if the file grew since
            size = len(data)
    if size > max_bytes:
        raise StorageError(f"{uri}: file is {size} bytes, over the limit of {max_bytes} (data.max_image_bytes); not read",
                           kind="over_byte_limit")  # fmt: skip
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temporary file so readers never see half a file."""
    fs, path = filesystem(uri)
    with _reported(uri):
        if is_s3(uri):
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=f".{target.name}.") as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _reported(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _reported(uri):
        return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, recursive: bool = True) -> list[FileEntry]:
    """Every file under a folder or prefix, sorted by URI; hidden files (``.name``) are skipped.

    Only the parts below ``uri`` count as hidden: a root such as ``../data`` or ``~/.cache/x`` is listed.
    """
    fs, path = filesystem(uri)
    with _reported(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such folder or prefix")
        if info.type == pafs.FileType.File:
            return [FileEntry(str(uri), info.size or 0)]
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        infos = fs.get_file_info(selector)
    prefix = S3_SCHEME if is_s3(uri) else ""
    entries = [
        FileEntry(prefix + item.path, item.size or 0)
        for item in infos
        if item.type == pafs.FileType.File
        and not any(part.startswith(".") for part in PurePosixPath(item.path).relative_to(path).parts)
    ]
    return sorted(entries, key=lambda entry: entry.uri)


def content_tags(root: str, entries: Sequence[FileEntry]) -> dict[str, str]:
    """A tag of each file's contents, by URI: ``sha256:<hex>`` of the bytes for local files (read in
    parallel), ``etag:<ETag>`` for S3, from a listing (no download; an ETag changes when the bytes do:
    it is their MD5, or for a multipart upload the MD5 of its parts')."""
    if not is_s3(root):
        with ThreadPoolExecutor(max_workers=8) as pool:
            digests = pool.map(lambda entry: hashlib.sha256(read_bytes(entry.uri)).hexdigest(), entries)
            return {entry.uri: f"sha256:{digest}" for entry, digest in zip(entries, digests, strict=True)}
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(root)
    prefix = key.rstrip("/") + "/" if key else ""
    tags: dict[str, str] = {}
    try:
        for page in _boto_s3(_s3_settings()).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                tags[f"{S3_SCHEME}{bucket}/{item['Key']}"] = "etag:" + item["ETag"].strip('"')
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"{root}: cannot list ETags ({exc})") from None
    return {entry.uri: tags[entry.uri] for entry in entries if entry.uri in tags}


def delete(uri: str) -> None:
    """Remove a file or a whole folder/prefix; a missing one is not an error."""
    fs, path = filesystem(uri)
    with _reported(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def copy(source: str | Path, target: str | Path) -> None:
    """Copy a file, or every file under a folder or prefix, to ``target``, streamed (pyarrow.fs.copy_files:
    no whole file in memory). Unlike :func:`write_bytes`, a local target file is written in place."""
    source_fs, source_path = filesystem(str(source))
    target_fs, target_path = filesystem(str(target))
    with _reported(str(source)):
        if not is_s3(str(target)):
            parent = target_path if source_fs.get_file_info(source_path).type == pafs.FileType.Directory else os.path.dirname(target_path)
            Path(parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(source_path, target_path, source_filesystem=source_fs, destination_filesystem=target_fs)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files to a folder or ``s3://`` prefix."""
    copy(Path(local_dir).absolute(), uri)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy a folder or prefix into a local folder and return it."""
    copy(uri, Path(local_dir).absolute())
    return Path(local_dir)


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[Path]:
    """A local path for a file or folder: itself when local, a temporary download for ``s3://``."""
    if not is_s3(uri):
        yield Path(uri).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="pneumonet-") as tmp:
        if is_dir(uri):
            yield download_dir(uri, Path(tmp) / "dir")
        else:
            target = Path(tmp) / Path(uri).name
            copy(uri, target)
            yield target


def check_access(uri: str, write: bool = False) -> None:
    """Fail fast, naming the URI, when a location cannot be reached (or written, with ``write``)."""
    fs, path = filesystem(uri)
    with _reported(uri):
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{uri}: the bucket {bucket!r} does not exist or is not visible with these credentials")
        if write:
            probe = join(uri, ".pneumonet-write-probe")
            write_bytes(probe, b"ok")
            delete(probe)
        elif fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such file, folder or prefix")


# --- conditional writes: what makes a pointer update safe when two writers race ---------------------
#
# S3: PutObject with If-None-Match: * (create only) or If-Match: <ETag> (replace only what was read),
# which S3 has honoured since 2024 (MinIO and moto too); pyarrow cannot send them, so boto3 does.
# Local folders: create-only is a hard link of a finished temporary file (atomic, fails if the name
# exists); replace-if-unchanged holds an flock on a lock file beside the target while it compares and
# renames. Both hold on one machine's filesystem, not across NFS clients.


@lru_cache(maxsize=8)
def _boto_s3(settings: tuple):
    import boto3
    from botocore.config import Config as BotoConfig

    key, secret, token, region, default_region, _, _ = settings
    endpoint = s3_endpoint()
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return boto3.client(
        "s3",
        region_name=region or default_region or "us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=key or None,
        aws_secret_access_key=secret or None,
        aws_session_token=token or None,
        config=BotoConfig(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"},
                          s3={"addressing_style": "path" if endpoint else "auto"}),  # fmt: skip
    )


def _bucket_key(uri: str) -> tuple[str, str]:
    settings = _s3_settings()
    _check_credentials(settings)
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    return bucket, key


def _s3_call(uri: str, operation: str, **kwargs):
    """One boto3 S3 call; a failed precondition is :class:`PreconditionFailed`, anything else a StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(uri)
    try:
        return getattr(_boto_s3(_s3_settings()), operation)(Bucket=bucket, Key=key, **kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            raise PreconditionFailed(f"{uri}: changed by another writer ({code or status})") from None
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: the bucket does not exist") from None
        if code in ("NoSuchKey", "404") or status == 404:
            raise FileNotFoundError(uri) from None
        raise StorageError(f"{uri}: {code or status}: {exc.response.get('Error', {}).get('Message', '')}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: {exc}") from None


def _local_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tagged(uri: str) -> tuple[bytes, str] | None:
    """A small object and the tag a conditional replace needs (S3: its ETag), or None when it does not exist."""
    if is_s3(uri):
        try:
            response = _s3_call(uri, "get_object")
        except FileNotFoundError:
            return None
        return response["Body"].read(), response["ETag"]
    path = Path(filesystem(uri)[1])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _explain(uri, exc) from None
    return data, _local_tag(data)


def _ours(uri: str, data: bytes) -> bool:
    """After a refused write: is what is there ours (an S3 retry of a request that had succeeded)?"""
    found = read_tagged(uri)
    return found is not None and found[0] == data


def write_new(uri: str, data: bytes) -> None:
    """Create ``uri`` with ``data``; :class:`PreconditionFailed` if it exists already (never overwritten)."""
    if is_s3(uri):
        try:
            _s3_call(uri, "put_object", Body=data, IfNoneMatch="*")
        except PreconditionFailed:
            if not _ours(uri, data):
                raise
        return
    target = Path(filesystem(uri)[1])
    with _reported(uri):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=f".{target.name}.") as tmp:
            tmp.write(data)
        try:
            os.link(tmp.name, target)
        except FileExistsError:
            raise PreconditionFailed(f"{uri}: exists already") from None
        finally:
            os.unlink(tmp.name)


def replace_tagged(uri: str, data: bytes, tag: str | None) -> None:
    """Write ``uri`` only if it still holds what :func:`read_tagged` returned with ``tag`` (None: only if
    it does not exist); :class:`PreconditionFailed` otherwise."""
    if tag is None:
        write_new(uri, data)
        return
    if is_s3(uri):
        try:
            _s3_call(uri, "put_object", Body=data, IfMatch=tag)
        except PreconditionFailed:
            if not _ours(uri, data):
                raise
        return
    target = Path(filesystem(uri)[1])
    with _reported(uri), open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = read_tagged(uri)
        if found is None or found[1] != tag:
            raise PreconditionFailed(f"{uri}: changed by another writer since it was read")
        write_bytes(uri, data)
