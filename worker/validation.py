"""Checks a submitted job's inputs on a worker before the job waits for a GPU."""

from __future__ import annotations

import logging

from shared.datasets import DatasetInvalid, read_dataset
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job
from shared.queue import enqueue_job
from shared.schemas import JobSpec, job_sources
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import make_store
from worker.assets import AssetCache

log = logging.getLogger(__name__)


def validate_job(settings: Settings, job_id: str) -> JobStatus | None:
    """Checks a `validating` job's inputs (datasets line by line, source adapters, base model); queues the
    job or fails it with what is at fault. Returns the job's new status (None if it was not validating)."""
    cache = AssetCache(settings, make_store(settings))
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.validating:
            log.info("job %s is not validating (%s); nothing to do", job_id, job and job.status)
            return None
        datasets = [
            (p, uri)
            for p, uri in (("dataset", job.dataset_uri), ("validation_dataset", job.validation_uri))
            if uri
        ]
        spec = JobSpec.model_validate(job.spec)
        try:
            summaries = {}
            for param, uri in datasets:
                path = cache.dataset_file(uri, session=session, team_id=job.team_id, param=param)
                try:
                    summaries[param] = read_dataset(path)
                except DatasetInvalid as exc:
                    raise JobFailure(JobErrorCode.invalid_dataset, f"{param}: {exc}") from exc
                except UnicodeDecodeError as exc:
                    raise JobFailure(
                        JobErrorCode.invalid_dataset, f"{param}: the file is not UTF-8 text"
                    ) from exc
            for source in job_sources(spec):
                cache.adapter_dir(source, session=session, team_id=job.team_id)
            cache.model_dir(job.base_model)
        except JobFailure as failure:
            job_service.transition(
                session=session,
                job_id=job_id,
                to=JobStatus.failed,
                message=f"validation failed: {failure.message}",
                error_code=failure.code.value,
                error_message=failure.message,
            )
            return JobStatus.failed
        for param, summary in summaries.items():
            job_service.add_event(
                session=session,
                job_id=job_id,
                type="dataset",
                message=f"{param}: {summary.num_samples} valid samples in {summary.format.value} format",
                data={"param": param, "format": summary.format.value, "samples": summary.num_samples},
            )
        if not job_service.transition(
            session=session, job_id=job_id, to=JobStatus.queued, message="job is queued", enqueued_at=None
        ):
            return JobStatus(session.get(Job, job_id).status)
    # Enqueue only after the commit that queued it; if the broker is away, the sweeper sends it later.
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is not None:
            enqueue_job(settings, session, job)
    return JobStatus.queued
