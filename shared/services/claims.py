"""Claiming a job for an attempt, and keeping the claim: the compare-and-swap on the attempt number that lets
exactly one worker run a job, and the lease a running attempt renews."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from shared.models import Job, utcnow
from shared.services.jobs import add_event, team_limits
from shared.settings import Settings
from shared.states import JobStatus


def claim_job(
    *, session: Session, job_id: str, worker_id: str, lease_timeout: float, settings: Settings | None = None
) -> int | None:
    """Claims a queued job for this worker, or takes over one whose worker stopped heartbeating.
    Returns the new attempt number, or None if the job is not this worker's to run. With `settings`, a
    team at its running limit waits (the job is tried again later), so one team cannot take every worker."""
    now = utcnow()
    stale = now - timedelta(seconds=lease_timeout)
    current = session.execute(
        select(Job.attempt, Job.status, Job.started_at, Job.team_id).where(Job.id == job_id)
    ).one_or_none()
    if current is None:
        return None
    previous_attempt, previous_status, started_at, team_id = current
    if settings is not None and previous_status == JobStatus.queued:
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            # Claims of one team's jobs take turns, so two workers cannot both take its last free slot.
            session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:team))"), {"team": team_id})
        limit, _ = team_limits(session, settings, team_id)
        running = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.team_id == team_id, Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value])
            )
        )
        if running >= limit:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued.value)
                .values(not_before=now + timedelta(seconds=settings.fairness_retry_seconds), enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
            return None
    claimable = or_(
        and_(Job.status == JobStatus.queued, or_(Job.not_before.is_(None), Job.not_before <= now)),
        and_(Job.status == JobStatus.running, Job.heartbeat_at < stale),
    )
    # The attempt number in the WHERE clause makes this a compare-and-swap: of two workers racing for the
    # same job, only one update matches.
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == previous_attempt, claimable)
        .values(
            status=JobStatus.running.value,
            attempt=previous_attempt + 1,
            worker_id=worker_id,
            heartbeat_at=now,
            started_at=started_at or now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    attempt = previous_attempt + 1
    taken_over = previous_status == JobStatus.running
    add_event(
        session=session,
        job_id=job_id,
        type="status",
        message=f"attempt {attempt} started on {worker_id}"
        + (" (the previous worker stopped heartbeating)" if taken_over else ""),
        attempt=attempt,
        data={"status": JobStatus.running.value, "worker_id": worker_id},
    )
    return attempt


def heartbeat(*, session: Session, job_id: str, attempt: int) -> JobStatus | None:
    """Renews this attempt's lease; returns the job's status, or None if the attempt lost the job."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value]),
        )
        .values(heartbeat_at=now)
    )
    if result.rowcount != 1:
        return None
    return JobStatus(session.scalar(select(Job.status).where(Job.id == job_id)))
