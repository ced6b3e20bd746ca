"""/v1/jobs: submit, read, cancel, follow and download fine-tuning jobs."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import Response, StreamingResponse

from api.answers import CreatedAnswer, json_answer, json_body_answer, tagged_answer
from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep, get_caller_team
from api.downloads import artifact_response, presigned_redirect, stream_archive
from api.event_stream import job_event_stream
from api.idempotency import IdempotencyKeyHeader, idempotent_call, replayed
from api.schemas import (
    ArtifactList,
    ArtifactOut,
    AttemptList,
    AttemptOut,
    CheckpointList,
    CheckpointOut,
    EvaluationOut,
    EventOut,
    EventPage,
    ExportRequest,
    JobOut,
    JobPage,
    LogPage,
    MetricsOut,
    job_answer,
    job_json,
    job_page_json,
    metric_curves,
)
from api.status_cache import StatusCache, forget_job
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import evaluations, job_logs, job_reads, pausing, submission
from shared.services import jobs as job_service
from shared.services.idempotency import Replay, request_hash
from shared.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(
    spec: JobSpec,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Submits a job (training, merge, fusion or export). It is checked, stored, and only then queued."""
    answer = CreatedAnswer(job_answer)
    submitted = submission.submit_job(
        session=session,
        settings=settings,
        store=store,
        team_id=team,
        spec=spec,
        idempotency=idempotent_call(
            request, team, "jobs.create", idempotency_key, request_hash(spec.model_dump_json())
        ),
        answer=answer,
    )
    return replayed(submitted) if isinstance(submitted, Replay) else answer.response(submitted)


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
) -> Response:
    """Starts an export job that merges this finished job's adapter into its base model."""
    options = (body or ExportRequest()).model_dump(mode="json")
    answer = CreatedAnswer(job_answer)
    submitted = submission.submit_export(
        session=session,
        settings=settings,
        store=store,
        team_id=team,
        source_job_id=job_id,
        options=options,
        idempotency=idempotent_call(
            request,
            team,
            "jobs.export",
            idempotency_key,
            request_hash(job_id, json.dumps(options, sort_keys=True)),
        ),
        answer=answer,
    )
    return replayed(submitted) if isinstance(submitted, Replay) else answer.response(submitted)


@router.get("", response_model=JobPage)
async def list_jobs(
    request: Request,
    team: CallerTeam,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=job_service.MAX_PAGE)] = 20,
    cursor: str | None = None,
) -> Response:
    """Lists the team's jobs, newest first."""
    rows, next_cursor = await job_reads.read_job_page(
        db=request.app.state.db, team_id=team, status=status, limit=limit, cursor=cursor
    )
    return json_body_answer(request, job_page_json(rows, next_cursor))


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request) -> Response:
    """Returns one job. Send its ETag back in If-None-Match to get a bodiless 304 while it has not changed."""
    # The caller's team read here rather than as a dependency: the most polled route, and FastAPI's resolution
    # of a dependency was a tenth of its cost (it has no parameters that could fail before the key is checked).
    team = await get_caller_team(request)
    cache: StatusCache = request.app.state.status_cache
    answer = cache.get(team, job_id)
    if answer is None:
        mark = cache.begin()
        job = await job_reads.read_job(db=request.app.state.db, team_id=team, job_id=job_id)
        answer = cache.fill(mark, team, job_id, job_json(job).encode(), job.status == JobStatus.queued)
    return tagged_answer(request, answer.body, answer.etag)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, session: SessionDep, team: CallerTeam) -> JobOut:
    """Cancels a job: at once when it has not started, within seconds when it is training."""
    job = job_service.cancel_job(session=session, team_id=team, job_id=job_id)
    session.commit()
    forget_job(request, job_id)
    return JobOut.of(job)


@router.post("/{job_id}/pause", response_model=JobOut)
def pause_job(job_id: str, request: Request, session: SessionDep, team: CallerTeam) -> JobOut:
    """Pauses a job: a queued one at once; a training one goes through `pausing` (it checkpoints, then gives
    its GPUs back) to `paused`. Other statuses answer 409 with the reason."""
    job = pausing.pause_job(session=session, team_id=team, job_id=job_id)
    session.commit()
    forget_job(request, job_id)
    return JobOut.of(job)


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, team: CallerTeam
) -> JobOut:
    """Puts a paused job back in the queue; it continues from its latest checkpoint. A job that is not paused
    answers 409 with the reason."""
    job = pausing.resume_job(session=session, settings=settings, team_id=team, job_id=job_id)
    session.commit()
    forget_job(request, job_id)
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
def stream_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    team: CallerTeam,
    metrics: Annotated[
        bool, Query(description="also stream each new metric point, as `metric` events (the loss curves)")
    ] = False,
) -> StreamingResponse:
    """Streams a job's events as server-sent events until the job ends."""
    job_service.get_job(session=session, team_id=team, job_id=job_id)  # 404 before the stream starts
    return StreamingResponse(
        job_event_stream(request.app.state.session_factory, team, job_id, metrics=metrics),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/{job_id}/metrics", response_model=MetricsOut)
async def get_metrics(job_id: str, request: Request, team: CallerTeam) -> Response:
    """Returns the job's loss curves (train and eval), by step."""
    curves = metric_curves(await job_reads.read_metrics(db=request.app.state.db, team_id=team, job_id=job_id))
    return json_answer(request, {"job_id": job_id, "train": curves["train"], "eval": curves["eval"]})


@router.get("/{job_id}/evaluation", response_model=EvaluationOut)
def get_evaluation(job_id: str, session: SessionDep, store: StoreDep, team: CallerTeam) -> dict:
    """Returns a finished adapter job's evaluation: the base model's and the adapter's answers to its
    eval_prompts (and to prompts of its validation set) side by side, and the validation perplexity before and
    after training. 404 until the job has one."""
    return evaluations.read_evaluation(session=session, store=store, team_id=team, job_id=job_id)


@router.get("/{job_id}/logs", response_model=LogPage)
def get_logs(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    team: CallerTeam,
    attempt: Annotated[int | None, Query(ge=1, description="the attempt; default: the latest")] = None,
    offset: Annotated[
        int | None, Query(ge=0, description="the byte offset to read from (next_offset)")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=job_logs.MAX_PAGE_BYTES, description="the most bytes of lines in the page")
    ] = job_logs.DEFAULT_PAGE_BYTES,
    tail: Annotated[
        int | None, Query(ge=1, le=job_logs.MAX_TAIL_LINES, description="the last N lines instead of offset")
    ] = None,
) -> dict:
    """Returns a page of an attempt's training output, in whole lines. While the attempt runs, the output so
    far (shipped by its worker every second); once it ended, the log stored in object storage. Follow a
    running attempt by asking again from `next_offset` until `complete`."""
    return job_logs.read_log(
        session=session,
        store=store,
        team_id=team,
        job_id=job_id,
        attempt=attempt,
        offset=offset,
        limit=limit,
        tail=tail,
    )


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, session: SessionDep, team: CallerTeam) -> ArtifactList:
    """Lists the files a job produced, with size and sha256."""
    artifacts = artifact_service.list_artifacts(session=session, team_id=team, job_id=job_id)
    kinds = sorted({a.kind for a in artifacts})
    main = next((kind for kind in ("merged", "adapter") if kind in kinds), None)
    return ArtifactList(
        data=[ArtifactOut.of(a) for a in artifacts],
        archive_url=f"/v1/jobs/{job_id}/artifacts/{main}.tar" if main else None,
        archive_urls={kind: f"/v1/jobs/{job_id}/artifacts/{kind}.tar" for kind in kinds},
    )


@router.get("/{job_id}/attempts", response_model=AttemptList)
def list_attempts(job_id: str, session: SessionDep, team: CallerTeam) -> AttemptList:
    """Lists the job's attempts: the host and GPU indices each ran on, its launcher, and how it ended."""
    attempts = job_service.list_attempts(session=session, team_id=team, job_id=job_id)
    return AttemptList(data=[AttemptOut.of(a) for a in attempts])


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, team: CallerTeam) -> CheckpointList:
    """Lists the job's stored training states (each complete, resumable and downloadable)."""
    checkpoints = artifact_service.list_checkpoints(session=session, team_id=team, job_id=job_id)
    return CheckpointList(data=[CheckpointOut.of(c) for c in checkpoints])


@router.get("/{job_id}/checkpoints/{step}.tar", response_class=StreamingResponse)
def download_checkpoint(
    job_id: str, step: int, request: Request, session: SessionDep, store: StoreDep, team: CallerTeam
) -> Response:
    """Downloads one checkpoint (adapter, optimizer, scheduler, RNG and trainer state) as a tar archive."""
    checkpoint, files = artifact_service.get_checkpoint(
        session=session, team_id=team, job_id=job_id, step=step
    )
    return stream_archive(
        request.app.state.session_factory,
        store,
        f"{job_id}-{checkpoint.prefix}",
        files,
        strip=checkpoint.prefix + "/",
    )


# Where storage presigns (S3), a download answers 307 to a short-lived URL in storage unless the client asks
# for the stream; the local backend always streams.
RedirectQuery = Annotated[
    bool | None,
    Query(
        description="false: stream the bytes through the API (checked against their sha256 as they pass). "
        "Default: a 307 redirect to a short-lived presigned URL where storage has one (S3), else the stream",
    ),
]


@router.get("/{job_id}/artifacts/{kind}.tar", response_class=StreamingResponse)
def download_archive(
    job_id: str,
    kind: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    redirect: RedirectQuery = None,
) -> Response:
    """Downloads every file of one artifact kind (`adapter`) as a tar archive with a SHA256SUMS file: a redirect
    to the archive stored with the adapter where storage is S3, else streamed."""
    artifacts, archive = artifact_service.get_kind(session=session, team_id=team, job_id=job_id, kind=kind)
    factory = request.app.state.session_factory
    if redirect is not False and archive is not None:
        answer = presigned_redirect(factory, store, archive, settings.presigned_url_ttl_seconds, artifacts)
        if answer is not None:
            return answer
    return stream_archive(factory, store, artifact_service.archive_root(job_id, kind), artifacts)


@router.get("/{job_id}/artifacts/{kind}/{name:path}", response_class=StreamingResponse)
def download_artifact(
    job_id: str,
    kind: str,
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    redirect: RedirectQuery = None,
) -> Response:
    """Downloads one artifact file: a redirect to a presigned URL where storage is S3, else streamed."""
    artifact = artifact_service.get_artifact(
        session=session, team_id=team, job_id=job_id, kind=kind, name=name
    )
    factory = request.app.state.session_factory
    if redirect is not False:
        answer = presigned_redirect(factory, store, artifact, settings.presigned_url_ttl_seconds)
        if answer is not None:
            return answer
    return artifact_response(
        factory,
        store,
        artifact,
        {"Content-Disposition": f'attachment; filename="{name.rsplit("/", 1)[-1]}"'},
    )
