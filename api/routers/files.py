"""/v1/files: upload a dataset once, use its id in any number of jobs."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile, status
from fastapi.responses import Response, StreamingResponse

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyKeyHeader, IdempotentRequest
from api.routers.jobs import primed
from api.schemas import FileList, FileOut
from shared.services import files as file_service
from shared.services.idempotency import request_hash

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
def list_files(session: SessionDep, team: CallerTeam) -> FileList:
    """Lists the team's uploaded files, newest first."""
    return FileList(data=[FileOut.of(f) for f in file_service.list_files(session=session, team_id=team)])


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, session: SessionDep, team: CallerTeam) -> FileOut:
    """Returns one uploaded file's record."""
    return FileOut.of(file_service.get_file(session=session, team_id=team, file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse)
def download_file(file_id: str, session: SessionDep, store: StoreDep, team: CallerTeam) -> StreamingResponse:
    """Downloads an uploaded file's bytes."""
    record = file_service.get_file(session=session, team_id=team, file_id=file_id)
    return StreamingResponse(
        primed(store.iter_chunks(record.storage_key)),
        media_type="application/jsonl",
        headers={"Content-Length": str(record.size_bytes), "X-Checksum-Sha256": record.sha256},
    )
