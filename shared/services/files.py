"""Uploaded datasets (JSONL, Parquet or CSV): checked row by row, stored in object storage under the team's
prefix."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from shared.datasets import DatasetInvalid, FileKind, file_kind, kind_of_name, scan_file
from shared.db import beyond
from shared.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from shared.models import Job, UploadedFile, new_id, utcnow
from shared.services.fine_tuning import ResultsFile, find_results_file, refuse_results_file_delete
from shared.services.idempotency import IdempotentCall, Replay
from shared.settings import Settings
from shared.states import TERMINAL
from shared.storage import ObjectStore, StorageError
from shared.tenancy import TeamID

log = logging.getLogger(__name__)

PURPOSES = ("fine-tune",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """Returns a storage-safe version of a client-supplied filename."""
    base = _UNSAFE.sub("_", os.path.basename(name or "").strip()) or "dataset.jsonl"
    return base.lstrip(".")[:200] or "dataset.jsonl"


def _spool(source: BinaryIO, limit: int, kind: FileKind) -> tuple[Path, int, str]:
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=f".{kind}")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"file is larger than the {limit} byte limit of {kind} uploads", param="file"
                    )
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
    """Checks an uploaded dataset (JSONL, or Parquet or CSV by its name) row by row, stores it, and records it
    for the team."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    kind = kind_of_name(filename)
    path, size, sha256 = _spool(source, settings.upload_limit(kind), kind)
    try:
        if size == 0:
            raise InvalidRequest("the file is empty", param="file")
        kind = file_kind(path, filename)  # Parquet is known by its bytes, whatever its name
        try:
            summary = scan_file(path, kind=kind)
        except DatasetInvalid as exc:
            rows = "lines" if kind is FileKind.jsonl else "rows"
            raise InvalidRequest(
                f"the dataset has invalid {rows}: {exc}",
                param="file",
                code="invalid_dataset",
                # One entry per bad line (JSONL) or row (Parquet, CSV): its number and what is wrong.
                details=[{"param": "file", p.unit: p.line, "message": p.message} for p in exc.problems],
            ) from exc
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


def upload_file(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    filename: str,
    purpose: str,
    source: BinaryIO,
    idempotency: IdempotentCall,
    answer: Callable[[UploadedFile], dict[str, Any]],
) -> UploadedFile | Replay:
    """Stores an upload (store_upload) and commits it with its answer, or returns the stored answer to an
    earlier request with the same Idempotency-Key."""
    replay = idempotency.begin()
    if replay is not None:
        return replay
    try:
        record = store_upload(
            session=session,
            settings=settings,
            store=store,
            team_id=team_id,
            filename=filename,
            purpose=purpose,
            source=source,
        )
        idempotency.complete(session, 201, answer(record))
        session.commit()
    except BaseException:
        session.rollback()
        idempotency.release()
        raise
    return record


def clear_damaged(*, session: Session, row_id: object) -> None:
    """Unmarks stored bytes found intact again (restored from a backup)."""
    session.execute(update(UploadedFile).where(UploadedFile.id == row_id).values(damaged_at=None))


def mark_damaged(*, session: Session, row_id: str) -> None:
    """Records that an uploaded file's stored bytes no longer match its sha256: it is never served again."""
    session.execute(
        update(UploadedFile)
        .where(UploadedFile.id == row_id, UploadedFile.damaged_at.is_(None))
        .values(damaged_at=utcnow())
    )


def find_file(*, session: Session, team_id: TeamID, file_id: str) -> UploadedFile | ResultsFile:
    """Returns a team's uploaded file, or a succeeded job's results file; raises NotFound."""
    results = find_results_file(session=session, team_id=team_id, file_id=file_id)
    return results if results is not None else get_file(session=session, team_id=team_id, file_id=file_id)


def list_files(
    *,
    session: Session,
    team_id: TeamID,
    after: str | None = None,
    limit: int = 100,
    newest_first: bool = True,
    purpose: str | None = None,
) -> tuple[list[UploadedFile], bool]:
    """A page of a team's uploaded files by creation time, after the file `after`; and whether more follow."""
    query = select(UploadedFile).where(UploadedFile.team_id == team_id)
    if purpose is not None:
        query = query.where(UploadedFile.purpose == purpose)
    if after is not None:
        anchor = session.scalar(
            select(UploadedFile).where(UploadedFile.id == after, UploadedFile.team_id == team_id)
        )
        if anchor is None:
            raise InvalidRequest(f"after: no file {after!r} in your team", param="after")
        query = query.where(beyond(UploadedFile, anchor.created_at, anchor.id, descending=newest_first))
    ordering = (
        (UploadedFile.created_at.desc(), UploadedFile.id.desc())
        if newest_first
        else (UploadedFile.created_at.asc(), UploadedFile.id.asc())
    )
    records = list(session.scalars(query.order_by(*ordering).limit(limit + 1)))
    return records[:limit], len(records) > limit


def delete_file(*, session: Session, store: ObjectStore, team_id: TeamID, file_id: str) -> None:
    """Deletes an uploaded file's record (committed) and then its stored bytes. Refused (409) while a job that
    has not finished reads it, and for results files, which are never stored."""
    refuse_results_file_delete(session=session, team_id=team_id, file_id=file_id)
    record = get_file(session=session, team_id=team_id, file_id=file_id)
    readers = session.scalars(
        select(Job.id)
        .where(
            Job.team_id == team_id,
            Job.status.not_in([s.value for s in TERMINAL]),
            or_(Job.dataset_uri == file_id, Job.validation_uri == file_id),
        )
        .order_by(Job.created_at)
        .limit(6)
    ).all()
    if readers:
        listed = ", ".join(readers[:5]) + (", ..." if len(readers) > 5 else "")
        raise Conflict(
            f"file {file_id} is used by jobs that have not finished ({listed}); cancel them or wait for them "
            "to end, then delete it",
            param="file_id",
        )
    deleted = session.execute(
        delete(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.team_id == team_id)
    ).rowcount
    session.commit()
    if not deleted:  # deleted by a concurrent request
        raise NotFound(f"file {file_id} not found", param="file_id")
    try:
        store.delete(record.storage_key)
    except StorageError as exc:
        # The record is gone (nothing can read the file any more); only the bytes are left behind.
        log.warning(
            "file %s deleted, but its object %s stays in storage: %s", file_id, record.storage_key, exc
        )
