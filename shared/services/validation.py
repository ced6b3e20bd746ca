"""Recording what validation (worker/validation.py) finds, in short transactions of their own: the job's row
is locked only for each state change, never while datasets are read or the plan is made.

A validation run holds a lease on the job (`not_before`): while it runs, the sweeper does not send the job
again and a second delivery of its message leaves it alone. Each run counts as a try; one that breaks
unexpectedly (or whose worker dies) waits a growing back-off before the next, and past
`max_validation_tries` the job fails with `internal_error` instead of being re-sent forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.datasets import DatasetSummary
from shared.errors import JobErrorCode
from shared.models import Job, utcnow
from shared.schemas import JobSpec
from shared.services.dispatch import send_after_commit
from shared.services.jobs import add_event, transition
from shared.settings import Settings
from shared.states import JobStatus

VALIDATING = frozenset({JobStatus.validating})


@dataclass(frozen=True)
class ValidationTry:
    """A job as one validation run sees it."""

    job_id: str
    team_id: str
    spec: JobSpec
    dataset: str | None
    validation_dataset: str | None
    try_number: int


def begin_validation(*, session: Session, settings: Settings, job_id: str) -> ValidationTry | None:
    """Starts a validation try of a `validating` job (taking the lease); None when the job is not waiting for
    validation (done, cancelled, or being validated by another run), or when it ran out of tries (then it is
    failed here)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.validating.value,
            (Job.not_before.is_(None)) | (Job.not_before <= now),
        )
        .values(
            validation_tries=Job.validation_tries + 1,
            not_before=now + timedelta(seconds=settings.validation_lease_seconds),
        )
        .returning(Job.team_id, Job.spec, Job.dataset_uri, Job.validation_uri, Job.validation_tries)
    ).one_or_none()
    if row is None:
        return None
    team_id, spec, dataset, validation_dataset, tries = row
    if tries > settings.max_validation_tries:
        message = (
            f"validation did not finish after {tries - 1} tries (see the job's events for what broke); "
            "resubmit the job, and tell the operators if it happens again"
        )
        transition(
            session=session,
            job_id=job_id,
            to=JobStatus.failed,
            from_=VALIDATING,
            message=f"validation failed: {message}",
            error_code=JobErrorCode.internal_error.value,
            error_message=message,
        )
        return None
    return ValidationTry(job_id, team_id, JobSpec.model_validate(spec), dataset, validation_dataset, tries)


def reject(*, session: Session, job_id: str, code: JobErrorCode, message: str) -> bool:
    """Fails a job whose inputs or plan cannot work, with what to change."""
    return transition(
        session=session,
        job_id=job_id,
        to=JobStatus.failed,
        from_=VALIDATING,
        message=f"validation failed: {message}",
        error_code=code.value,
        error_message=message,
    )


def broke(*, session: Session, settings: Settings, attempt: ValidationTry, error: str) -> None:
    """Records an unexpected error of a validation try; the next try waits a growing back-off (or the job
    fails with internal_error once it has no tries left)."""
    if attempt.try_number >= settings.max_validation_tries:
        message = (
            f"validation broke {attempt.try_number} times; the last error: {error}. Resubmit the job, and tell "
            "the operators if it happens again"
        )
        reject(session=session, job_id=attempt.job_id, code=JobErrorCode.internal_error, message=message)
        return
    delay = settings.retry_backoff_seconds * 2 ** (attempt.try_number - 1)
    session.execute(
        update(Job)
        .where(Job.id == attempt.job_id, Job.status == JobStatus.validating.value)
        .values(not_before=utcnow() + timedelta(seconds=delay))
    )
    add_event(
        session=session,
        job_id=attempt.job_id,
        type="validation",
        level="warning",
        message=f"validation try {attempt.try_number} of {settings.max_validation_tries} broke ({error}); "
        f"trying again in {delay:.0f}s",
        data={"try": attempt.try_number, "error": error},
    )


def accept(
    *,
    session: Session,
    settings: Settings,
    job_id: str,
    spec: JobSpec,
    digests: dict[str, str],
    datasets: dict[str, DatasetSummary],
    plan: dict[str, Any] | None,
    dataset_uris: dict[str, str] | None = None,
) -> JobStatus:
    """Queues a job that passed its checks, with the spec fitted to its model, its datasets' sha256 and its
    plan; it is sent to a training queue once this commits. Returns its status (another run may have
    settled it first)."""
    # Locked only for this state change: a second run that finished first has settled the job already.
    status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    if status != JobStatus.validating:
        return JobStatus(status)
    for param, summary in datasets.items():
        add_event(
            session=session,
            job_id=job_id,
            type="dataset",
            message=f"{param}: {summary.num_samples} valid samples in {summary.format.value} format",
            data={"param": param, "format": summary.format.value, "samples": summary.num_samples},
        )
    values: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "input_digests": digests,
        "base_model": spec.base_model,
    }
    # Hub datasets, like Hub models, are recorded at the commit validation read.
    for param, column in (("dataset", "dataset_uri"), ("validation_dataset", "validation_uri")):
        if (dataset_uris or {}).get(param):
            values[column] = dataset_uris[param]
    submitted = session.scalar(select(Job.base_model).where(Job.id == job_id))
    if spec.base_model != submitted:
        # A Hub revision (a branch or tag) is pinned to the commit it named when checked: every attempt, and
        # any job that reruns this one, trains on the same weights.
        add_event(
            session=session,
            job_id=job_id,
            type="model",
            message=f"base model {submitted} is pinned to {spec.base_model}",
            data={"submitted": submitted, "pinned": spec.base_model},
        )
    if plan is not None:
        values["plan"] = plan
        memory = (plan.get("memory") or {}).get("total")
        params = (
            f"{plan['params']['trainable']:,} trainable parameters" if plan.get("params") else "no parameters"
        )
        add_event(
            session=session,
            job_id=job_id,
            type="plan",
            message="plan: " + params + (f", about {memory / 2**30:.2f} GiB per GPU" if memory else ""),
            data={"notes": [n["message"] for n in plan.get("notes", [])]},
        )
    transition(
        session=session,
        job_id=job_id,
        to=JobStatus.queued,
        from_=VALIDATING,
        message="job is queued",
        not_before=None,
        enqueued_at=None,
        **values,
    )
    send_after_commit(session, settings, job_id)
    return JobStatus.queued
