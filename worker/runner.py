"""Runs one attempt of a job: claim it, keep its lease, fetch its inputs, supervise its training process
group, and settle the job from how that ended.

The steps live in their own modules: the claim in shared/services/claims.py, the lease in worker/lease.py,
the inputs in worker/inputs.py, the process group in worker/supervisor.py, the decision in
worker/outcomes.py, the upload of the result in worker/results.py, and every write in the attempt's fenced
writer (worker/reporting.py): a worker that lost its job (its lease expired and another took over) cannot
overwrite it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.logs import job_context
from shared.models import Job
from shared.schemas import JobSpec
from shared.services import claims
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import ACTIVE, JobStatus
from shared.storage import StorageError
from worker import outcomes
from worker.assets import storage_code
from worker.checkpoints import fetch_latest_checkpoint
from worker.inputs import fetch_inputs
from worker.lease import Lease
from worker.logs import LogShipper
from worker.reporting import AttemptWriter, patient_store
from worker.results import store_result
from worker.supervisor import LOG_FILE, SHUTDOWN, supervise
from worker.warm import WarmRuntime, runtime_for

log = logging.getLogger(__name__)

__all__ = ["SHUTDOWN", "run_attempt", "run_job"]


def run_job(settings: Settings, job_id: str) -> JobStatus | None:
    """Claims one given queued job and runs an attempt of it here, on its own (the node worker claims through
    worker/node.py instead); returns the job's status after this attempt, or None if it was not this worker's
    to run (or the attempt lost it)."""
    with session_scope(settings.database_url) as session:
        attempt = claims.claim_job(
            session=session,
            job_id=job_id,
            worker_id=settings.worker_id,
            lease_timeout=settings.lease_timeout_seconds,
            settings=settings,
        )
    if attempt is None:
        log.info(
            "job %s is not claimable (running elsewhere, waiting for a retry, finished or cancelled)", job_id
        )
        return None
    lease = Lease(settings, job_id, attempt)
    with lease.keep():
        return run_attempt(settings, lease, warm=runtime_for(settings))


def run_attempt(
    settings: Settings, lease: Lease, devices: Sequence[str] = (), warm: WarmRuntime | None = None
) -> JobStatus | None:
    """Runs a claimed attempt to its end on `devices` (the GPUs it holds), whose lease someone keeps, its
    processes forked from `warm` when given; returns the job's status after it (None: the attempt lost the
    job)."""
    job_id, attempt = lease.job_id, lease.attempt
    writer = AttemptWriter(settings, job_id, attempt)
    work_dir = Path(tempfile.mkdtemp(prefix=f"tuneforge-{job_id}-"))
    started = time.monotonic()
    try:
        with job_context(job_id, attempt):
            log.info("job %s attempt %d started", job_id, attempt)
            return _run_attempt(settings, writer, lease, work_dir, started, devices, warm)
    except Exception as exc:
        log.exception("job %s attempt %d broke", job_id, attempt)
        return outcomes.retry_or_fail(
            writer, JobErrorCode.internal_error, f"the worker failed: {type(exc).__name__}: {exc}"
        )
    finally:
        _add_runtime(writer, time.monotonic() - started)
        shutil.rmtree(work_dir, ignore_errors=True)
        _never_left_running(writer)


def _run_attempt(
    settings: Settings,
    writer: AttemptWriter,
    lease: Lease,
    work_dir: Path,
    started: float,
    devices: Sequence[str],
    warm: WarmRuntime | None,
) -> JobStatus | None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, writer.job_id)
        assert job is not None
        session.expunge(job)
    spec = JobSpec.model_validate(job.spec)
    store = patient_store(settings, writer)
    try:
        launch = fetch_inputs(settings, store, job, spec, writer.attempt, work_dir)
    except JobFailure as failure:
        return outcomes.fail_or_retry(writer, failure.code, failure.message)
    except StorageError as exc:
        return outcomes.retry_or_fail(writer, storage_code(exc), f"object storage failed: {exc}")
    forked = warm is not None and spec.resources.nodes == 1
    writer.event(
        "worker",
        f"running {spec.method.value} on {settings.worker_id}"
        + (" (forked from the warm training runtime)" if forked else " (fresh training processes)"),
        data={"worker": settings.worker_id, "warm": forked},
    )
    limit_minutes = spec.resources.max_runtime_minutes or settings.default_max_runtime_minutes

    def finish() -> JobStatus | None:
        try:
            return store_result(writer, store, job.team_id, work_dir)
        except StorageError as exc:
            return outcomes.retry_or_fail(writer, storage_code(exc), f"could not store the result: {exc}")

    # The training output, shipped while it runs (tail and follow) and stored when the attempt ends.
    shipper = LogShipper(
        writer,
        work_dir / LOG_FILE,
        max_bytes=settings.log_max_bytes,
        interval=settings.log_ship_interval_seconds,
    ).start()
    try:
        while True:
            launch.write(work_dir)
            outcome = supervise(
                settings=settings,
                spec=spec,
                work_dir=work_dir,
                lease=lease,
                writer=writer,
                seconds_left=60 * limit_minutes - job.runtime_seconds - (time.monotonic() - started),
                devices=devices,
                warm=warm,
            )
            log.info(
                "job %s attempt %d: training process ended: %s", writer.job_id, writer.attempt, outcome.kind
            )
            if outcome.kind == "lost":
                log.warning(
                    "job %s attempt %d lost its lease; stopped without writing", writer.job_id, writer.attempt
                )
            settled = outcomes.settle(
                outcome, writer=writer, spec=spec, limit_minutes=limit_minutes, finish=finish
            )
            if not isinstance(settled, outcomes.TryAgain):
                return settled
            # Out of memory: the inputs are fetched already; only the spec and the checkpoint to resume from change.
            spec = settled.spec
            try:
                resume_from = fetch_latest_checkpoint(settings, store, writer.job_id, work_dir)
            except StorageError as exc:
                return outcomes.retry_or_fail(writer, storage_code(exc), f"object storage failed: {exc}")
            launch.spec = spec.model_dump(mode="json")
            launch.resume_from = str(resume_from) if resume_from else None
    finally:
        shipper.finish(job.team_id)


def _add_runtime(writer: AttemptWriter, seconds: float) -> None:
    """Adds this attempt's run time to the job's total (the run-time limit counts every attempt)."""

    def add(session: Session) -> None:
        job = session.get(Job, writer.job_id)
        assert job is not None
        job.runtime_seconds = (job.runtime_seconds or 0.0) + seconds

    try:
        writer.write(add, "the run time", retry_for=5)
    except Exception:
        log.exception("could not record the run time of job %s", writer.job_id)


def _never_left_running(writer: AttemptWriter) -> None:
    """Fails (or, when it was being cancelled, cancels; being paused, pauses) the job if it is still marked as
    running by this attempt once the worker is done with it."""

    def settle(session: Session) -> None:
        status = session.get(Job, writer.job_id).status
        if status not in ACTIVE:
            return
        if status == JobStatus.pausing:  # it resumes from its latest checkpoint
            job_service.transition(
                session=session,
                job_id=writer.job_id,
                to=JobStatus.paused,
                attempt=writer.attempt,
                from_=frozenset({JobStatus.pausing}),
                message="the worker stopped before the pause's checkpoint; the job is paused at its latest one",
                worker_id=None,
            )
            return
        cancelled = status == JobStatus.cancelling
        job_service.transition(
            session=session,
            job_id=writer.job_id,
            to=JobStatus.cancelled if cancelled else JobStatus.failed,
            attempt=writer.attempt,
            from_=frozenset({JobStatus(status)}),
            message="the worker stopped without finishing the job",
            error_code=None if cancelled else JobErrorCode.internal_error.value,
            error_message=None if cancelled else "the worker stopped unexpectedly; resubmit",
        )

    try:
        writer.write(settle, "the final status", retry_for=5)
    except Exception:
        log.exception("could not settle job %s after attempt %d", writer.job_id, writer.attempt)
