"""/v1/files: upload a dataset once, use its id in any number of jobs.

These are also OpenAI's files routes (same paths, OpenAI's file objects plus Tuneforge's sha256, format and
num_samples), so the `openai` client's files.create/list/retrieve/content/delete work against them. A
finished fine-tuning job's results CSV (`file-results-…`, see api/routers/openai_compat.py) is served here
too; it is made from the job's metrics on request and is not listed.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile, status
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import delete, or_, select

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyKeyHeader, IdempotentRequest
from api.openai_schemas import FileDeleted
from api.routers.jobs import primed
from api.routers.openai_compat import find_results_file, refuse_results_file_delete
from api.schemas import FileList, FileOut
from shared.db import beyond
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.models import Job, UploadedFile
from shared.services import files as file_service
from shared.services.idempotency import request_hash
from shared.states import TERMINAL
from shared.storage import StorageError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/files", tags=["files"])


def _content_sha256(upload: UploadFile) -> str:
    digest = hashlib.sha256()
    while chunk := upload.file.read(1024 * 1024):
        digest.update(chunk)
    upload.file.seek(0)
    return digest.hexdigest()


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FileOut)
def upload_file(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    file: Annotated[UploadFile, File(description="a JSONL dataset: messages, prompt/completion or text")],
    purpose: Annotated[str, Form()] = "fine-tune",
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | FileOut:
    """Uploads a JSONL dataset; every line is checked before it is stored."""
    filename = file.filename or "dataset.jsonl"
    fingerprint = request_hash(purpose, filename, _content_sha256(file)) if idempotency_key else ""
    guard = IdempotentRequest(request, team, "files.create", idempotency_key, fingerprint)
    replay = guard.replay()
    if replay is not None:
        return replay
    try:
        record = file_service.store_upload(
            session=session,
            settings=settings,
            store=store,
            team_id=team,
            filename=filename,
            purpose=purpose,
            source=file.file,
        )
        out = FileOut.of(record)
        guard.record(session, status.HTTP_201_CREATED, out.model_dump(mode="json"))
        session.commit()
    except BaseException:
        session.rollback()
        guard.abandon()
        raise
    return out


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[str | None, Query(description="the id of the last file of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="by created_at")] = "desc",
    purpose: str | None = None,
) -> FileList:
    """Lists the team's uploaded files, newest first (OpenAI's `after`, `limit`, `order` and `purpose`)."""
    query = select(UploadedFile).where(UploadedFile.team_id == team)
    if purpose is not None:
        query = query.where(UploadedFile.purpose == purpose)
    newest_first = order == "desc"
    if after is not None:
        anchor = session.scalar(
            select(UploadedFile).where(UploadedFile.id == after, UploadedFile.team_id == team)
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
    data = [FileOut.of(f) for f in records[:limit]]
    return FileList(
        data=data,
        has_more=len(records) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, session: SessionDep, team: CallerTeam) -> FileOut:
    """Returns one uploaded file's record (or a finished fine-tuning job's results file)."""
    results = find_results_file(session, team, file_id)
    if results is not None:
        return results[0]
    return FileOut.of(file_service.get_file(session=session, team_id=team, file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse)
def download_file(file_id: str, session: SessionDep, store: StoreDep, team: CallerTeam) -> Response:
    """Downloads an uploaded file's bytes (or a results file's CSV)."""
    results = find_results_file(session, team, file_id)
    if results is not None:
        record, content = results
        return Response(
            content,
            media_type="text/csv",
            headers={
                "X-Checksum-Sha256": record.sha256,
                "Content-Disposition": f'attachment; filename="{record.filename}"',
            },
        )
    record = file_service.get_file(session=session, team_id=team, file_id=file_id)
    return StreamingResponse(
        primed(store.iter_chunks(record.storage_key)),
        media_type="application/jsonl",
        headers={"Content-Length": str(record.size_bytes), "X-Checksum-Sha256": record.sha256},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, store: StoreDep, team: CallerTeam) -> FileDeleted:
    """Deletes an uploaded file: its record and its stored bytes.

    Refused (409) while a job that has not finished (validating, queued, running, cancelling) reads it as
    its dataset or validation dataset: cancel those jobs or let them end first. Finished jobs keep the id
    in `dataset` / `training_file` (their adapters, metrics and results stay), but the bytes are gone and
    new jobs cannot use the id. A job submitted at the very moment of the deletion fails its validation
    with `dataset_not_found`.
    """
    refuse_results_file_delete(session, team, file_id)
    record = file_service.get_file(session=session, team_id=team, file_id=file_id)
    readers = session.scalars(
        select(Job.id)
        .where(
            Job.team_id == team,
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
        delete(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.team_id == team)
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
    return FileDeleted(id=file_id)
