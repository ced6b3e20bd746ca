"""Uploaded datasets: checked line by line, stored in object storage under the team's prefix."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.datasets import DatasetInvalid, scan_jsonl
from shared.errors import InvalidRequest, NotFound, PayloadTooLarge
from shared.models import UploadedFile, new_id
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.tenancy import TeamID

PURPOSES = ("fine-tune",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """Returns a storage-safe version of a client-supplied filename."""
    base = _UNSAFE.sub("_", os.path.basename(name or "").strip()) or "dataset.jsonl"
    return base.lstrip(".")[:200] or "dataset.jsonl"


def _spool(source: BinaryIO, limit: int) -> tuple[Path, int, str]:
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"file is larger than the {limit} byte limit", param="file")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), size, digest.hexdigest()


def store_upload(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    filename: str,
    purpose: str,
    source: BinaryIO,
) -> UploadedFile:
    """Checks an uploaded JSONL dataset line by line, stores it, and records it for the team."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    path, size, sha256 = _spool(source, settings.max_upload_bytes)
    try:
        if size == 0:
            raise InvalidRequest("the file is empty", param="file")
        try:
            with path.open("rb") as handle:
                summary = scan_jsonl(handle)
        except DatasetInvalid as exc:
            raise InvalidRequest(
                f"the dataset has invalid lines: {exc}", param="file", code="invalid_dataset"
            ) from exc
        except UnicodeDecodeError as exc:
            raise InvalidRequest("the file is not UTF-8 text", param="file", code="invalid_dataset") from exc
        file_id = new_id("file")
        name = safe_filename(filename)
        stored = store.put_file(f"files/{team_id}/{file_id}/{name}", path)
        if stored.sha256 != sha256:
            raise InvalidRequest("the upload changed while it was stored; send it again", param="file")
    finally:
        path.unlink(missing_ok=True)
    record = UploadedFile(
        id=file_id,
        team_id=team_id,
        filename=name,
        purpose=purpose,
        storage_key=stored.key,
        size_bytes=size,
        sha256=sha256,
        format=summary.format.value,
        num_samples=summary.num_samples,
    )
    session.add(record)
    session.flush()
    return record


def get_file(*, session: Session, team_id: TeamID, file_id: str) -> UploadedFile:
    """Returns a team's uploaded file, or raises NotFound."""
    record = session.scalar(
        select(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.team_id == team_id)
    )
    if record is None:
        raise NotFound(f"file {file_id} not found", param="file_id")
    return record


def list_files(*, session: Session, team_id: TeamID, limit: int = 100) -> Sequence[UploadedFile]:
    """Returns a team's uploaded files, newest first."""
    query = select(UploadedFile).where(UploadedFile.team_id == team_id)
    return session.scalars(query.order_by(UploadedFile.created_at.desc()).limit(limit)).all()
