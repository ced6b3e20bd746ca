"""/v1/files: upload a dataset once, use its id in any number of jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from fastapi.responses import StreamingResponse

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.routers.jobs import primed
from api.schemas import FileList, FileOut
from shared.services import files as file_service

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FileOut)
def upload_file(
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    file: Annotated[UploadFile, File(description="a JSONL dataset: messages, prompt/completion or text")],
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FileOut:
    """Uploads a JSONL dataset; every line is checked before it is stored."""
    record = file_service.store_upload(
        session=session,
        settings=settings,
        store=store,
        team_id=team,
        filename=file.filename or "dataset.jsonl",
        purpose=purpose,
        source=file.file,
    )
    session.commit()
    return FileOut.of(record)


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
