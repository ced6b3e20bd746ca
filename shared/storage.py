"""Object storage: S3-compatible servers in production and tests, a local folder in the embedded default.

Every upload records the object's sha256 (in object metadata, and returned to the caller for the database);
every download is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shared.settings import Settings

CHUNK = 1024 * 1024
T = TypeVar("T")


class StorageError(Exception):
    """Object storage could not do what was asked."""


class ObjectNotFound(StorageError):
    pass


class IntegrityError(StorageError):
    """Downloaded bytes do not match the recorded sha256."""


class StorageUnavailable(StorageError):
    """Object storage stayed unreachable for longer than the caller's patience."""


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_key(key: str) -> str:
    """Refuses keys that could escape their prefix (absolute, `..`, backslashes, empty segments)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}")
    return key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Splits `s3://bucket/key` into (bucket, key)."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}")
    return bucket, key


class ObjectStore(ABC):
    """Bytes by key, in buckets; sha256 recorded on upload and verified on download."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    @abstractmethod
    def _put(self, bucket: str, key: str, path: Path, sha256: str) -> None: ...

    @abstractmethod
    def head(self, key: str, *, bucket: str | None = None) -> StoredObject | None:
        """Returns the object's size and recorded sha256, or None if absent."""

    @abstractmethod
    def iter_chunks(self, key: str, *, bucket: str | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Streams the object's bytes."""

    @abstractmethod
    def list_keys(self, prefix: str, *, bucket: str | None = None) -> list[str]:
        """Returns every key under `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str, *, bucket: str | None = None) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Raises StorageError unless the store answers and the bucket exists."""

    @abstractmethod
    def ensure_bucket(self) -> None:
        """Creates the default bucket if it does not exist."""

    def presigned_url(self, key: str, ttl_seconds: int, *, bucket: str | None = None) -> str | None:
        """Returns a short-lived download URL, or None where the backend has none."""
        return None

    def put_file(self, key: str, path: Path, *, bucket: str | None = None) -> StoredObject:
        """Uploads a file and returns its size and sha256."""
        digest = sha256_file(path)
        bucket = bucket or self.bucket
        self._put(bucket, check_key(key), path, digest)
        return StoredObject(bucket, key, path.stat().st_size, digest)

    def put_bytes(self, key: str, data: bytes, *, bucket: str | None = None) -> StoredObject:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(key, Path(tmp.name), bucket=bucket)
        finally:
            os.unlink(tmp.name)

    def get_file(
        self, key: str, dest: Path, *, bucket: str | None = None, expected_sha256: str | None = None
    ) -> StoredObject:
        """Downloads an object to `dest`, checking its sha256 against `expected_sha256` or its metadata."""
        bucket = bucket or self.bucket
        meta = self.head(key, bucket=bucket)
        if meta is None:
            raise ObjectNotFound(f"s3://{bucket}/{key} does not exist")
        expected = expected_sha256 or meta.sha256
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_chunks(key, bucket=bucket):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            actual = digest.hexdigest()
            if expected and actual != expected:
                raise IntegrityError(
                    f"s3://{bucket}/{key}: sha256 {actual} does not match the recorded {expected}"
                )
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredObject(bucket, key, size, actual)

    def read_range(self, key: str, start: int, length: int, *, bucket: str | None = None) -> bytes:
        """Returns up to `length` bytes of an object from byte `start` (fewer at its end)."""
        data, seen = bytearray(), 0
        for chunk in self.iter_chunks(key, bucket=bucket):
            if seen + len(chunk) > start:
                data += chunk[max(0, start - seen) :]
            seen += len(chunk)
            if len(data) >= length:
                break
        return bytes(data[:length])

    def read_bytes(self, key: str, *, bucket: str | None = None, limit: int = 1024 * 1024) -> bytes:
        """Returns a small object's bytes; refuses objects larger than `limit`."""
        data = bytearray()
        for chunk in self.iter_chunks(key, bucket=bucket):
            data += chunk
            if len(data) > limit:
                raise StorageError(f"{key} is larger than {limit} bytes")
        return bytes(data)

    def put_tree(self, prefix: str, folder: Path, *, bucket: str | None = None) -> list[StoredObject]:
        """Uploads every file under `folder` to `prefix/<relative path>`."""
        stored = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            stored.append(self.put_file(f"{prefix.rstrip('/')}/{rel}", path, bucket=bucket))
        return stored

    def get_tree(self, prefix: str, folder: Path, *, bucket: str | None = None) -> list[StoredObject]:
        """Downloads every object under `prefix/` into `folder`, each checked against its sha256."""
        prefix = prefix.rstrip("/") + "/"
        keys = self.list_keys(prefix, bucket=bucket)
        if not keys:
            raise ObjectNotFound(f"nothing stored under s3://{bucket or self.bucket}/{prefix}")
        return [self.get_file(k, folder / k[len(prefix) :], bucket=bucket) for k in keys]


class LocalObjectStore(ObjectStore):
    """A folder per bucket; sha256 kept beside the data in a `.meta` tree."""

    def __init__(self, root: Path, bucket: str) -> None:
        super().__init__(bucket)
        self.root = root

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / check_key(key)

    def _meta_path(self, bucket: str, key: str) -> Path:
        return self.root / ".meta" / bucket / (check_key(key) + ".json")

    def _put(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        target = self._path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        meta = self._meta_path(bucket, key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"sha256": sha256, "size": path.stat().st_size}))

    def head(self, key: str, *, bucket: str | None = None) -> StoredObject | None:
        bucket = bucket or self.bucket
        path = self._path(bucket, key)
        if not path.is_file():
            return None
        meta_path = self._meta_path(bucket, key)
        sha = json.loads(meta_path.read_text())["sha256"] if meta_path.exists() else sha256_file(path)
        return StoredObject(bucket, key, path.stat().st_size, sha)

    def iter_chunks(self, key: str, *, bucket: str | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(bucket or self.bucket, key)
        if not path.is_file():
            raise ObjectNotFound(f"{key} does not exist")
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def read_range(self, key: str, start: int, length: int, *, bucket: str | None = None) -> bytes:
        path = self._path(bucket or self.bucket, key)
        if not path.is_file():
            raise ObjectNotFound(f"{key} does not exist")
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read(length)

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> list[str]:
        base = self.root / (bucket or self.bucket)
        if not base.exists():
            return []
        keys = (p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith("."))

    def delete(self, key: str, *, bucket: str | None = None) -> None:
        bucket = bucket or self.bucket
        self._path(bucket, key).unlink(missing_ok=True)
        self._meta_path(bucket, key).unlink(missing_ok=True)

    def ensure_bucket(self) -> None:
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        if not (self.root / self.bucket).is_dir():
            raise StorageError(f"storage folder {self.root / self.bucket} does not exist")


class S3ObjectStore(ObjectStore):
    """Any S3-compatible server (AWS S3, MinIO, Ceph, SeaweedFS) through boto3."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.storage_bucket)
        import boto3
        from botocore.config import Config

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None

        def client(endpoint: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key_id,
                aws_secret_access_key=secret,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    # A few quick retries here; longer outages are ridden out (and reported) by PatientStore.
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )

        self.client = client(settings.s3_endpoint_url)
        # Presigned URLs are signed for the host the client will call, which may differ from the internal one.
        self.public_client = (
            client(settings.s3_public_endpoint_url) if settings.s3_public_endpoint_url else self.client
        )

    def _client_error(self, exc: Exception) -> StorageError:
        return StorageError(f"object storage error: {exc}")

    def _put(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        except (BotoCoreError, ClientError) as exc:
            raise self._client_error(exc) from exc

    def head(self, key: str, *, bucket: str | None = None) -> StoredObject | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = bucket or self.bucket
        try:
            response = self.client.head_object(Bucket=bucket, Key=check_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise self._client_error(exc) from exc
        except BotoCoreError as exc:  # unreachable, timed out
            raise self._client_error(exc) from exc
        return StoredObject(
            bucket, key, response["ContentLength"], response.get("Metadata", {}).get("sha256", "")
        )

    def iter_chunks(self, key: str, *, bucket: str | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=bucket or self.bucket, Key=check_key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise ObjectNotFound(f"{key} does not exist") from exc
            raise self._client_error(exc) from exc
        except BotoCoreError as exc:
            raise self._client_error(exc) from exc
        try:
            yield from body.iter_chunks(chunk_size)
        except BotoCoreError as exc:  # the connection broke mid-object
            raise self._client_error(exc) from exc
        finally:
            body.close()

    def read_range(self, key: str, start: int, length: int, *, bucket: str | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if length <= 0:
            return b""
        try:
            response = self.client.get_object(
                Bucket=bucket or self.bucket, Key=check_key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            return response["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in {"404", "NoSuchKey", "NotFound"}:
                raise ObjectNotFound(f"{key} does not exist") from exc
            if code == "InvalidRange":  # at or past the end
                return b""
            raise self._client_error(exc) from exc
        except BotoCoreError as exc:
            raise self._client_error(exc) from exc

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        try:
            for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._client_error(exc) from exc
        return sorted(keys)

    def delete(self, key: str, *, bucket: str | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=bucket or self.bucket, Key=check_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._client_error(exc) from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._client_error(exc) from exc

    def presigned_url(self, key: str, ttl_seconds: int, *, bucket: str | None = None) -> str | None:
        return self.public_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket or self.bucket, "Key": check_key(key)},
            ExpiresIn=ttl_seconds,
        )


class PatientStore(ObjectStore):
    """Another store whose operations are retried through an outage, with a growing wait, for up to
    `patience_seconds` in all; each retry is told to `on_retry` (the worker turns it into a job event), and
    past the patience the operation fails with StorageUnavailable. A missing object or bytes that fail their
    sha256 are answers, not outages: they are not retried. Streams (iter_chunks) are not retried."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        patience_seconds: float,
        on_retry: Callable[[str, int, int, StorageError, float], None] = lambda *args: None,
    ) -> None:
        super().__init__(inner.bucket)
        self.inner = inner
        self.patience_seconds = patience_seconds
        self.on_retry = on_retry

    def expected_retries(self) -> int:
        """How many retries the patience allows (the waits are 1, 2, 4 ... 30 seconds)."""
        count, waited, delay = 0, 0.0, 1.0
        while waited < self.patience_seconds:
            count += 1
            waited += delay
            delay = min(delay * 2, 30.0)
        return count

    def _patiently(self, what: str, action: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.patience_seconds
        delay, tries = 1.0, 0
        while True:
            try:
                return action()
            except (ObjectNotFound, IntegrityError):
                raise
            except StorageError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageUnavailable(
                        f"object storage was unreachable for {self.patience_seconds:g}s while {what}: {exc}"
                    ) from exc
                tries += 1
                wait = min(delay, left)
                self.on_retry(what, tries, self.expected_retries(), exc, wait)
                time.sleep(wait)
                delay = min(delay * 2, 30.0)

    def _put(self, bucket: str, key: str, path: Path, sha256: str) -> None:
        self._patiently(f"storing {key}", lambda: self.inner._put(bucket, key, path, sha256))

    def head(self, key: str, *, bucket: str | None = None) -> StoredObject | None:
        return self._patiently(f"looking up {key}", lambda: self.inner.head(key, bucket=bucket))

    def get_file(
        self, key: str, dest: Path, *, bucket: str | None = None, expected_sha256: str | None = None
    ) -> StoredObject:
        return self._patiently(
            f"fetching {key}",
            lambda: self.inner.get_file(key, dest, bucket=bucket, expected_sha256=expected_sha256),
        )

    def iter_chunks(self, key: str, *, bucket: str | None = None, chunk_size: int = CHUNK) -> Iterator[bytes]:
        return self.inner.iter_chunks(key, bucket=bucket, chunk_size=chunk_size)

    def read_range(self, key: str, start: int, length: int, *, bucket: str | None = None) -> bytes:
        return self._patiently(
            f"reading {key}", lambda: self.inner.read_range(key, start, length, bucket=bucket)
        )

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> list[str]:
        return self._patiently(f"listing {prefix}", lambda: self.inner.list_keys(prefix, bucket=bucket))

    def delete(self, key: str, *, bucket: str | None = None) -> None:
        self._patiently(f"deleting {key}", lambda: self.inner.delete(key, bucket=bucket))

    def check(self) -> None:
        self.inner.check()

    def ensure_bucket(self) -> None:
        self.inner.ensure_bucket()

    def presigned_url(self, key: str, ttl_seconds: int, *, bucket: str | None = None) -> str | None:
        return self.inner.presigned_url(key, ttl_seconds, bucket=bucket)


def make_store(settings: Settings) -> ObjectStore:
    """Returns the object store the settings name."""
    if settings.storage_backend == "s3":
        return S3ObjectStore(settings)
    assert settings.storage_root is not None
    return LocalObjectStore(settings.storage_root, settings.storage_bucket)
