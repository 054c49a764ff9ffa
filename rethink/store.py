"""Where runs live: one small interface, a local-directory backend and an S3 backend, chosen by URL.

Layout under the store's root:
    runs/<run_id>/spec.json        written first
    runs/<run_id>/metrics.jsonl    one JSON object per finished epoch (rewritten whole, atomically)
    runs/<run_id>/checkpoint.pt    latest checkpoint (the one before it kept as checkpoint.prev.pt)
    runs/<run_id>/result.json      written last, only when the run has finished
    runs/<run_id>/error.json       the last failure, removed when the run finishes
    reports/<suite>/...            aggregation output
Every write is atomic: a reader sees the old object or the new one, never a part.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from rethink.errors import UserError

DEFAULT_STORE = "./runs"


class StoreError(UserError):
    """The store cannot be reached or refuses us; the message says which and what to do."""

    exit_code = 3


class Store:
    """Key-value access to a store; keys are '/'-separated paths relative to its root."""

    url: str

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object atomically."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (recursively), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def copy(self, src: str, dst: str) -> None:
        data = self.read_bytes(src)
        if data is not None:
            self.write_bytes(dst, data)

    def where(self, key: str = "") -> str:
        """A human-readable location of `key` (a path or an s3:// URL)."""
        return self.url.rstrip("/") + ("/" + key if key else "")

    def read_text(self, key: str) -> str | None:
        data = self.read_bytes(key)
        return None if data is None else data.decode()

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())


class LocalStore(Store):
    """A directory; atomic writes by temp file + fsync + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _error(self, what: str, e: OSError) -> StoreError:
        return StoreError(f"cannot {what} in store {self.url}: {e.strerror or e} ({e.filename or self.url})")

    def read_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._error(f"read {key}", e) from None

    def write_bytes(self, key, data):
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise self._error(f"write {key}", e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; others may need to read results
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise self._error(f"write {key}", e) from None
            raise
        _fsync_dir(path.parent)

    def exists(self, key):
        return self._path(key).exists()

    def list(self, prefix):
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete(self, key):
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise self._error(f"delete {key}", e) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Store(Store):
    """s3://bucket/prefix through boto3, configured by the standard AWS variables (AWS_ENDPOINT_URL for MinIO).

    A PUT is atomic in S3: the object appears complete or not at all. Transient errors are retried with
    exponential backoff for up to `retry_seconds` (RETHINK_S3_RETRY_SECONDS, default 120), then reported.
    `clock` and `sleep` measure and wait out that budget (tests pass their own to count retries).
    """

    _CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
    _RETRIED_STATUS = {408, 429}  # and every 5xx

    def __init__(self, url: str, retry_seconds: float | None = None, log=None, clock=time.monotonic,
                 sleep=time.sleep):  # fmt: skip
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if not parsed.netloc:
            raise UserError(f"bad store URL {url!r}: expected s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if retry_seconds is None:
            raw = os.environ.get("RETHINK_S3_RETRY_SECONDS", "120")
            try:
                retry_seconds = float(raw)
            except ValueError:
                raise UserError(f"RETHINK_S3_RETRY_SECONDS={raw!r} is not a number of seconds") from None
        self.retry_seconds = max(0.0, retry_seconds)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.clock, self.sleep = clock, sleep
        # All retrying happens in _call (one policy, with a deadline); botocore makes one attempt. A hung server
        # must not hold an attempt for a large part of the budget, hence timeouts well inside it.
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=min(5.0, max(1.0, self.retry_seconds / 6)),
            read_timeout=min(60.0, max(1.0, self.retry_seconds / 6)),
            s3={"addressing_style": "path"},
        )
        try:
            self.client = boto3.session.Session().client("s3", config=config)
        except Exception as e:  # a malformed AWS_ENDPOINT_URL, an unknown profile, ...
            raise StoreError(f"cannot set up an S3 client for {self.url}: {e}") from None
        self.endpoint = self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried on transient errors; a missing key is re-raised as ClientError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        start = self.clock()
        delay = 0.2
        warned = False
        while True:
            try:
                return fn(*args, **kwargs)
            except NoCredentialsError:
                raise StoreError(
                    f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise
                if code in self._CREDENTIALS:
                    raise StoreError(
                        f"S3 at {self.endpoint} rejected the credentials for {what} on {self.url} ({code}): "
                        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    ) from None
                if code == "NoSuchBucket":
                    raise StoreError(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or fix the store URL"
                    ) from None
                if 400 <= status < 500 and status not in self._RETRIED_STATUS:
                    message = e.response.get("Error", {}).get("Message", "")
                    raise StoreError(
                        f"S3 at {self.endpoint} refused {what} on {self.url} ({code or status}"
                        f"{': ' + message if message else ''}): check the bucket name and that the credentials "
                        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) may use it"
                    ) from None
                err = f"{code or status}"
            except (BotoCoreError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
            elapsed = self.clock() - start
            if elapsed >= self.retry_seconds:
                raise StoreError(
                    f"S3 at {self.endpoint} unreachable for {what} on {self.url}: gave up after {elapsed:.0f}s "
                    f"of retries ({err}); what is stored there (the last good checkpoint included) is intact: "
                    "rerun to resume once S3 answers"
                ) from None
            if not warned:
                self.log(f"warning: S3 {what} on {self.url} failed ({err}); retrying for up to "
                         f"{self.retry_seconds:.0f}s")  # fmt: skip
                warned = True
            # One last try right at the deadline, rather than giving up early.
            self.sleep(min(delay * (0.5 + random.random()), self.retry_seconds - elapsed))
            delay = min(delay * 2, 10.0)

    def read_bytes(self, key):
        from botocore.exceptions import ClientError

        def get():
            # The body is read inside the retried call: a connection lost mid-download is transient too.
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        try:
            return self._call(f"GET {key}", get)
        except ClientError:
            return None

    def write_bytes(self, key, data):
        self._call(f"PUT {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key):
        from botocore.exceptions import ClientError

        try:
            self._call(f"HEAD {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError:
            return False

    def list(self, prefix):
        full = self._key(prefix).rstrip("/") + "/"
        keys: list[str] = []
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call(f"LIST {prefix}", self.client.list_objects_v2, **kwargs)
            cut = len(self.prefix) + 1 if self.prefix else 0
            keys += [obj["Key"][cut:] for obj in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return sorted(keys)
            token = resp["NextContinuationToken"]

    def delete(self, key):
        self._call(f"DELETE {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def copy(self, src, dst):
        from botocore.exceptions import ClientError

        try:
            self._call(
                f"COPY {src}",
                self.client.copy_object,
                Bucket=self.bucket,
                Key=self._key(dst),
                CopySource={"Bucket": self.bucket, "Key": self._key(src)},
            )
        except ClientError:
            pass  # nothing to copy


def open_store(url: str | None = None) -> Store:
    """A store from a URL: a path or file:// URL (local), or s3://bucket/prefix."""
    url = url or DEFAULT_STORE
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith("file://"):
        return LocalStore(urlparse(url).path)
    if "://" in url:
        raise UserError(f"unsupported store URL {url!r}: use a directory path, file://PATH or s3://bucket/prefix")
    return LocalStore(url)


def run_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/{name}"
