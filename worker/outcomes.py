"""What an attempt's end means for its job: the next status decided from how the training process ended
(succeeded, failed with a code, cancelled, out of memory, stopped to checkpoint, crashed, lost, past its
time limit), within the job's retry budget. Every move is written through the attempt's fenced writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from shared.errors import JobErrorCode
from shared.models import Job, utcnow
from shared.schemas import JobSpec
from shared.services import jobs as job_service
from shared.services.dispatch import send_after_commit
from shared.states import ACTIVE, JobStatus
from worker.reporting import AttemptWriter
from worker.supervisor import Outcome

# Failures that another attempt may not meet: they use the retry budget instead of failing the job.
RETRYABLE = frozenset({JobErrorCode.storage_error, JobErrorCode.storage_unavailable})


@dataclass(frozen=True)
class TryAgain:
    """Run the same attempt again with this spec (out of memory: half the micro-batch)."""

    spec: JobSpec


def fail_or_retry(writer: AttemptWriter, code: JobErrorCode, message: str) -> JobStatus:
    """Fails the job with `code`, unless that failure is worth another attempt (RETRYABLE)."""
    if code in RETRYABLE:
        return retry_or_fail(writer, code, message)
    return fail(writer, code, message)


def fail(writer: AttemptWriter, code: JobErrorCode, message: str) -> JobStatus:
    """Fails the job with `code` and a message the user can act on."""
    writer.move(JobStatus.failed, f"job failed: {message}", error_code=code.value, error_message=message)
    return JobStatus.failed


def requeue(writer: AttemptWriter, message: str, *, delay: float = 0.0) -> JobStatus:
    """Gives the job back to the queue for another attempt (after `delay` seconds). A delayed retry is sent
    by the sweeper once its back-off ends; an immediate one leaves for the broker when the move commits.
    A job the user asked to pause is `paused` instead: it waits, unclaimed, until it is resumed."""
    not_before = utcnow() + timedelta(seconds=delay) if delay > 0 else None

    def hand_back(session: Session) -> JobStatus | None:
        if job_service.transition(
            session=session,
            job_id=writer.job_id,
            to=JobStatus.paused,
            attempt=writer.attempt,
            from_=frozenset({JobStatus.pausing}),
            message=f"job paused ({message}); resume it to continue from its latest checkpoint",
            enqueued_at=None,
            worker_id=None,
        ):
            return JobStatus.paused
        moved = job_service.transition(
            session=session,
            job_id=writer.job_id,
            to=JobStatus.queued,
            attempt=writer.attempt,
            from_=ACTIVE,
            message=message,
            not_before=not_before,
            enqueued_at=None,
            worker_id=None,
        )
        if moved and delay <= 0:
            send_after_commit(session, writer.settings, writer.job_id)
        return JobStatus.queued if moved else None

    return writer.write(hand_back, "the move to queued") or JobStatus.queued


def retry_or_fail(writer: AttemptWriter, code: JobErrorCode, reason: str) -> JobStatus:
    """Applies the retry budget: another attempt after a growing back-off, or failure with the reason."""
    settings = writer.settings
    # Attempts that ended in a pause are not failures: they do not use the budget.
    attempt = (
        writer.write(
            lambda session: job_service.attempts_counted(
                session=session, job_id=writer.job_id, attempt=writer.attempt
            ),
            "the attempts counted",
        )
        or writer.attempt
    )
    if attempt >= settings.max_attempts:
        return fail(writer, code, f"{reason}; gave up after {attempt} attempts")
    delay = settings.retry_backoff_seconds * (2 ** (attempt - 1))
    return requeue(
        writer,
        f"attempt {attempt} failed ({reason}); attempt {attempt + 1} of {settings.max_attempts} in {delay:.0f}s",
        delay=delay,
    )


def halve_micro_batch(writer: AttemptWriter, spec: JobSpec) -> JobSpec | None:
    """Records the spec with half the micro-batch and twice the accumulation (the same effective batch), with
    an `out_of_memory` event; None at micro-batch 1 (or when the attempt lost the job)."""
    hp = spec.hyperparameters
    if hp is None or hp.batch_size <= 1:
        return None
    new_hp = hp.model_copy(
        update={
            "batch_size": hp.batch_size // 2,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps * 2,
        }
    )
    new_spec = spec.model_copy(update={"hyperparameters": new_hp})

    def record(session: Session) -> JobSpec:
        job = session.get(Job, writer.job_id)
        assert job is not None
        job.spec = new_spec.model_dump(mode="json")
        job_service.add_event(
            session=session,
            job_id=writer.job_id,
            type="out_of_memory",
            level="warning",
            message=f"out of memory at micro-batch {hp.batch_size}; retrying with micro-batch "
            f"{new_hp.batch_size} and gradient accumulation {new_hp.gradient_accumulation_steps} "
            "(the same effective batch)",
            attempt=writer.attempt,
            data={
                "batch_size": new_hp.batch_size,
                "gradient_accumulation_steps": new_hp.gradient_accumulation_steps,
            },
        )
        return new_spec

    return writer.write(record, "the halved micro-batch")


def settle(
    outcome: Outcome,
    *,
    writer: AttemptWriter,
    spec: JobSpec,
    limit_minutes: float,
    finish: Callable[[], JobStatus | None],
) -> JobStatus | TryAgain | None:
    """The job's next status after the training process ended with `outcome` (None: this attempt lost the
    job and wrote nothing), or TryAgain with a smaller micro-batch. `finish` stores a successful result."""
    kind = outcome.kind
    if kind == "ok":
        return finish()
    if kind == "failed":
        failure = json.loads(outcome.detail)
        return fail_or_retry(writer, JobErrorCode(failure["code"]), failure["message"])
    if kind == "cancelled":
        writer.move(JobStatus.cancelled, "training stopped; job cancelled")
        return JobStatus.cancelled
    if kind == "lost":
        return None
    if kind == "timeout":
        return fail(
            writer,
            JobErrorCode.timeout,
            f"the job ran longer than its limit of {limit_minutes:.0f} minutes; raise resources.max_runtime_minutes "
            "or train fewer steps",
        )
    if kind == "stopped":
        return requeue(
            writer, f"attempt {writer.attempt} checkpointed and stopped ({outcome.detail or 'shutdown'})"
        )
    if kind == "oom":
        if spec.hyperparameters is None:
            return fail(
                writer,
                JobErrorCode.out_of_memory,
                f"out of memory while running {spec.method.value}; it needs a worker with more memory",
            )
        smaller = halve_micro_batch(writer, spec)
        if smaller is None:
            return fail(
                writer,
                JobErrorCode.out_of_memory,
                "out of GPU memory even at micro-batch 1; lower max_seq_length, use qlora, more GPUs or a ZeRO stage",
            )
        return TryAgain(smaller)
    return retry_or_fail(
        writer,
        JobErrorCode.internal_error,
        f"the training process crashed (exit code {outcome.code}): {outcome.detail[-1500:]}",
    )
