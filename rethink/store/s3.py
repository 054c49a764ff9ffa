"""A store in S3-compatible object storage (MinIO in the cluster) through boto3, imported only when used."""

from __future__ import annotations

import os
import random
import sys
import time
from urllib.parse import urlparse

from rethink.errors import UserError
from rethink.store.base import Store, StoreError


class S3Store(Store):
    """s3://bucket/prefix through boto3, configured by the standard AWS variables (AWS_ENDPOINT_URL for MinIO).

    A PUT is atomic in S3: the object appears complete or not at all. Two layers of retrying: botocore's own
    (standard mode, `attempts` attempts with its backoff, connect and read timeouts) rides out a blip within a
    request; on top, an outage that outlasts them (a MinIO restart) is waited out with exponential backoff for up
    to `retry_seconds` (RETHINK_S3_RETRY_SECONDS, default 120), then reported: botocore has no deadline of its
    own. `clock` and `sleep` measure and wait out that deadline (tests pass their own to count its retries).
    """

    _CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
    _RETRIED_STATUS = {408, 429}  # and every 5xx

    def __init__(self, url: str, retry_seconds: float | None = None, log=None, clock=time.monotonic,
                 sleep=time.sleep, attempts: int = 3):  # fmt: skip
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
        # A hung server must not hold an attempt for a large part of the budget, hence timeouts well inside it.
        config = Config(
            retries={"total_max_attempts": max(1, attempts), "mode": "standard"},
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

    def _refusal(self, what: str, e) -> StoreError | None:
        """The final answer a ClientError means (bad credentials, no bucket, a refused request), else None."""
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in self._CREDENTIALS:
            return StoreError(f"S3 at {self.endpoint} rejected the credentials for {what} on {self.url} ({code}): "
                              "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")  # fmt: skip
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or fix the "
                              "store URL")  # fmt: skip
        if (400 <= status < 500 and status not in self._RETRIED_STATUS) or status == 501:  # 501: never will
            message = e.response.get("Error", {}).get("Message", "")
            return StoreError(f"S3 at {self.endpoint} refused {what} on {self.url} ({code or status}"
                              f"{': ' + message if message else ''}): check the bucket name and that the credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) may use it")  # fmt: skip
        return None

    def _call(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), waiting out an outage until the deadline; a missing key re-raises ClientError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        start = self.clock()
        delay = 0.2
        warned = False
        while True:
            try:
                return fn(*args, **kwargs)  # botocore has retried a blip already
            except NoCredentialsError:
                raise StoreError(
                    f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            except ClientError as e:
                if e.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404", "NotFound"):
                    raise
                refusal = self._refusal(what, e)
                if refusal is not None:
                    raise refusal from None
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                err = str(e.response.get("Error", {}).get("Code") or status)
            except (BotoCoreError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
            if not warned:
                self.log(f"warning: S3 {what} on {self.url} failed ({err}); retrying for up to "
                         f"{self.retry_seconds:.0f}s")  # fmt: skip
                warned = True
            elapsed = self.clock() - start
            if elapsed >= self.retry_seconds:
                raise StoreError(
                    f"S3 at {self.endpoint} unreachable for {what} on {self.url}: gave up after {elapsed:.0f}s "
                    f"of retries ({err}); what is stored there (the last good checkpoint included) is intact: "
                    "rerun to resume once S3 answers"
                ) from None
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

    def _objects(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`."""
        full = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        found: list[tuple[str, int]] = []
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call(f"LIST {prefix}", self.client.list_objects_v2, **kwargs)
            cut = len(self.prefix) + 1 if self.prefix else 0
            found += [(obj["Key"][cut:], obj.get("Size", 0)) for obj in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return found
            token = resp["NextContinuationToken"]

    def list(self, prefix):
        return sorted(k for k, _ in self._objects(prefix))

    def usage(self, prefix=""):
        objects = self._objects(prefix)
        return len(objects), sum(size for _, size in objects)

    def read_versioned(self, key):
        from botocore.exceptions import ClientError

        def get():
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]

        try:
            return self._call(f"GET {key}", get)
        except ClientError:
            return None, None

    def write_if(self, key, data, version):
        """A conditional PUT (If-None-Match: * to create, If-Match: ETag to replace): S3, MinIO and SeaweedFS
        refuse it with 412 when the object changed in between. A server without conditional writes answers 501:
        then this falls back to write, wait, and read back (best effort: a race within the wait goes unseen)."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            resp = self._call(f"PUT {key} (conditional)", self.client.put_object, Bucket=self.bucket,
                              Key=self._key(key), Body=data, **condition)  # fmt: skip
            return resp["ETag"]
        except StoreError as e:
            if "(PreconditionFailed" in str(e) or "(412" in str(e):
                return None
            if "(NotImplemented" not in str(e) and "(501" not in str(e):
                raise
        except ClientError:  # a 404 for If-Match on a missing object
            return None
        self.log(f"warning: {self.endpoint} has no conditional writes: {key} is checked by reading it back")
        if self.read_versioned(key)[1] != version:
            return None
        self.write_bytes(key, data)
        time.sleep(1.0)
        got, etag = self.read_versioned(key)
        return etag if got == data else None

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
