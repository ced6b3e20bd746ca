"""Keeps the database the truth: jobs whose worker vanished go back to the queue, and jobs waiting for
validation that the broker lost are sent again. Every worker runs this loop; each step is idempotent, so several running it at once is fine."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, or_, select

from shared.db import session_scope
from shared.errors import JobErrorCode
from shared.models import Job, utcnow
from shared.queue import queued_messages
from shared.services import jobs as job_service
from shared.services.dispatch import send_after_commit
from shared.settings import Settings
from shared.states import ACTIVE, JobStatus
from worker.webhooks import deliver_due_webhooks

log = logging.getLogger(__name__)
RUNNING = frozenset({JobStatus.running})
CANCELLING = frozenset({JobStatus.cancelling})
PAUSING = frozenset({JobStatus.pausing})


def reap_stale_jobs(settings: Settings) -> list[str]:
    """Returns running jobs whose heartbeat stopped to the queue (or fails them when out of attempts), cancels
    cancelling ones whose worker is gone and pauses pausing ones (at their latest checkpoint). Returns the ids
    it changed."""
    stale = utcnow() - timedelta(seconds=settings.lease_timeout_seconds)
    changed = []
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(
            select(Job).where(
                Job.status.in_([s.value for s in ACTIVE]),
                Job.heartbeat_at < stale,
            )
        ).all()
        # Re-checked in each update: a worker that was only slow and has just heartbeated keeps its job.
        still_stale = (Job.heartbeat_at < stale,)
        for job in jobs:
            last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
            lost = f"the worker running attempt {job.attempt} stopped heartbeating (last at {last})"
            if job.status == JobStatus.cancelling:
                done = job_service.transition(
                    session=session,
                    job_id=job.id,
                    to=JobStatus.cancelled,
                    attempt=job.attempt,
                    from_=CANCELLING,
                    conditions=still_stale,
                    message=lost,
                )
            elif job.status == JobStatus.pausing:
                done = job_service.transition(
                    session=session,
                    job_id=job.id,
                    to=JobStatus.paused,
                    attempt=job.attempt,
                    from_=PAUSING,
                    conditions=still_stale,
                    message=f"{lost}; the job is paused at its latest checkpoint",
                    worker_id=None,
                )
            elif (
                counted := job_service.attempts_counted(session=session, job_id=job.id, attempt=job.attempt)
            ) >= settings.max_attempts:
                done = job_service.transition(
                    session=session,
                    job_id=job.id,
                    to=JobStatus.failed,
                    attempt=job.attempt,
                    from_=RUNNING,
                    conditions=still_stale,
                    message=f"{lost}; no attempts left",
                    error_code=JobErrorCode.worker_lost.value,
                    error_message=f"{lost}; gave up after {counted} attempts",
                )
            else:
                done = job_service.transition(
                    session=session,
                    job_id=job.id,
                    to=JobStatus.queued,
                    attempt=job.attempt,
                    from_=RUNNING,
                    conditions=still_stale,
                    message=f"{lost}; the job goes back to the queue and resumes from its last checkpoint",
                    worker_id=None,
                    enqueued_at=None,
                    not_before=None,
                )
                if done:  # wake the nodes once this commits
                    send_after_commit(session, settings, job.id)
            if done:
                changed.append(job.id)
    return changed


def resend_lost_jobs(settings: Settings) -> list[str]:
    """Sends again the jobs waiting for validation that no broker queue holds (Redis restarted or flushed, a
    publish failed, a back-off ended). Returns the ids it sent. Queued jobs need no message: node workers
    find them in the database when they have free GPUs (worker/node.py)."""
    waiting = queued_messages(settings)
    if waiting is None:
        return []
    now = utcnow()
    grace = now - timedelta(seconds=settings.resend_grace_seconds)
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(
            select(Job).where(
                Job.status == JobStatus.validating.value,
                or_(Job.not_before.is_(None), Job.not_before <= now),
                # Just sent (or in a worker's hands between receiving the message and claiming the job).
                or_(Job.enqueued_at.is_(None), and_(Job.enqueued_at < grace)),
            )
        ).all()
        dispatches = []
        for job in jobs:
            if job.id in waiting:
                continue
            why = (
                "the broker no longer held it"
                if job.enqueued_at is not None
                else "it was not in the queue yet"
            )
            dispatches.append(
                send_after_commit(
                    session, settings, job.id, note=f"sent to the queue ({why})", warn_unsent=False
                )
            )
    # Sent as the transaction above committed.
    sent = [dispatch.target_id for dispatch in dispatches if dispatch.sent]
    return sent


def maintain(settings: Settings) -> None:
    """One round: reap, re-send, then deliver due webhooks."""
    reaped = reap_stale_jobs(settings)
    if reaped:
        log.warning("returned jobs with a lost worker to the queue: %s", reaped)
    resent = resend_lost_jobs(settings)
    if resent:
        log.info("sent jobs to the queue: %s", resent)
    deliver_due_webhooks(settings)


def start_maintenance(settings: Settings) -> threading.Event:
    """Runs `maintain` every maintenance interval in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.maintenance_interval_seconds):
            try:
                maintain(settings)
            except Exception:
                log.warning(
                    "maintenance round failed; next round in %ss",
                    settings.maintenance_interval_seconds,
                    exc_info=True,
                )

    threading.Thread(target=loop, name="tuneforge-maintenance", daemon=True).start()
    return stop
