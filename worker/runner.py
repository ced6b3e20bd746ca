"""Runs one attempt of a training job: claim it, keep its lease alive, train, upload, finish.

Every write a worker makes is fenced by the attempt number it claimed, so a worker that lost its job
(its lease expired and another worker took over) cannot overwrite the job's state.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select

from shared.datasets import DatasetInvalid, read_dataset
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job
from shared.schemas import JobSpec, job_sources
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import StorageError, make_store
from worker.assets import AssetCache
from worker.training.recipes import recipe_for
from worker.training.recipes.base import JobStopped, TrainingContext

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another attempt owns the job now; this one must stop writing."""


class Lease:
    """Heartbeats a claimed attempt from a background thread and notices cancellation or a lost lease."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        with session_scope(self.settings.database_url) as session:
            status = job_service.heartbeat(session=session, job_id=self.job_id, attempt=self.attempt)
        if status is None:
            self.lost.set()
        elif status is JobStatus.cancelling:
            self.cancel_requested.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_seconds):
            try:
                self.beat()
            except Exception:  # the database may be restarting; the lease has slack for that
                log.warning("heartbeat for job %s failed; retrying", self.job_id, exc_info=True)

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set()


class DatabaseReporter:
    """Writes a recipe's events and metrics to the database, for this attempt only."""

    def __init__(self, settings: Settings, job_id: str, attempt: int, lease: Lease) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.lease = lease

    def _owns_job(self, session: Any) -> bool:
        owner = session.scalar(select(Job.attempt).where(Job.id == self.job_id))
        if owner != self.attempt:
            self.lease.lost.set()
            return False
        return True

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        with session_scope(self.settings.database_url) as session:
            if self._owns_job(session):
                job_service.add_event(
                    session=session,
                    job_id=self.job_id,
                    type=type,
                    message=message,
                    level=level,
                    attempt=self.attempt,
                    data=data,
                )

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                if self._owns_job(session):
                    job_service.record_metric(
                        session=session,
                        job_id=self.job_id,
                        attempt=self.attempt,
                        split=split,
                        step=step,
                        values=values,
                    )
        except Exception:
            log.warning(
                "could not record %s metrics of job %s at step %d", split, self.job_id, step, exc_info=True
            )


def _fail(settings: Settings, job_id: str, attempt: int, code: JobErrorCode, message: str) -> None:
    with session_scope(settings.database_url) as session:
        job_service.transition(
            session=session,
            job_id=job_id,
            to=JobStatus.failed,
            attempt=attempt,
            message=f"job failed: {message}",
            error_code=code.value,
            error_message=message,
        )


def run_job(settings: Settings, job_id: str) -> JobStatus | None:
    """Claims and trains a queued job; returns its final status, or None if it was not this worker's."""
    with session_scope(settings.database_url) as session:
        attempt = job_service.claim_job(
            session=session,
            job_id=job_id,
            worker_id=settings.worker_id,
            lease_timeout=settings.lease_timeout_seconds,
        )
    if attempt is None:
        log.info("job %s is not claimable (already running elsewhere, finished or cancelled)", job_id)
        return None
    log.info("job %s attempt %d started", job_id, attempt)
    work_dir = Path(tempfile.mkdtemp(prefix=f"tuneforge-{job_id}-"))
    try:
        with Lease(settings, job_id, attempt) as lease:
            return _train(settings, job_id, attempt, lease, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _never_left_running(settings, job_id, attempt)


def _never_left_running(settings: Settings, job_id: str, attempt: int) -> None:
    """Fails the attempt if it is still marked running once its training code has returned."""
    try:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            if (
                job is not None
                and job.attempt == attempt
                and job.status in (JobStatus.running, JobStatus.cancelling)
            ):
                to = JobStatus.cancelled if job.status == JobStatus.cancelling else JobStatus.failed
                job_service.transition(
                    session=session,
                    job_id=job_id,
                    to=to,
                    attempt=attempt,
                    message="the worker stopped without finishing the job",
                    error_code=None if to is JobStatus.cancelled else JobErrorCode.internal_error.value,
                    error_message=None
                    if to is JobStatus.cancelled
                    else "the worker stopped unexpectedly; resubmit",
                )
    except Exception:
        log.exception("could not settle job %s after attempt %d", job_id, attempt)


def _train(settings: Settings, job_id: str, attempt: int, lease: Lease, work_dir: Path) -> JobStatus | None:
    store = make_store(settings)
    cache = AssetCache(settings, store)
    reporter = DatabaseReporter(settings, job_id, attempt, lease)
    try:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            spec = JobSpec.model_validate(job.spec)
            team_id = job.team_id
            paths = {
                param: cache.dataset_file(uri, session=session, team_id=team_id, param=param)
                for param, uri in (("dataset", job.dataset_uri), ("validation_dataset", job.validation_uri))
                if uri
            }
            sources = [
                cache.adapter_dir(source, session=session, team_id=team_id) for source in job_sources(spec)
            ]
        try:
            data = {param: read_dataset(path) for param, path in paths.items()}
        except DatasetInvalid as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, str(exc)) from exc
        assert spec.base_model is not None  # the service fills it in for merge and export jobs
        model_dir = cache.model_dir(spec.base_model)
        reporter.event("worker", f"running {spec.method.value} on {settings.worker_id}")
        ctx = TrainingContext(
            job_id=job_id,
            spec=spec,
            model_dir=model_dir,
            work_dir=work_dir,
            reporter=reporter,
            should_stop=lease.should_stop,
            train_data=data.get("dataset"),
            eval_data=data.get("validation_dataset"),
            sources=sources,
        )
        recipe = recipe_for(spec.method)(ctx)
        result = recipe.run()
        if lease.should_stop() or result.stopped:
            raise JobStopped()
        kind = recipe.artifact_kind
        stored = store.put_tree(f"artifacts/{team_id}/{job_id}/attempt-{attempt}/{kind}", result.output_dir)
        names = [
            p.relative_to(result.output_dir).as_posix()
            for p in sorted(result.output_dir.rglob("*"))
            if p.is_file()
        ]
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.attempt != attempt:
                raise LeaseLost()
            job_service.record_artifacts(
                session=session, job=job, kind=kind, stored=zip(names, stored, strict=True)
            )
            done = job_service.transition(
                session=session,
                job_id=job_id,
                to=JobStatus.succeeded,
                attempt=attempt,
                message=f"job succeeded after {result.metrics.get('steps')} steps",
                trainable_params=result.trainable_params,
                total_params=result.total_params,
                trained_tokens=result.trained_tokens,
                result=result.metrics,
            )
            if not done:
                # Cancelled (or taken over) while uploading: keep nothing of this attempt.
                session.rollback()
                raise JobStopped()
        return JobStatus.succeeded
    except JobStopped:
        if lease.lost.is_set():
            log.warning("job %s attempt %d lost its lease; stopping without writing", job_id, attempt)
            return None
        with session_scope(settings.database_url) as session:
            job_service.transition(
                session=session,
                job_id=job_id,
                to=JobStatus.cancelled,
                attempt=attempt,
                message="training stopped; job cancelled",
            )
        return JobStatus.cancelled
    except LeaseLost:
        log.warning("job %s attempt %d lost its lease before finishing", job_id, attempt)
        return None
    except JobFailure as failure:
        _fail(settings, job_id, attempt, failure.code, failure.message)
        return JobStatus.failed
    except StorageError as exc:
        _fail(settings, job_id, attempt, JobErrorCode.storage_error, f"object storage failed: {exc}")
        return JobStatus.failed
    except Exception as exc:
        log.exception("job %s attempt %d crashed", job_id, attempt)
        _fail(
            settings,
            job_id,
            attempt,
            JobErrorCode.internal_error,
            f"training crashed ({type(exc).__name__}: {exc}); the worker log has the traceback",
        )
        return JobStatus.failed
