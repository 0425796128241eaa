"""One interface to the object store: ``s3://bucket/key`` (any S3 endpoint, through the minio SDK) and ``file:///path``.

Every write is an atomic publish: data goes to a staging location first and is committed under its final key only
when complete (S3: a server-side copy from a staging key; files: ``os.replace``), so a reader never sees a partial
object and a crashed writer leaves nothing under the final key.

S3 settings come from the environment only (on a cluster, from a Kubernetes Secret):

    AWS_ENDPOINT_URL          endpoint with scheme, e.g. http://127.0.0.1:8333 (https:// turns TLS on)
    AWS_ACCESS_KEY_ID         access key
    AWS_SECRET_ACCESS_KEY     secret key (never logged, never part of an error message)
    AWS_SESSION_TOKEN         optional session token
    AWS_REGION                optional, default us-east-1 (AWS_DEFAULT_REGION is read too)
    AWS_CA_BUNDLE             optional CA bundle for a private TLS endpoint
    CLIPLINE_STORE_RETRY_SECONDS  how long transient errors are retried before giving up (default 60)

Transient errors (connection refused or reset, timeouts, 5xx, SlowDown) are retried with capped exponential backoff;
permanent ones (access denied, no such bucket, no such key) fail at once with a message naming bucket, key and cause.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource, CopySource
from minio.error import InvalidResponseError, S3Error, ServerError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Objects under this prefix are in-flight writes; listings never show them.
STAGING_PREFIX = "_clipline_staging/"
# S3 refuses a single-request copy above 5 GiB; larger objects are committed with a multipart compose.
_MAX_SINGLE_COPY = 5 * 1024**3
_PART_SIZE = 16 * 1024 * 1024

_PERMANENT_CODES = {
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "access denied (unknown access key)",
    "SignatureDoesNotMatch": "access denied (wrong secret key)",
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "InvalidBucketName": "invalid bucket name",
    "AllAccessDisabled": "access denied",
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}


class StoreError(Exception):
    """A store operation failed for good. The message names the object and the cause, never a credential."""


class ObjectNotFound(StoreError):
    """The key (or its bucket) does not exist."""


class InvalidJSON(StoreError):
    """An object read as JSON is not JSON."""


class StoreUnavailable(StoreError):
    """Transient errors went on past the retry window."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    ca_bundle: str | None = None
    retry_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "S3Settings":
        env = os.environ if env is None else env
        missing = [k for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise StoreError(
                f"s3:// needs {', '.join(missing)} in the environment "
                "(run `clipline store up` for a local store, or mount the store Secret on a cluster)"
            )
        endpoint = env["AWS_ENDPOINT_URL"]
        if urlparse(endpoint).scheme not in ("http", "https"):
            raise StoreError(f"AWS_ENDPOINT_URL must start with http:// or https://, got {endpoint!r}")
        try:
            retry_seconds = float(env.get("CLIPLINE_STORE_RETRY_SECONDS", "60"))
        except ValueError:
            raise StoreError("CLIPLINE_STORE_RETRY_SECONDS must be a number of seconds") from None
        return cls(
            endpoint=endpoint.rstrip("/"),
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            retry_seconds=retry_seconds,
        )


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """file:///abs/path or a plain path -> Path."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "":
        return Path(uri)
    raise StoreError(f"not a local path or file:// URI: {uri!r}")


def join(base: str, *parts: str) -> str:
    """Join URI path segments with exactly one slash between them."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Retry policy


def _classify(exc: BaseException) -> tuple[bool, str]:
    """(transient?, cause) for an exception raised by the minio SDK or urllib3."""
    if isinstance(exc, S3Error):
        if exc.code in _PERMANENT_CODES:
            return False, f"{_PERMANENT_CODES[exc.code]} ({exc.code})"
        return exc.code in _TRANSIENT_CODES, f"{exc.code}: {exc.message}"
    if isinstance(exc, ServerError):
        return exc.status_code >= 500, f"HTTP {exc.status_code}"
    if isinstance(exc, InvalidResponseError):
        return True, "invalid response from server"
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True, f"{type(exc).__name__}: {exc}"
    return False, f"{type(exc).__name__}: {exc}"


@dataclass
class _Backoff:
    """Capped exponential backoff with jitter, bounded by a total time window."""

    window: float
    base: float = 0.25
    cap: float = 8.0
    attempt: int = 0
    started: float = field(default_factory=time.monotonic)

    def wait(self) -> bool:
        """Sleep before the next attempt; False when the window is spent."""
        remaining = self.window - self.elapsed()
        if remaining <= 0:
            return False
        delay = min(self.cap, self.base * 2**self.attempt) * (0.5 + random.random() / 2)
        self.attempt += 1
        time.sleep(min(delay, remaining))
        return True

    def elapsed(self) -> float:
        return time.monotonic() - self.started


# ----------------------------------------------------------------------------------------------------------------
# S3 backend


class _S3Backend:
    def __init__(self, settings: S3Settings):
        self.settings = settings
        parsed = urlparse(settings.endpoint)
        # Retries belong to this module (one policy for every call), so urllib3's own are off.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            retries=False,
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if parsed.scheme == "https" else "CERT_NONE",
            ca_certs=settings.ca_bundle,
        )
        self.client = Minio(
            parsed.netloc,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
            secure=parsed.scheme == "https",
            region=settings.region,
            http_client=http,
        )

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        backoff = _Backoff(self.settings.retry_seconds)
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by _retry_or_raise
                self._retry_or_raise(what, uri, exc, backoff)

    def _retry_or_raise(self, what: str, uri: str, exc: Exception, backoff: _Backoff) -> None:
        """The one retry policy: return (after the backoff's sleep) to try a transient error again; raise
        ObjectNotFound, StoreError or, once the window is spent, StoreUnavailable otherwise."""
        transient, cause = _classify(exc)
        if not transient:
            kind = ObjectNotFound if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchBucket") \
                else StoreError
            raise kind(f"{what} {uri} at {self.settings.endpoint}: {cause}") from None
        if not backoff.wait():
            raise StoreUnavailable(
                f"{what} {uri} at {self.settings.endpoint}: still failing after {backoff.attempt + 1} "
                f"attempts over {backoff.elapsed():.1f}s: {cause}"
            ) from None

    # -- writes: staging key, then commit by server-side copy ----------------------------------------------------

    def put_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3(uri)
        staging = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self._call("upload", uri, lambda: self.client.fput_object(bucket, staging, str(path), part_size=_PART_SIZE))
        try:
            if path.stat().st_size > _MAX_SINGLE_COPY:
                commit = lambda: self.client.compose_object(bucket, key, [ComposeSource(bucket, staging)])  # noqa: E731
            else:
                commit = lambda: self.client.copy_object(bucket, key, CopySource(bucket, staging))  # noqa: E731
            self._call("commit", uri, commit)
        finally:
            # Best effort: a leftover staging object is invisible to listings and safe to expire with a lifecycle rule.
            try:
                self.client.remove_object(bucket, staging)
            except Exception as exc:  # noqa: BLE001 - must not mask the outcome of the commit
                log.warning("could not remove staging object for %s: %s", uri, _classify(exc)[1])

    # -- reads ---------------------------------------------------------------------------------------------------

    def get_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3(uri)
        # fget_object downloads to "<path>.part.minio" and renames on success, so a failed download leaves no file.
        self._call("download", uri, lambda: self.client.fget_object(bucket, key, str(path)))

    def open_read(self, uri: str) -> BinaryIO:
        return io.BufferedReader(_ResumableS3Reader(self, uri), buffer_size=1024 * 1024)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket, prefix = split_s3(prefix_uri)
        last: str | None = None
        backoff = _Backoff(self.settings.retry_seconds)
        while True:
            try:
                for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True, start_after=last):
                    last = obj.object_name
                    if not obj.object_name.startswith(STAGING_PREFIX):
                        yield ObjectInfo(f"s3://{bucket}/{obj.object_name}", obj.size or 0)
                return
            except Exception as exc:  # noqa: BLE001 - classified by _retry_or_raise; resumes after ``last``
                self._retry_or_raise("list", prefix_uri, exc, backoff)

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._call("stat", uri, lambda: self.client.stat_object(bucket, key))
            return True
        except ObjectNotFound:
            return False

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call("delete", uri, lambda: self.client.remove_object(bucket, key))

    def ensure_bucket(self, bucket: str) -> None:
        uri = f"s3://{bucket}"
        if not self._call("check bucket", uri, lambda: self.client.bucket_exists(bucket)):
            self._call("create bucket", uri, lambda: self.client.make_bucket(bucket))


class _ResumableS3Reader(io.RawIOBase):
    """A streaming GET that reopens at the current offset (HTTP Range) when the connection drops mid-object."""

    def __init__(self, backend: _S3Backend, uri: str):
        super().__init__()
        self.backend, self.uri = backend, uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.size: int | None = None
        self.resp = None
        self.backend._call("read", uri, self._open)

    def _open(self) -> None:
        self.resp = self.backend.client.get_object(self.bucket, self.key, offset=self.pos)
        if self.size is None:
            self.size = int(self.resp.headers.get("Content-Length", -1))

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.size is not None and 0 <= self.size <= self.pos:
            return 0
        # A dropped connection is one more transient error for the backend's one retry policy: the next attempt
        # reopens the object at the current offset.
        return self.backend._call("read", self.uri, lambda: self._read_once(buf))

    def _read_once(self, buf) -> int:
        if self.resp is None:
            self._open()
        try:
            n = self.resp.readinto(buf)
            if n == 0 and self.size is not None and self.pos < self.size:
                raise urllib3.exceptions.ProtocolError(f"connection closed at byte {self.pos} of {self.size}")
        except BaseException:
            self._release()
            raise
        self.pos += n
        return n

    def _release(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp.release_conn()
            self.resp = None

    def close(self) -> None:
        self._release()
        super().close()


# ----------------------------------------------------------------------------------------------------------------
# file:// backend


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.staging")


class _FileBackend:
    def put_file(self, uri: str, src: Path) -> None:
        dst = local_path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _staging_name(dst)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, uri: str, path: Path) -> None:
        src = local_path(uri)
        if not src.is_file():
            raise ObjectNotFound(f"read {uri}: no such file")
        shutil.copyfile(src, path)

    def open_read(self, uri: str) -> BinaryIO:
        try:
            return open(local_path(uri), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"read {uri}: no such file") from None

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        # Plain string-prefix semantics, as on S3: "dir/sha" matches "dir/shard-0.tar" and "dir/sharp.txt".
        prefix = urlparse(prefix_uri).path if prefix_uri.startswith("file:") else prefix_uri
        root = Path(prefix if prefix.endswith("/") else os.path.dirname(prefix) or ".")
        if not root.is_dir():
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if str(path).startswith(prefix) and not path.name.endswith(".staging"):
                yield ObjectInfo(path.as_uri(), path.stat().st_size)

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Public API: functions on URIs


_s3_backends: dict[S3Settings, _S3Backend] = {}
# A forked child (a DataLoader worker) must not share the parent's pooled connections: two processes writing to one
# socket would interleave their HTTP conversations. Each child builds its own clients.
os.register_at_fork(after_in_child=_s3_backends.clear)


def _backend(uri: str) -> _S3Backend | _FileBackend:
    if uri.startswith("s3://"):
        settings = S3Settings.from_env()
        if settings not in _s3_backends:
            _s3_backends[settings] = _S3Backend(settings)
        return _s3_backends[settings]
    local_path(uri)  # raises on an unknown scheme
    return _FileBackend()


def put_file(uri: str, path: str | os.PathLike) -> None:
    """Publish a local file under ``uri`` atomically."""
    _backend(uri).put_file(uri, Path(path))


def put_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """A writable file that is published under ``uri`` when the block exits without error, and discarded otherwise."""
    fd, tmp = tempfile.mkstemp(prefix="clipline-", suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        put_file(uri, tmp)
    finally:
        os.unlink(tmp)


def put_json(uri: str, doc: Any) -> None:
    """Publish ``doc`` as JSON: the one format every stage's records, states and manifests are written in (indented
    and key-sorted, so that two writes of the same document are byte-identical and a person can read them)."""
    put_bytes(uri, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def get_json(uri: str) -> Any:
    """The JSON document under ``uri``; InvalidJSON names the object when it is not JSON."""
    data = get_bytes(uri)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"{uri} is not a JSON document: {exc}") from None


def get_file(uri: str, path: str | os.PathLike) -> None:
    _backend(uri).get_file(uri, Path(path))


def get_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def open_read(uri: str) -> BinaryIO:
    """A streaming, read-only file object (resumes after dropped connections on S3)."""
    return _backend(uri).open_read(uri)


def list_objects(prefix_uri: str) -> Iterator[ObjectInfo]:
    """Every committed object whose URI starts with ``prefix_uri``, in key order."""
    return _backend(prefix_uri).list(prefix_uri)


def exists(uri: str) -> bool:
    return _backend(uri).exists(uri)


def delete(uri: str) -> None:
    """Delete an object; deleting a missing one is not an error."""
    _backend(uri).delete(uri)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it does not exist (no-op for local paths)."""
    if uri.startswith("s3://"):
        bucket, _ = split_s3(uri)
        backend = _backend(uri)
        assert isinstance(backend, _S3Backend)
        backend.ensure_bucket(bucket)
