"""The worker's local cache of base models and datasets, filled from object storage and checked by sha256
(http(s) datasets are downloaded afresh, through the outbound URL policy)."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.datasets import SAVED_MARKERS, SUFFIXES, kind_of_name
from shared.errors import InvalidRequest, JobErrorCode, JobFailure
from shared.hub import check_hub_allowed, hub_model_location, parse_hub_id
from shared.models import Artifact, Job, UploadedFile
from shared.schemas import AdapterSource
from shared.settings import ModelEntry, Settings
from shared.storage import ObjectNotFound, ObjectStore, StorageError, StorageUnavailable, parse_s3_uri
from shared.uris import FILE_ID, check_own_objects, resolve_dataset_uri
from shared.urlpolicy import OutboundError, OutboundPolicy, URLRefused, open_url

COMPLETE = ".tuneforge-complete"
DATASET_SUFFIXES = (".jsonl", *SUFFIXES)


def storage_code(exc: StorageError) -> JobErrorCode:
    """storage_unavailable when storage stayed unreachable, storage_error for its other refusals."""
    return (
        JobErrorCode.storage_unavailable
        if isinstance(exc, StorageUnavailable)
        else JobErrorCode.storage_error
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Several worker processes on one host share the cache; one fills an entry while the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class AssetCache:
    """Fetches base models and datasets once per worker host."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store
        assert settings.cache_dir is not None
        self.root = settings.cache_dir

    def pin_model(self, name: str) -> str:
        """The base model's name as jobs record it: a Hub id's revision pinned to its commit (its snapshot
        stored in object storage), a registered name as it is."""
        ref = parse_hub_id(name) if name not in self.settings.model_registry() else None
        if ref is None or ref.pinned:
            return name
        from worker.hub import pin_hub_model

        return str(pin_hub_model(self.settings, self.store, ref))

    def model_dir(self, name: str) -> Path:
        """Returns a local folder holding the base model `name`: a registered one, or a pinned Hub id stored by
        pin_model."""
        entry = self.settings.model_registry().get(name)
        ref = parse_hub_id(name) if entry is None else None
        if ref is not None and ref.pinned:
            try:
                check_hub_allowed(ref, self.settings, param="base_model")
            except InvalidRequest as exc:
                raise JobFailure(JobErrorCode.invalid_model, exc.message) from exc
            entry = ModelEntry(location=hub_model_location(self.settings, ref))
        if entry is None:
            raise JobFailure(JobErrorCode.invalid_model, f"base model {name!r} is no longer in the registry")
        if entry.location.startswith("file://"):
            path = Path(entry.location.removeprefix("file://"))
            if not (path / "config.json").is_file():
                raise JobFailure(
                    JobErrorCode.invalid_model, f"base model {name!r}: {path} has no config.json"
                )
            return path
        bucket, prefix = parse_s3_uri(entry.location)
        target = self.root / "models" / hashlib.sha256(entry.location.encode()).hexdigest()[:32]
        if (target / COMPLETE).exists():
            return target
        with _locked(target.with_suffix(".lock")):
            if (target / COMPLETE).exists():
                return target
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
            try:
                self.store.get_tree(prefix, staging, bucket=bucket)
            except ObjectNotFound as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise JobFailure(
                    JobErrorCode.invalid_model, f"base model {name!r} is missing from storage: {exc}"
                ) from exc
            except StorageError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise JobFailure(storage_code(exc), f"could not fetch base model {name!r}: {exc}") from exc
            if not (staging / "config.json").is_file():
                shutil.rmtree(staging, ignore_errors=True)
                raise JobFailure(
                    JobErrorCode.invalid_model, f"base model {name!r} has no config.json in storage"
                )
            (staging / COMPLETE).touch()
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        return target

    def adapter_dir(self, source: AdapterSource, *, session: Session, team_id: str) -> Path:
        """Returns a local copy of a finished adapter (a job's adapter artifacts, or an s3:// folder)."""
        if source.job_id is not None:
            artifacts = session.scalars(
                select(Artifact)
                .join(Job, Job.id == Artifact.job_id)
                .where(Artifact.job_id == source.job_id, Artifact.kind == "adapter", Job.team_id == team_id)
            ).all()
            if not artifacts:
                raise JobFailure(JobErrorCode.invalid_config, f"job {source.job_id} has no adapter to use")
            target = self.root / "adapters" / source.job_id
            if (target / COMPLETE).exists():
                return target
            with _locked(target.with_suffix(".lock")):
                if not (target / COMPLETE).exists():
                    for artifact in artifacts:
                        self.store.get_file(
                            artifact.storage_key, target / artifact.name, expected_sha256=artifact.sha256
                        )
                    (target / COMPLETE).touch()
            return target
        assert source.uri is not None
        bucket, prefix = parse_s3_uri(source.uri)
        try:  # the policy, again at run time (it may have changed since submission)
            check_own_objects(
                bucket,
                f"{prefix.rstrip('/')}/adapter_config.json",
                self.settings,
                team_id=team_id,
                param="source",
            )
        except InvalidRequest as exc:
            raise JobFailure(JobErrorCode.invalid_config, exc.message) from exc
        target = self.root / "adapters" / hashlib.sha256(source.uri.encode()).hexdigest()[:32]
        shutil.rmtree(target, ignore_errors=True)  # an s3:// folder may change; fetch it afresh
        try:
            self.store.get_tree(prefix, target, bucket=bucket)
        except ObjectNotFound as exc:
            raise JobFailure(JobErrorCode.invalid_config, f"no adapter at {source.uri}: {exc}") from exc
        if not (target / "adapter_config.json").is_file():
            raise JobFailure(JobErrorCode.invalid_config, f"{source.uri} has no adapter_config.json")
        return target

    def pin_dataset(self, uri: str, *, param: str) -> str:
        """A dataset reference as the job records it: a Hub dataset id's revision pinned to its commit, any
        other reference as it is."""
        value = uri.strip()
        ref = parse_hub_id(value) if not FILE_ID.match(value) and "://" not in value else None
        if ref is None or ref.pinned:
            return uri
        from worker.hub import hub_dataset

        return str(hub_dataset(self.settings, ref, param=param)[0])

    def dataset_file(self, uri: str, *, session: Session, team_id: str, param: str) -> Path:
        """Returns a local copy of a job's dataset, verified against its recorded sha256 when there is one."""
        try:
            source = resolve_dataset_uri(uri, self.settings, param=param, team_id=team_id)
        except InvalidRequest as exc:  # the deployment's policy changed since the job was submitted
            raise JobFailure(JobErrorCode.dataset_not_found, f"{param}: {exc.message}") from exc
        if source.kind == "local":
            assert source.path is not None
            if not source.path.exists():
                raise JobFailure(JobErrorCode.dataset_not_found, f"{param}: {source.path} does not exist")
            return source.path
        if source.kind == "http":
            return self._download_dataset(source.uri, param=param)
        if source.kind == "hub":
            from worker.hub import hub_dataset

            ref = parse_hub_id(source.uri)
            assert ref is not None
            return hub_dataset(self.settings, ref, param=param)[1]
        if source.kind == "upload":
            record = session.get(UploadedFile, source.file_id)
            if record is None or record.team_id != team_id:
                raise JobFailure(
                    JobErrorCode.dataset_not_found, f"{param}: file {source.file_id} does not exist"
                )
            bucket, key, sha = self.store.bucket, record.storage_key, record.sha256
        else:
            assert source.bucket is not None and source.key is not None
            bucket, key = source.bucket, source.key
            head = self.store.head(key, bucket=bucket)
            if head is None:
                if self._is_saved_dataset(bucket, key):
                    return self._saved_dataset(bucket, key, uri=uri, param=param)
                raise JobFailure(JobErrorCode.dataset_not_found, f"{param}: {uri} does not exist")
            sha = head.sha256 or None
        name = sha or hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        # The file keeps its kind's ending (.jsonl, .parquet, .csv): that is how it is read.
        suffix = Path(key).suffix.lower() if Path(key).suffix.lower() in DATASET_SUFFIXES else ".jsonl"
        target = self.root / "datasets" / f"{name}{suffix}"
        if sha and target.exists():
            return target
        try:
            self.store.get_file(key, target, bucket=bucket, expected_sha256=sha)
        except ObjectNotFound as exc:
            raise JobFailure(
                JobErrorCode.dataset_not_found, f"{param}: {uri} is missing from storage"
            ) from exc
        except StorageError as exc:
            raise JobFailure(storage_code(exc), f"{param}: could not fetch {uri}: {exc}") from exc
        return target

    def _is_saved_dataset(self, bucket: str, key: str) -> bool:
        return any(self.store.head(f"{key}/{marker}", bucket=bucket) for marker in SAVED_MARKERS)

    def _saved_dataset(self, bucket: str, key: str, *, uri: str, param: str) -> Path:
        """Fetches a Hugging Face dataset saved to disk (a folder of objects); afresh each time, as an s3://
        folder may change (validation pins its digest all the same)."""
        target = self.root / "datasets" / hashlib.sha256(f"{bucket}/{key}/".encode()).hexdigest()
        shutil.rmtree(target, ignore_errors=True)
        try:
            self.store.get_tree(key, target, bucket=bucket)
        except ObjectNotFound as exc:
            raise JobFailure(JobErrorCode.dataset_not_found, f"{param}: {uri} is empty") from exc
        except StorageError as exc:
            raise JobFailure(storage_code(exc), f"{param}: could not fetch {uri}: {exc}") from exc
        return target

    def _download_dataset(self, url: str, *, param: str) -> Path:
        """Downloads an http(s) dataset through the outbound URL policy (every hop re-checked), at most
        max_upload_bytes within http_dataset_timeout_seconds; returns it cached under its sha256."""
        suffix = Path(urlsplit(url).path).suffix.lower()
        suffix = suffix if suffix in DATASET_SUFFIXES else ".jsonl"
        limit = self.settings.upload_limit(kind_of_name(f"dataset{suffix}"))
        deadline = time.monotonic() + self.settings.http_dataset_timeout_seconds
        folder = self.root / "datasets"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".jsonl")
        staging = Path(name)
        try:
            with (
                open(fd, "wb") as handle,
                open_url(
                    "GET",
                    url,
                    policy=OutboundPolicy.from_settings(self.settings),
                    headers={"Accept-Encoding": "identity"},
                ) as response,
            ):
                if response.status_code != 200:
                    code = (
                        JobErrorCode.dataset_not_found
                        if response.status_code in (401, 403, 404, 410)
                        else JobErrorCode.storage_error
                    )
                    raise JobFailure(code, f"{param}: {url} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise JobFailure(
                        JobErrorCode.invalid_dataset,
                        f"{param}: {url} is {int(declared)} bytes, "
                        f"more than the {limit} bytes allowed (max_upload_bytes, upload_limits)",
                    )
                size = 0
                # Raw bytes: a compressed answer is not inflated here, so the limit holds for what is stored.
                for chunk in response.iter_raw(1024 * 1024):
                    size += len(chunk)
                    if size > limit:
                        raise JobFailure(
                            JobErrorCode.invalid_dataset,
                            f"{param}: {url} is more than the {limit} bytes allowed (max_upload_bytes, upload_limits)",
                        )
                    if time.monotonic() > deadline:
                        raise JobFailure(
                            JobErrorCode.storage_error,
                            f"{param}: downloading {url} took more than "
                            f"{self.settings.http_dataset_timeout_seconds:g}s",
                        )
                    digest.update(chunk)
                    handle.write(chunk)
        except URLRefused as exc:
            staging.unlink(missing_ok=True)
            raise JobFailure(
                JobErrorCode.dataset_not_found, f"{param}: {url} is refused: {exc.message}"
            ) from exc
        except OutboundError as exc:
            staging.unlink(missing_ok=True)
            raise JobFailure(
                JobErrorCode.storage_error, f"{param}: could not download {url}: {exc.message}"
            ) from exc
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        target = folder / f"{digest.hexdigest()}{suffix}"
        staging.replace(target)
        return target
