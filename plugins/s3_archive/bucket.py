"""The few S3 operations the archive needs, on keys relative to the archive's prefix.

Every botocore error becomes a :class:`~studyvault.errors.StorageError` naming the
object; an endpoint that cannot be reached becomes a
:class:`~studyvault.errors.StorageOfflineError`. Clients are made with a short connect
timeout and few retries, so a task facing a dead endpoint pauses within seconds
instead of hanging.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from studyvault.errors import StorageError, StorageOfflineError

_MISSING = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionError)
#: copy_object copies at most 5 GB; bigger objects go through a multipart copy
_MAX_SINGLE_COPY = 5 * 1024**3


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Bucket:
    """An S3 bucket seen through the archive's key prefix.

    :param settings: the archive's config (endpoint, bucket, prefix, region, profile,
        sse, timeouts, multipart threshold, workers).
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.name: str = settings.bucket
        prefix = settings.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self._client: Any = None
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe: make one
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * 1024 * 1024,
            multipart_chunksize=max(settings.multipart_threshold_mb, 8) * 1024 * 1024,
            max_concurrency=settings.workers,
        )
        self._pool: ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        # credentials only from the standard AWS sources (environment, shared
        # config and credentials files, profile, instance roles): never from ours
        session = boto3.session.Session(
            profile_name=self.settings.profile or None,
            region_name=self.settings.region or None,
        )
        config = BotoConfig(
            connect_timeout=self.settings.connect_timeout_s,
            read_timeout=max(self.settings.connect_timeout_s, 30),
            retries={"max_attempts": self.settings.max_attempts, "mode": "standard"},
            max_pool_connections=self.settings.workers + 4,
            # MinIO and Ceph RGW reject the default CRC trailers of new boto3s
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if self.settings.endpoint_url else "auto"},
        )
        return session.client("s3", endpoint_url=self.settings.endpoint_url or None, config=config)

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="s3")
        return self._pool

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def error(self, exc: Exception, rel: str) -> StorageError:
        where = f"{self.url}{rel}"
        if isinstance(exc, _UNREACHABLE):
            return StorageOfflineError(f"{where}: endpoint cannot be reached: {exc}")
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "NoSuchBucket":
                return StorageOfflineError(f"{where}: bucket {self.name!r} does not exist")
            if code in _MISSING:
                return StorageError(f"{where}: no such object")
            return StorageError(f"{where}: {code or exc}")
        return StorageError(f"{where}: {exc}")

    def _sse(self) -> dict[str, str]:
        extra: dict[str, str] = {}
        if self.settings.sse:
            extra["ServerSideEncryption"] = self.settings.sse
            if self.settings.sse == "aws:kms" and self.settings.sse_kms_key_id:
                extra["SSEKMSKeyId"] = self.settings.sse_kms_key_id
        return extra

    # -- single objects ---------------------------------------------------------------
    def head(self, rel: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=self.name, Key=self.key(rel)))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self.error(exc, rel) from None
        except BotoCoreError as exc:
            raise self.error(exc, rel) from None

    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            response = self.client.get_object(Bucket=self.name, Key=self.key(rel))
            return bytes(response["Body"].read())
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self.error(exc, rel) from None
        except BotoCoreError as exc:
            raise self.error(exc, rel) from None

    def put_bytes(self, rel: str, data: bytes, sha256: str | None = None) -> str:
        """Write one object. The server checks the body against its MD5 (``Content-MD5``)
        and, with ``sha256`` (hex), against that (``x-amz-checksum-sha256``), and rejects
        a damaged upload.

        :returns: the object's ETag when the server confirmed it stored these bytes (the
            ETag is their MD5, or it echoed the SHA-256 sent: SSE-KMS ETags are not
            MD5s), else "".
        """
        extra: dict[str, Any] = self._sse()
        md5 = hashlib.md5(data, usedforsecurity=False)
        extra["ContentMD5"] = base64.b64encode(md5.digest()).decode("ascii")
        sent = ""
        if sha256:
            sent = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
            extra["ChecksumSHA256"] = sent
        try:
            response = self.client.put_object(
                Bucket=self.name, Key=self.key(rel), Body=data, **extra
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, rel) from None
        etag = str(response.get("ETag", "")).strip('"')
        if etag == md5.hexdigest() or (sent and response.get("ChecksumSHA256") == sent):
            return etag
        return ""

    def upload(self, rel: str, src: Any) -> None:
        """Upload a readable binary stream, in parts when it is larger than the
        multipart threshold."""
        try:
            self.client.upload_fileobj(
                src, self.name, self.key(rel), ExtraArgs=self._sse() or None, Config=self.transfer
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, rel) from None

    def download(self, rel: str, out: IO[bytes]) -> None:
        try:
            self.client.download_fileobj(self.name, self.key(rel), out, Config=self.transfer)
        except ClientError as exc:
            raise self.error(exc, rel) from None
        except BotoCoreError as exc:
            raise self.error(exc, rel) from None

    def open(self, rel: str) -> IO[bytes]:
        """Open an object for streaming reads.

        :raises StorageError: (an OSError) when there is no such object.
        """
        try:
            response = self.client.get_object(Bucket=self.name, Key=self.key(rel))
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, rel) from None
        return io.BufferedReader(_Body(response["Body"], self, rel), 1 << 20)

    def copy(self, src: str, dst: str, size: int) -> None:
        """Server-side copy (the bytes never come back through this machine)."""
        source = {"Bucket": self.name, "Key": self.key(src)}
        try:
            if size < _MAX_SINGLE_COPY:
                self.client.copy_object(
                    Bucket=self.name, Key=self.key(dst), CopySource=source, **self._sse()
                )
            else:
                self.client.copy(
                    source,
                    self.name,
                    self.key(dst),
                    ExtraArgs=self._sse() or None,
                    Config=self.transfer,
                )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, src) from None

    # -- many objects -----------------------------------------------------------------
    def list_keys(self, rel: str) -> list[tuple[str, int]]:
        """(relative key, size) of every object whose key starts with ``rel``, sorted."""
        return [(key, size) for key, size, _ in self.list_objects(rel)]

    def list_objects(self, rel: str) -> list[tuple[str, int, str]]:
        """(relative key, size, ETag) of every object whose key starts with ``rel``,
        sorted."""
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.key(rel)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    found.append((key, int(item["Size"]), str(item.get("ETag", "")).strip('"')))
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, rel) from None
        return sorted(found)

    def list_names(self, rel: str) -> Iterator[str]:
        """Names directly below the 'folder' ``rel`` (ending in ``/``): objects and
        common prefixes (without their trailing ``/``), relative to the archive prefix."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.key(rel), Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"][len(self.prefix) :].rstrip("/")
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, rel) from None

    def any_object(self) -> bool:
        """Tell whether anything at all is stored below the prefix."""
        try:
            response = self.client.list_objects_v2(Bucket=self.name, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, "") from None
        return bool(response.get("Contents"))

    def delete(self, rels: list[str]) -> None:
        """Delete objects (absent ones are fine), 1,000 per request."""
        for start in range(0, len(rels), 1000):
            batch = rels[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.name,
                    Delete={"Objects": [{"Key": self.key(r)} for r in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self.error(exc, batch[0]) from None
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{self.url}: cannot delete {first.get('Key')}: {first.get('Message')}"
                )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class _Body(io.RawIOBase):
    """A GET response body as a raw stream; network errors become StorageErrors."""

    def __init__(self, body: Any, bucket: Bucket, rel: str) -> None:
        self._body = body
        self._bucket = bucket
        self._rel = rel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        try:
            data = self._body.read(len(buffer))
        except (BotoCoreError, OSError) as exc:
            raise self._bucket.error(exc, self._rel) from None
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
