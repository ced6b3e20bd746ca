"""/v1/files: upload a dataset once, use its id in any number of jobs.

These are also OpenAI's files routes (same paths, OpenAI's file objects plus Tuneforge's sha256, format and
num_samples), so the `openai` client's files.create/list/retrieve/content/delete work against them. A
finished fine-tuning job's results CSV (`file-results-…`, see shared/services/fine_tuning.py) is served here
too; it is made from the job's metrics on request and is not listed.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile, status
from fastapi.responses import Response, StreamingResponse

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.downloads import file_response
from api.idempotency import IdempotencyKeyHeader, idempotent_call, replayed
from api.openai.schemas import FileDeleted
from api.schemas import FileList, FileOut
from shared.services import files as file_service
from shared.services.fine_tuning import ResultsFile
from shared.services.idempotency import Replay, request_hash

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
    file: Annotated[
        UploadFile, File(description="a JSONL, Parquet or CSV dataset: messages, prompt/completion or text")
    ],
    purpose: Annotated[str, Form()] = "fine-tune",
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | FileOut:
    """Uploads a dataset (JSONL, or Parquet or CSV by its name); every row is checked before it is stored."""
    filename = file.filename or "dataset.jsonl"
    fingerprint = request_hash(purpose, filename, _content_sha256(file)) if idempotency_key else ""
    uploaded = file_service.upload_file(
        session=session,
        settings=settings,
        store=store,
        team_id=team,
        filename=filename,
        purpose=purpose,
        source=file.file,
        idempotency=idempotent_call(request, team, "files.create", idempotency_key, fingerprint),
        answer=lambda record: FileOut.of(record).model_dump(mode="json"),
    )
    return replayed(uploaded) if isinstance(uploaded, Replay) else FileOut.of(uploaded)


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
    records, has_more = file_service.list_files(
        session=session, team_id=team, after=after, limit=limit, newest_first=order == "desc", purpose=purpose
    )
    data = [FileOut.of(f) for f in records]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, session: SessionDep, team: CallerTeam) -> FileOut:
    """Returns one uploaded file's record (or a finished fine-tuning job's results file)."""
    return FileOut.of(file_service.find_file(session=session, team_id=team, file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse)
def download_file(
    file_id: str, request: Request, session: SessionDep, store: StoreDep, team: CallerTeam
) -> Response:
    """Downloads an uploaded file's bytes (or a results file's CSV)."""
    found = file_service.find_file(session=session, team_id=team, file_id=file_id)
    if isinstance(found, ResultsFile):
        return Response(
            found.content,
            media_type="text/csv",
            headers={
                "X-Checksum-Sha256": found.sha256,
                "Content-Disposition": f'attachment; filename="{found.filename}"',
            },
        )
    return file_response(request.app.state.session_factory, store, found)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, store: StoreDep, team: CallerTeam) -> FileDeleted:
    """Deletes an uploaded file: its record and its stored bytes.

    Refused (409) while a job that has not finished (validating, queued, running, cancelling) reads it as
    its dataset or validation dataset: cancel those jobs or let them end first. Finished jobs keep the id
    in `dataset` / `training_file` (their adapters, metrics and results stay), but the bytes are gone and
    new jobs cannot use the id. A job submitted at the very moment of the deletion fails its validation
    with `dataset_not_found`.
    """
    file_service.delete_file(session=session, store=store, team_id=team, file_id=file_id)
    return FileDeleted(id=file_id)
