"""/v1/jobs: submit, read, cancel, follow and download fine-tuning jobs."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from api.archive import ArchiveMember, stream_tar
from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyKeyHeader, IdempotentRequest
from api.schemas import (
    ArtifactList,
    ArtifactOut,
    CheckpointList,
    CheckpointOut,
    EventOut,
    EventPage,
    ExportRequest,
    JobOut,
    JobPage,
    MetricPoint,
    MetricsOut,
)
from shared.errors import NotFound
from shared.models import Artifact, Job
from shared.queue import enqueue_job
from shared.schemas import AdapterSource, ExportSpec, JobSpec, Method
from shared.services import jobs as job_service
from shared.services.idempotency import request_hash
from shared.settings import Settings
from shared.states import TERMINAL, JobStatus
from shared.storage import ObjectStore
from shared.tenancy import TeamID

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Starts a storage stream before the response does, so a missing object is a 404, not a cut download."""
    first = next(chunks, b"")
    return itertools.chain([first], chunks)


def submit_job(
    spec: JobSpec,
    request: Request,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team: TeamID,
    idempotency_key: str | None,
    endpoint: str = "jobs.create",
) -> Response | Job:
    """Creates a job (or replays the answer to an earlier request with the same Idempotency-Key), commits,
    and only then queues it."""
    guard = IdempotentRequest(request, team, endpoint, idempotency_key, request_hash(spec.model_dump_json()))
    replay = guard.replay()
    if replay is not None:
        return replay
    try:
        job = job_service.create_job(session=session, settings=settings, store=store, team_id=team, spec=spec)
        guard.record(session, status.HTTP_201_CREATED, JobOut.of(job).model_dump(mode="json"))
        session.commit()
    except BaseException:
        session.rollback()
        guard.abandon()
        raise
    # Enqueue only after the commit: a worker must find the job it is told to run.
    if enqueue_job(settings, session, job):
        session.commit()
    else:
        job_service.add_event(
            session=session,
            job_id=job.id,
            type="queue",
            level="warning",
            message="the broker did not take the job; it will be re-sent when the broker is back",
        )
        session.commit()
    return job


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(
    spec: JobSpec,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | JobOut:
    """Submits a job (training, merge, fusion or export). It is checked, stored, and only then queued."""
    created = submit_job(spec, request, session, settings, store, team, idempotency_key)
    return created if isinstance(created, Response) else JobOut.of(created)


@router.post("/{job_id}/export", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def export_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    body: ExportRequest | None = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | JobOut:
    """Starts an export job that merges this finished job's adapter into its base model."""
    job_service.get_job(session=session, team_id=team, job_id=job_id)  # 404 unless it is the team's job
    body = body or ExportRequest()
    spec = JobSpec(
        method=Method.export,
        export=ExportSpec(
            source=AdapterSource(job_id=job_id), dtype=body.dtype, max_shard_size=body.max_shard_size
        ),
        priority=body.priority,
        metadata=body.metadata,
    )
    created = submit_job(
        spec, request, session, settings, store, team, idempotency_key, endpoint="jobs.export"
    )
    return created if isinstance(created, Response) else JobOut.of(created)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    team: CallerTeam,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=job_service.MAX_PAGE)] = 20,
    cursor: str | None = None,
) -> JobPage:
    """Lists the team's jobs, newest first."""
    jobs, next_cursor = job_service.list_jobs(
        session=session, team_id=team, status=status, limit=limit, cursor=cursor
    )
    return JobPage(
        data=[JobOut.of(j) for j in jobs], has_more=next_cursor is not None, next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, team: CallerTeam) -> JobOut:
    """Returns one job."""
    return JobOut.of(job_service.get_job(session=session, team_id=team, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, team: CallerTeam) -> JobOut:
    """Cancels a job: at once when it has not started, within seconds when it is training."""
    job = job_service.cancel_job(session=session, team_id=team, job_id=job_id)
    session.commit()
    return JobOut.of(job)


@router.get("/{job_id}/events", response_model=EventPage)
def list_events(
    job_id: str,
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="return events after this event id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventPage:
    """Returns a job's events in the order they happened."""
    events, next_after = job_service.list_events(
        session=session, team_id=team, job_id=job_id, after=after, limit=limit
    )
    return EventPage(
        data=[EventOut.of(e) for e in events], has_more=next_after is not None, next_after=next_after
    )


@router.get("/{job_id}/events/stream", response_class=StreamingResponse)
def stream_events(job_id: str, request: Request, session: SessionDep, team: CallerTeam) -> StreamingResponse:
    """Streams a job's events as server-sent events until the job ends."""
    job_service.get_job(session=session, team_id=team, job_id=job_id)
    factory = request.app.state.session_factory

    def events() -> Iterator[bytes]:
        after: int | None = None
        while True:
            with factory() as poll:
                page, _ = job_service.list_events(
                    session=poll, team_id=team, job_id=job_id, after=after, limit=500
                )
                job = job_service.get_job(session=poll, team_id=team, job_id=job_id)
                finished = JobStatus(job.status) in TERMINAL
            for event in page:
                after = event.id
                payload = EventOut.of(event).model_dump_json()
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
            if finished and not page:
                yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n".encode()
                return
            if not page:
                time.sleep(1.0)
                # A comment (SSE clients skip it) between idle polls: without it this generator never
                # returns to the server while the job is quiet, so a client that left is never noticed and
                # its thread polls until the job ends (enough of them exhaust the threadpool).
                yield b": keep-alive\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def get_metrics(job_id: str, session: SessionDep, team: CallerTeam) -> MetricsOut:
    """Returns the job's loss curves (train and eval), by step."""
    curves = job_service.get_metrics(session=session, team_id=team, job_id=job_id)
    return MetricsOut(
        job_id=job_id,
        train=[MetricPoint.of(m) for m in curves["train"]],
        eval=[MetricPoint.of(m) for m in curves["eval"]],
    )


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, session: SessionDep, team: CallerTeam) -> ArtifactList:
    """Lists the files a job produced, with size and sha256."""
    artifacts = job_service.list_artifacts(session=session, team_id=team, job_id=job_id)
    kinds = sorted({a.kind for a in artifacts})
    main = next((kind for kind in ("merged", "adapter") if kind in kinds), None)
    return ArtifactList(
        data=[ArtifactOut.of(a) for a in artifacts],
        archive_url=f"/v1/jobs/{job_id}/artifacts/{main}.tar" if main else None,
        archive_urls={kind: f"/v1/jobs/{job_id}/artifacts/{kind}.tar" for kind in kinds},
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, team: CallerTeam) -> CheckpointList:
    """Lists the job's stored training states (each complete, resumable and downloadable)."""
    checkpoints = job_service.list_checkpoints(session=session, team_id=team, job_id=job_id)
    return CheckpointList(data=[CheckpointOut.of(c) for c in checkpoints])


@router.get("/{job_id}/checkpoints/{step}.tar", response_class=StreamingResponse)
def download_checkpoint(
    job_id: str, step: int, session: SessionDep, store: StoreDep, team: CallerTeam
) -> Response:
    """Downloads one checkpoint (adapter, optimizer, scheduler, RNG and trainer state) as a tar archive."""
    checkpoint = next(
        (
            c
            for c in job_service.list_checkpoints(session=session, team_id=team, job_id=job_id)
            if c.step == step
        ),
        None,
    )
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint at step {step}", param="step")
    artifacts = [
        a
        for a in job_service.list_artifacts(session=session, team_id=team, job_id=job_id, kind="checkpoint")
        if a.name.startswith(checkpoint.prefix + "/")
    ]
    return _archive(f"{job_id}-{checkpoint.prefix}", artifacts, store, strip=checkpoint.prefix + "/")


def _archive(
    root: str, artifacts: Sequence[Artifact], store: ObjectStore, strip: str = ""
) -> StreamingResponse:
    members = [
        ArchiveMember(
            name=a.name.removeprefix(strip),
            size=a.size_bytes,
            sha256=a.sha256,
            chunks=lambda key=a.storage_key: store.iter_chunks(key),
        )
        for a in artifacts
    ]
    return StreamingResponse(
        stream_tar(root, members),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{root}.tar"'},
    )


@router.get("/{job_id}/artifacts/{kind}.tar", response_class=StreamingResponse)
def download_archive(
    job_id: str, kind: str, session: SessionDep, store: StoreDep, team: CallerTeam
) -> Response:
    """Downloads every file of one artifact kind (`adapter`) as a tar archive with a SHA256SUMS file."""
    artifacts = job_service.list_artifacts(session=session, team_id=team, job_id=job_id, kind=kind)
    if not artifacts:
        raise NotFound(f"job {job_id} has no {kind} artifacts", param="kind")
    return _archive(f"{job_id}-{kind}", artifacts, store)


@router.get("/{job_id}/artifacts/{kind}/{name:path}", response_class=StreamingResponse)
def download_artifact(
    job_id: str,
    kind: str,
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    redirect: Annotated[
        bool, Query(description="answer with a short-lived presigned URL when storage has one")
    ] = False,
) -> Response:
    """Downloads one artifact file (streamed, or a redirect to a presigned URL)."""
    artifacts = job_service.list_artifacts(session=session, team_id=team, job_id=job_id, kind=kind)
    artifact = next((a for a in artifacts if a.name == name), None)
    if artifact is None:
        raise NotFound(f"job {job_id} has no {kind} artifact named {name!r}", param="name")
    if redirect:
        url = store.presigned_url(artifact.storage_key, settings.presigned_url_ttl_seconds)
        if url:
            return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    return StreamingResponse(
        primed(store.iter_chunks(artifact.storage_key)),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(artifact.size_bytes),
            "ETag": f'"{artifact.sha256}"',
            "X-Checksum-Sha256": artifact.sha256,
            "Content-Disposition": f'attachment; filename="{name.rsplit("/", 1)[-1]}"',
        },
    )
