"""Telling the broker about a job, only once the transaction that made the job ready has committed.

This is the one way anything in Tuneforge enqueues: a service calls `send_after_commit(session, ...)` in the
transaction that changes the job (submitted, validated, handed back for another attempt, found missing from
the broker) and the message leaves when that transaction commits; nothing is sent if it rolls back. The
broker only ever carries "look at job X": a message that cannot be sent loses nothing, since the sweeper
(worker/maintenance.py) re-sends every waiting job that no queue holds.

After the send, a short transaction of its own records when the job was sent (`enqueued_at`, which the
sweeper reads) or, when the broker did not take it, an event saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import Job, utcnow
from shared.queue import PLAN_TASK, TRAIN_TASK, VALIDATE_TASK, enqueue, train_queue, validate_queue
from shared.services.jobs import add_event
from shared.settings import Settings
from shared.states import JobStatus

log = logging.getLogger(__name__)
OUTBOX = "tuneforge.outbox"


@dataclass
class Dispatch:
    """One message waiting for its transaction to commit; `sent` says how it went once it has."""

    settings: Settings
    kind: str  # job | plan
    target_id: str
    note: str | None = None  # an event recorded on the job once the message is sent
    # An event when the broker does not take the message (the sweeper, which retries every round, says nothing).
    warn_unsent: bool = True
    sent: bool | None = None
    # Known when the job was just created in this transaction: its task, queue and priority (its send time is
    # recorded in that same transaction; nothing is read or written afterwards unless the broker refuses).
    route: tuple[str, str, str] | None = None


def send_after_commit(
    session: Session, settings: Settings, job_id: str, *, note: str | None = None, warn_unsent: bool = True
) -> Dispatch:
    """Sends "look at job `job_id`" once `session` commits, to the queue the job's status then calls for
    (validation for `validating`, the training queue of its GPU count for `queued`; nothing otherwise)."""
    return _hold(session, Dispatch(settings, "job", job_id, note=note, warn_unsent=warn_unsent))


def send_new_job_after_commit(session: Session, settings: Settings, job: Job) -> Dispatch:
    """Sends "validate job X" for a job created in this transaction, once it commits. The send time is written
    with the job (the sweeper leaves a job it believes sent alone for resend_grace_seconds), and put back to
    none if the broker refuses, so that the sweeper sends the job at its next round. A send time given to
    create_job (before the job's insert) is kept: setting it now would cost an update of the new row."""
    route = _route(settings, job)
    assert route is not None, "a new job waits for validation"
    if job.enqueued_at is None:
        job.enqueued_at = utcnow()
    return _hold(session, Dispatch(settings, "job", job.id, route=(*route, job.priority)))


def send_plan_after_commit(session: Session, settings: Settings, plan_id: str) -> Dispatch:
    """Sends "make plan `plan_id`" once `session` commits (to the validation queue, ahead of jobs)."""
    return _hold(session, Dispatch(settings, "plan", plan_id))


def _hold(session: Session, dispatch: Dispatch) -> Dispatch:
    session.info.setdefault(OUTBOX, []).append(dispatch)
    return dispatch


def _route(settings: Settings, job: Job) -> tuple[str, str] | None:
    if job.status == JobStatus.validating:
        return VALIDATE_TASK, validate_queue(settings)
    if job.status == JobStatus.queued:
        # A nudge to the nodes that could hold the job (any node can drive a Ray job); the claim decides.
        return TRAIN_TASK, train_queue(settings, job.gpus if job.nodes == 1 else 1)
    return None


def _send_new_job(dispatch: Dispatch) -> None:
    settings = dispatch.settings
    assert dispatch.route is not None
    task, queue, priority = dispatch.route
    dispatch.sent = enqueue(settings, task, dispatch.target_id, queue, priority)
    if dispatch.sent:
        return
    with session_scope(settings.database_url) as session:
        job = session.get(Job, dispatch.target_id)
        if job is not None:
            job.enqueued_at = None
            add_event(
                session=session,
                job_id=job.id,
                type="queue",
                level="warning",
                message="the broker did not take the job; it will be re-sent when the broker is back",
            )


def _send_job(dispatch: Dispatch) -> None:
    settings = dispatch.settings
    if dispatch.route is not None:
        _send_new_job(dispatch)
        return
    with session_scope(settings.database_url) as session:
        job = session.get(Job, dispatch.target_id)
        route = _route(settings, job) if job is not None else None
        if job is None or route is None:  # moved on before the message left (cancelled, claimed)
            dispatch.sent = False
            return
        task, queue = route
        dispatch.sent = enqueue(settings, task, job.id, queue, job.priority)
        if dispatch.sent:
            job.enqueued_at = utcnow()
            if dispatch.note:
                add_event(
                    session=session, job_id=job.id, type="queue", message=dispatch.note, attempt=job.attempt
                )
        elif dispatch.warn_unsent:
            add_event(
                session=session,
                job_id=job.id,
                type="queue",
                level="warning",
                message="the broker did not take the job; it will be re-sent when the broker is back",
                attempt=job.attempt,
            )


def _send_outbox(session: Session) -> None:
    for dispatch in session.info.pop(OUTBOX, []):
        try:
            if dispatch.kind == "plan":
                dispatch.sent = enqueue(
                    dispatch.settings,
                    PLAN_TASK,
                    dispatch.target_id,
                    validate_queue(dispatch.settings),
                    "high",
                )
            else:
                _send_job(dispatch)
        except Exception:  # the job is committed; the sweeper sends it if this did not
            dispatch.sent = False
            log.warning(
                "could not send %s %s to the broker", dispatch.kind, dispatch.target_id, exc_info=True
            )


def _drop_outbox(session: Session) -> None:
    session.info.pop(OUTBOX, None)


event.listen(Session, "after_commit", _send_outbox)
event.listen(Session, "after_rollback", _drop_outbox)
