"""Checks a submitted job on a worker before it waits for a GPU: its datasets line by line, its source
adapters, its base model, and the plan (parameter counts, dataset statistics, the memory estimate). A dry
run (a `plans` row) gets the same checks without a job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.datasets import DatasetInvalid, DatasetSummary, read_dataset
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job, Plan
from shared.planning import fit_to_model
from shared.schemas import JobSpec, job_sources
from shared.services import jobs as job_service
from shared.services.dispatch import send_after_commit
from shared.services.plans import finish_plan
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import make_store, sha256_file
from worker.assets import AssetCache

log = logging.getLogger(__name__)
VALIDATING = frozenset({JobStatus.validating})


@dataclass
class Inputs:
    """A job's inputs, fetched and checked."""

    datasets: dict[str, DatasetSummary]
    model_dir: Path
    # sha256 of each dataset file as read here; the runner trains only on the same content.
    digests: dict[str, str]


def check_inputs(
    cache: AssetCache,
    session: Session,
    *,
    team_id: str,
    spec: JobSpec,
    dataset: str | None,
    validation_dataset: str | None,
) -> Inputs:
    """Fetches and checks a job's datasets, source adapters and base model; raises JobFailure naming what
    is wrong (with line numbers for datasets)."""
    summaries, digests = {}, {}
    for param, uri in (("dataset", dataset), ("validation_dataset", validation_dataset)):
        if not uri:
            continue
        path = cache.dataset_file(uri, session=session, team_id=team_id, param=param)
        digests[param] = sha256_file(path)
        try:
            summaries[param] = read_dataset(path)
        except DatasetInvalid as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, f"{param}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, f"{param}: the file is not UTF-8 text") from exc
    for source in job_sources(spec):
        cache.adapter_dir(source, session=session, team_id=team_id)
    assert spec.base_model is not None
    return Inputs(summaries, cache.model_dir(spec.base_model), digests)


def fitted(spec: JobSpec, inputs: Inputs) -> JobSpec:
    """The spec with the defaults that depend on the base model filled in (as the API does when it can
    read the model's config)."""
    from worker.planning import model_shape

    if spec.hyperparameters is None:
        return spec
    return fit_to_model(spec, model_shape(inputs.model_dir))


def plan_for(settings: Settings, spec: JobSpec, inputs: Inputs) -> dict[str, Any] | None:
    """The plan of a job that trains (None for merge and export, which have nothing to estimate)."""
    if spec.hyperparameters is None or spec.adapter is None:
        return None
    from worker.planning import make_plan

    return make_plan(
        spec,
        inputs.model_dir,
        inputs.datasets.get("dataset"),
        inputs.datasets.get("validation_dataset"),
        gpu_memory_bytes=int(settings.gpu_memory_gib * 2**30) if settings.gpu_memory_gib else None,
    )


def refusal_message(plan: dict[str, Any]) -> str:
    return "; ".join(f"{r['param']}: {r['message']}" for r in plan["refusals"])


def validate_job(settings: Settings, job_id: str) -> JobStatus | None:
    """Checks a `validating` job; queues it or fails it with what is at fault. Returns the job's new status
    (None if it was not validating)."""
    cache = AssetCache(settings, make_store(settings))
    with session_scope(settings.database_url) as session:
        # Locked for the whole check: a second delivery of the same message waits, then finds it done.
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status != JobStatus.validating:
            log.info("job %s is not validating (%s); nothing to do", job_id, job and job.status)
            return None
        spec = JobSpec.model_validate(job.spec)
        try:
            inputs = check_inputs(
                cache,
                session,
                team_id=job.team_id,
                spec=spec,
                dataset=job.dataset_uri,
                validation_dataset=job.validation_uri,
            )
            spec = fitted(spec, inputs)
            job.spec = spec.model_dump(mode="json")
            job.input_digests = inputs.digests
            plan = plan_for(settings, spec, inputs)
            if plan is not None and plan["status"] == "refused":
                raise JobFailure(
                    JobErrorCode.invalid_config, f"the plan refused this job: {refusal_message(plan)}"
                )
        except JobFailure as failure:
            job_service.transition(
                session=session,
                job_id=job_id,
                to=JobStatus.failed,
                from_=VALIDATING,
                message=f"validation failed: {failure.message}",
                error_code=failure.code.value,
                error_message=failure.message,
            )
            return JobStatus.failed
        for param, summary in inputs.datasets.items():
            job_service.add_event(
                session=session,
                job_id=job_id,
                type="dataset",
                message=f"{param}: {summary.num_samples} valid samples in {summary.format.value} format",
                data={"param": param, "format": summary.format.value, "samples": summary.num_samples},
            )
        if plan is not None:
            job.plan = plan
            memory = (plan.get("memory") or {}).get("total")
            job_service.add_event(
                session=session,
                job_id=job_id,
                type="plan",
                message="plan: "
                + (
                    f"{plan['params']['trainable']:,} trainable parameters"
                    if plan.get("params")
                    else "no parameters"
                )
                + (f", about {memory / 2**30:.2f} GiB per GPU" if memory else ""),
                data={"notes": [n["message"] for n in plan.get("notes", [])]},
            )
        if not job_service.transition(
            session=session,
            job_id=job_id,
            to=JobStatus.queued,
            from_=VALIDATING,
            message="job is queued",
            enqueued_at=None,
        ):
            return JobStatus(session.get(Job, job_id).status)
        # Sent when this transaction commits; if the broker is away, the sweeper sends it later.
        send_after_commit(session, settings, job_id)
    return JobStatus.queued


def make_job_plan(settings: Settings, plan_id: str) -> str | None:
    """Completes a dry-run plan; returns its status."""
    cache = AssetCache(settings, make_store(settings))
    with session_scope(settings.database_url) as session:
        row = session.get(Plan, plan_id)
        if row is None or row.status != "pending":
            return None
        spec = JobSpec.model_validate(row.spec)
        dataset, validation_dataset = row.spec.get("dataset"), row.spec.get("validation_dataset")
        try:
            inputs = check_inputs(
                cache,
                session,
                team_id=row.team_id,
                spec=spec,
                dataset=dataset,
                validation_dataset=validation_dataset,
            )
            plan = plan_for(settings, fitted(spec, inputs), inputs) or {
                "status": "ready",
                "method": spec.method.value,
                "notes": [],
            }
        except JobFailure as failure:
            finish_plan(
                session=session,
                plan_id=plan_id,
                result=None,
                error_code=failure.code.value,
                error_message=failure.message,
            )
            return "failed"
        finish_plan(session=session, plan_id=plan_id, result=plan)
        return str(plan["status"])
