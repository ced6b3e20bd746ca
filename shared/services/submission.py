"""Submitting a job: replay an earlier answer for a retried Idempotency-Key, or check and record the job,
store the answer, commit, and send it to the broker once that commit is done. Every surface (the native
API, its export route, the OpenAI-compatible one) submits through here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from shared.models import Job, utcnow
from shared.schemas import AdapterSource, ExportSpec, JobSpec, Method
from shared.services.dispatch import send_new_job_after_commit
from shared.services.idempotency import IdempotentCall, Replay, complete_claimed
from shared.services.jobs import create_job, get_job
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.tenancy import TeamID

CREATED = 201


def submit_job(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    spec: JobSpec,
    idempotency: IdempotentCall,
    answer: Callable[[Job], dict[str, Any]],
) -> Job | Replay:
    """Creates a job in `validating` and commits it with its Idempotency-Key and answer (`answer(job)`, replayed
    to retries with the same key) in one transaction; it is sent for validation after the commit. Returns the
    job, or the first request's stored answer."""
    try:
        # The key is claimed in the transaction that records the job: one commit makes both, or neither.
        claimed = idempotency.claim(session)
        if isinstance(claimed, Replay):
            session.rollback()
            return claimed
        # Sent after the commit: the send time is written with the job (see send_new_job_after_commit).
        job = create_job(
            session=session, settings=settings, store=store, team_id=team_id, spec=spec, enqueued_at=utcnow()
        )
        if claimed is not None:
            complete_claimed(session=session, key_id=claimed, status_code=CREATED, body=answer(job))
        send_new_job_after_commit(session, settings, job)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return job


def submit_export(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    source_job_id: str,
    options: dict[str, Any],
    idempotency: IdempotentCall,
    answer: Callable[[Job], dict[str, Any]],
) -> Job | Replay:
    """Submits an export job that merges a finished job's adapter into its base model; `options` holds
    dtype, max_shard_size, priority and metadata. 404 unless the source is the team's job."""
    get_job(session=session, team_id=team_id, job_id=source_job_id)
    spec = JobSpec(
        method=Method.export,
        export=ExportSpec(
            source=AdapterSource(job_id=source_job_id),
            dtype=options["dtype"],
            max_shard_size=options["max_shard_size"],
        ),
        priority=options["priority"],
        metadata=options["metadata"],
    )
    return submit_job(
        session=session,
        settings=settings,
        store=store,
        team_id=team_id,
        spec=spec,
        idempotency=idempotency,
        answer=answer,
    )


def submit_fine_tuning_job(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    spec: JobSpec,
    idempotency: IdempotentCall,
    answer: Callable[[Job], dict[str, Any]],
) -> tuple[Job, bool]:
    """Submits a job from the OpenAI-compatible surface; returns the job and whether it was a replay (the
    stored answer names the job, which is read again so the replay shows its current state)."""
    submitted = submit_job(
        session=session,
        settings=settings,
        store=store,
        team_id=team_id,
        spec=spec,
        idempotency=idempotency,
        answer=answer,
    )
    if isinstance(submitted, Replay):
        return get_job(session=session, team_id=team_id, job_id=submitted.body["id"]), True
    return submitted, False
