"""One way to reach a local folder, AWS S3 or any S3-compatible store, for every reader and writer in the project.

A location is a URI: ``/abs/or/relative/path``, ``file:///path`` or ``s3://bucket/prefix``. pyarrow's filesystems do the
I/O because Ray Data and Ray Train take them directly. Credentials are never in a config: pyarrow and boto3 read them
from the environment or the instance role of the process that does the I/O (``runtime.init_ray`` says how Ray workers
get them).
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow.fs as pafs

from ray_landmark.data.config import StorageConfig
from ray_landmark.errors import JobError

T = TypeVar("T")

# Where object storage is, which a job may show: the only AWS settings it forwards to a cluster's workers. Credentials
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) never travel: Ray stores a runtime env and shows it
# (job info, dashboard). AWS_PROFILE neither: a profile name fails on a node whose ~/.aws does not define it.
AWS_SETTINGS_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL")


class StorageError(JobError, OSError):
    """A location that cannot be read or written; the message names the URI and what to check."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path that filesystem expects (no scheme for S3)."""

    uri: str
    fs: pafs.FileSystem
    path: str

    def child(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(uri, self.fs, path)

    def uri_of(self, fs_path: str) -> str:
        """The URI of a path on this location's filesystem (for messages and manifests)."""
        return f"s3://{fs_path}" if self.is_s3 else fs_path

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def tries(self, retries: int) -> int:
        """How many times this location's filesystem tries a request, given ``data.storage.retries``: local files
        once."""
        return retries if self.is_s3 else 1


def aws_settings() -> dict[str, str]:
    """The region and endpoint settings of this process's environment (no credentials)."""
    return {k: os.environ[k] for k in AWS_SETTINGS_VARS if k in os.environ}


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    kwargs = dict(
        region=storage.region,
        anonymous=storage.anonymous,
        connect_timeout=storage.connect_timeout_s,
        request_timeout=max(30.0, storage.connect_timeout_s),
        # The one retry layer: per request, so every request of every process (a listing, each read of a shard,
        # streamed or ranged, Ray Train's checkpoint writes) gets storage.retries tries; nothing above it retries.
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=storage.retries),
    )
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            raise StorageError(f"data.storage.endpoint_url {endpoint!r}: expected http://host:port or https://host")
        kwargs.update(endpoint_override=host, scheme=scheme)
    if not storage.anonymous:
        _require_credentials(endpoint)
    return pafs.S3FileSystem(**kwargs)


def _require_credentials(endpoint: str | None) -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        where = f" for {endpoint}" if endpoint else ""
        raise StorageError(
            f"no S3 credentials found{where}: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, attach an instance "
            "role, or set data.storage.anonymous: true for a public bucket"
        )


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Resolve a URI to its filesystem; S3 settings come from ``storage`` (defaults: AWS, signed requests)."""
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r}: an S3 URI needs a bucket, for example s3://my-bucket/gldv2")
        return Location(uri.rstrip("/"), s3_filesystem(storage or StorageConfig()), path)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri!r}: unsupported scheme; use a local path or s3://bucket/prefix")
    path = str(Path(uri.removeprefix("file://")).resolve())
    return Location(path, pafs.LocalFileSystem(), path)


def with_storage_error(what: str, fn: Callable[[], T], tries: int) -> T:
    """Run ``fn``, whose requests the filesystem retries (the S3 filesystem's retry strategy, ``s3_filesystem``: the
    one retry layer; ``tries``: how many times it tries each, 1 for local files); an OSError becomes a StorageError
    saying that ``what`` failed, after how many tries, or that it was not found."""
    try:
        return fn()
    except OSError as err:  # pyarrow raises OSError subclasses (FileNotFoundError, ...) for every I/O failure
        tried = " (not found)" if isinstance(err, FileNotFoundError) else f" after {tries} tries" if tries > 1 else ""
        raise StorageError(f"{what} failed{tried}: {err}") from err


def list_files(loc: Location, suffix: str, tries: int = 3) -> list[str]:
    """Filesystem paths of the files under ``loc`` that end in ``suffix``, sorted; an empty or unreachable prefix
    is an error naming the URI (``tries``: data.storage.retries)."""

    def _list():
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{loc.uri} does not exist")
        selector = pafs.FileSelector(loc.path, recursive=True)
        return sorted(f.path for f in loc.fs.get_file_info(selector) if f.is_file and f.path.endswith(suffix))

    paths = with_storage_error(f"listing {loc.uri}", _list, loc.tries(tries))
    if not paths:
        raise StorageError(f"{loc.uri}: no *{suffix} files found; check data.root")
    return paths


def read_bytes(loc: Location, tries: int = 3) -> bytes:
    def _read():
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()

    return with_storage_error(f"reading {loc.uri}", _read, loc.tries(tries))


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a file in one piece, so that a file that exists is complete: an S3 PUT is atomic; a local file is
    written beside its place and renamed into it."""
    if loc.is_s3:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    partial = f"{loc.path}.partial-{os.getpid()}"
    with loc.fs.open_output_stream(partial) as f:
        f.write(data)
    os.replace(partial, loc.path)


@functools.lru_cache(maxsize=8)
def _s3_client(storage: StorageConfig):
    """A boto3 S3 client with ``storage``'s endpoint, region, tries and timeout (pyarrow's filesystem has no
    conditional write); made once per setting, as a client takes a few hundred milliseconds to make."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region,
                        config=BotoConfig(retries={"max_attempts": storage.retries, "mode": "standard"},
                                          connect_timeout=storage.connect_timeout_s))


def write_new(loc: Location, data: bytes, storage: StorageConfig) -> bool:
    """Write a file in one piece only where nothing is yet: True when written, False when the name was taken (by
    another writer, even one racing this one). What several processes append to without a lock rests on it.

    A local file is written beside its place and hard-linked into it: the link fails if the name exists. On S3 it is a
    conditional PUT (``If-None-Match: *``), which AWS S3 refuses with 412 when the key exists, or with 409 while
    another conditional PUT of the key is in flight. A store must make that check atomic: moto honours the header but
    checks and writes without a lock, so racing writers there can both succeed."""
    if loc.is_s3:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = loc.path.split("/", 1)
        try:
            _s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StorageError(f"writing {loc.uri} failed: {err}") from err
        except BotoCoreError as err:
            raise StorageError(f"writing {loc.uri} failed after {storage.retries} tries: {err}") from err
        return True
    partial = f"{loc.path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        with open(partial, "wb") as f:
            f.write(data)
        try:
            os.link(partial, loc.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(partial)
    except OSError as err:  # no space, no permission, a filesystem without hard links
        raise StorageError(f"writing {loc.uri} failed: {err}") from err


def exists(loc: Location, tries: int = 1) -> bool:
    """Whether anything is at ``loc``; a store that does not answer is a StorageError naming the URI (``tries``: its
    storage's ``retries``, for the message)."""
    info = with_storage_error(f"looking for {loc.uri}", lambda: loc.fs.get_file_info(loc.path), loc.tries(tries))
    return info.type != pafs.FileType.NotFound


def check_writable(loc: Location, what: str) -> None:
    """That a job can write at ``loc`` (``what``: the argument or key that names it), checked before its expensive
    part: a local path whose nearest existing folder is a file, or a folder this process may not write, is a
    StorageError naming both. A bucket is only checked to be reachable (writing is refused only when it is tried)."""
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        info = with_storage_error(f"{what}: looking for bucket s3://{bucket}", lambda: loc.fs.get_file_info(bucket),
                                  loc.tries(3))
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what}: {loc.uri}: bucket s3://{bucket} does not exist (or is not yours to list)")
        return
    path = Path(loc.path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        where = "it" if existing == path else f"{existing}, a folder it would be in,"
        raise StorageError(f"{what}: {loc.uri}: {where} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{what}: {loc.uri}: {existing} cannot be written by this user; choose another path or "
                           f"fix its permissions")
