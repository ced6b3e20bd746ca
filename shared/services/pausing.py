"""Pausing and resuming a job. A running job is asked to pause (`pausing`): its worker learns it from the
next heartbeat, the training process checkpoints and stops, and the job is `paused` with its GPUs given back
(worker/supervisor.py, worker/outcomes.py). A queued job is held (`paused`) at once. Resuming puts a paused
job back in the queue; its next attempt continues from the latest checkpoint, as after a lost worker."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.errors import Conflict
from shared.models import Job
from shared.services.dispatch import send_after_commit
from shared.services.jobs import check_queue_quota, get_job, transition
from shared.settings import Settings
from shared.states import TERMINAL, JobStatus
from shared.tenancy import TeamID


def _why_not(job: Job, action: str) -> str:
    status = JobStatus(job.status)
    if status in TERMINAL:
        return f"job {job.id} already {status.value}; there is nothing to {action}"
    reasons = {
        JobStatus.validating: f"job {job.id} is validating (its datasets and plan are being checked); "
        f"{action} it once it is queued",
        JobStatus.cancelling: f"job {job.id} is being cancelled",
        JobStatus.queued: f"job {job.id} is queued, not paused; there is nothing to resume",
        JobStatus.running: f"job {job.id} is running, not paused; there is nothing to resume",
        JobStatus.pausing: f"job {job.id} is still checkpointing to pause; resume it once it is paused",
    }
    return reasons[status]


def pause_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """Pauses a job: a queued one at once (no worker takes it), a running one through `pausing` (it
    checkpoints, then frees its GPUs). Pausing a pausing or paused job changes nothing; other statuses are a
    409 saying why. The caller commits."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    status = JobStatus(job.status)
    if status in (JobStatus.pausing, JobStatus.paused):
        return job
    if status is JobStatus.queued:
        moved = transition(
            session=session,
            job_id=job_id,
            to=JobStatus.paused,
            from_=frozenset({status}),
            message="paused by the user while queued; no worker takes it until it is resumed",
            reserved_for=None,
            reserved_at=None,
        )
    elif status is JobStatus.running:
        moved = transition(
            session=session,
            job_id=job_id,
            to=JobStatus.pausing,
            from_=frozenset({status}),
            attempt=job.attempt,
            message="pause requested: the job checkpoints, then gives its GPUs back",
        )
    else:
        raise Conflict(_why_not(job, "pause"), param="job_id")
    if not moved:  # a worker claimed, paused or finished it meanwhile: decide again on its new status
        session.expire(job)
        return pause_job(session=session, team_id=team_id, job_id=job_id)
    session.refresh(job)
    return job


def resume_job(*, session: Session, settings: Settings, team_id: TeamID, job_id: str) -> Job:
    """Puts a paused job back in the queue (within the team's limit of waiting jobs); its next attempt
    continues from its latest checkpoint. Other statuses are a 409 saying why. The caller commits; the nodes
    are woken once it has."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    if job.status != JobStatus.paused:
        raise Conflict(_why_not(job, "resume"), param="job_id")
    check_queue_quota(session=session, settings=settings, team_id=team_id)
    if not transition(
        session=session,
        job_id=job_id,
        to=JobStatus.queued,
        from_=frozenset({JobStatus.paused}),
        message="resumed by the user: back in the queue, to continue from its latest checkpoint",
        not_before=None,
        enqueued_at=None,
        worker_id=None,
    ):
        session.expire(job)
        raise Conflict(_why_not(job, "resume"), param="job_id")
    send_after_commit(session, settings, job_id)
    session.refresh(job)
    return job
