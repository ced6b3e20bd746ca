"""/v1/fine_tuning: the OpenAI-compatible routes (see api/openai/__init__.py)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyKeyHeader, idempotent_call
from api.openai.errors import OpenAIRoute
from api.openai.schemas import (
    FineTuningJobCheckpointList,
    FineTuningJobCheckpointOut,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobEventOut,
    FineTuningJobList,
    FineTuningJobOut,
)
from api.openai.translate import to_job_spec
from api.schemas import JobOut
from api.status_cache import forget_job
from shared.errors import TuneforgeError
from shared.services import fine_tuning, submission
from shared.services.idempotency import request_hash

router = APIRouter(
    prefix="/v1/fine_tuning", tags=["fine-tuning (OpenAI-compatible)"], route_class=OpenAIRoute
)


def get_team_label(session: SessionDep, team: CallerTeam) -> str:
    """The caller's team as fine-tuned model names show it."""
    return fine_tuning.team_label(session=session, team_id=team)


TeamLabel = Annotated[str, Depends(get_team_label)]


def _metadata_filters(request: Request) -> list[tuple[str, str]]:
    """OpenAI's `metadata[key]=value` query filters."""
    found = []
    for name, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.{1,64})\]", name)
        if match:
            found.append((match.group(1), value))
    return found


@router.post("/jobs", response_model=FineTuningJobOut)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    label: TeamLabel,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | FineTuningJobOut:
    """Creates a fine-tuning job (OpenAI's body; PEFT settings in the `tuneforge` field). It is checked,
    stored and queued like any Tuneforge job."""
    spec, origins = to_job_spec(body)
    try:
        job, replayed = submission.submit_fine_tuning_job(
            session=session,
            settings=settings,
            store=store,
            team_id=team,
            spec=spec,
            # The stored first answer is the native job; a replay shows the job in this surface's shape.
            idempotency=idempotent_call(
                request,
                team,
                "fine_tuning.jobs.create",
                idempotency_key,
                request_hash(spec.model_dump_json()),
            ),
            answer=lambda created: JobOut.of(created).model_dump(mode="json"),
        )
    except TuneforgeError as exc:
        exc.param = origins.name(exc.param)
        raise
    out = FineTuningJobOut.of(job, label)
    if replayed:
        return JSONResponse(out.model_dump(mode="json"), headers={"Idempotent-Replayed": "true"})
    return out


@router.get("/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    team: CallerTeam,
    label: TeamLabel,
    after: Annotated[str | None, Query(description="the id of the last job of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Lists the team's fine-tuning jobs, newest first (`metadata[key]=value` filters on metadata)."""
    jobs, has_more = fine_tuning.list_training_jobs(
        session=session, team_id=team, after=after, limit=limit, metadata=_metadata_filters(request)
    )
    return FineTuningJobList(data=[FineTuningJobOut.of(j, label) for j in jobs], has_more=has_more)


@router.get("/jobs/{fine_tuning_job_id}", response_model=FineTuningJobOut)
def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, team: CallerTeam, label: TeamLabel
) -> FineTuningJobOut:
    """Returns one fine-tuning job."""
    job = fine_tuning.get_training_job(session=session, team_id=team, job_id=fine_tuning_job_id)
    return FineTuningJobOut.of(job, label)


@router.post("/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJobOut)
def cancel_fine_tuning_job(
    fine_tuning_job_id: str, request: Request, session: SessionDep, team: CallerTeam, label: TeamLabel
) -> FineTuningJobOut:
    """Cancels a job: a job that has not started is `cancelled` at once; a training one stays `running`
    (tuneforge.status `cancelling`) for the seconds its worker takes to stop, then is `cancelled`.
    A finished job answers 409."""
    job = fine_tuning.cancel_training_job(session=session, team_id=team, job_id=fine_tuning_job_id)
    forget_job(request, fine_tuning_job_id)
    return FineTuningJobOut.of(job, label)


@router.post("/jobs/{fine_tuning_job_id}/pause", response_model=FineTuningJobOut)
def pause_fine_tuning_job(
    fine_tuning_job_id: str, request: Request, session: SessionDep, team: CallerTeam, label: TeamLabel
) -> FineTuningJobOut:
    """Pauses a job: a queued one is `paused` at once; a training one stays `running` (tuneforge.status
    `pausing`) while it checkpoints and gives its GPUs back, then is `paused`. Other statuses answer 409."""
    job = fine_tuning.pause_training_job(session=session, team_id=team, job_id=fine_tuning_job_id)
    forget_job(request, fine_tuning_job_id)
    return FineTuningJobOut.of(job, label)


@router.post("/jobs/{fine_tuning_job_id}/resume", response_model=FineTuningJobOut)
def resume_fine_tuning_job(
    fine_tuning_job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    team: CallerTeam,
    label: TeamLabel,
) -> FineTuningJobOut:
    """Resumes a paused job: it is `queued` again and continues from its latest checkpoint. A job that is not
    paused answers 409."""
    job = fine_tuning.resume_training_job(
        session=session, settings=settings, team_id=team, job_id=fine_tuning_job_id
    )
    forget_job(request, fine_tuning_job_id)
    return FineTuningJobOut.of(job, label)


@router.get("/jobs/{fine_tuning_job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[
        str | None, Query(description="the id of the last event of the previous page: older events follow")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> FineTuningJobEventList:
    """Returns the job's events, newest first; `after` continues with the events older than that one."""
    events, has_more = fine_tuning.list_training_events(
        session=session, team_id=team, job_id=fine_tuning_job_id, after=after, limit=limit
    )
    return FineTuningJobEventList(data=[FineTuningJobEventOut.of(e) for e in events], has_more=has_more)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CallerTeam,
    label: TeamLabel,
    after: Annotated[
        str | None, Query(description="the id of the last checkpoint of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    """Returns the job's stored checkpoints, latest step first. Each is a complete, resumable training state
    (download it at `download_url`); the job's final adapter is its artifact, not a checkpoint."""
    page = fine_tuning.list_training_checkpoints(
        session=session, team_id=team, job_id=fine_tuning_job_id, after=after, limit=limit
    )
    return FineTuningJobCheckpointList(
        data=[
            FineTuningJobCheckpointOut.of(c, page.job, label, page.eval_loss.get(c.step))
            for c in page.checkpoints
        ],
        has_more=page.has_more,
    )
