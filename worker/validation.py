"""Checks a submitted job on a worker before it waits for a GPU: its datasets line by line, its source
adapters, its base model, and the plan (parameter counts, dataset statistics, the memory estimate). A dry
run (a `plans` row) gets the same checks without a job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from shared.datasets import (
    DatasetFormat,
    DatasetInvalid,
    DatasetSummary,
    dataset_digest,
    method_mismatch,
    read_dataset,
)
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job, Plan
from shared.planning import fit_to_model
from shared.schemas import JobSpec, job_sources
from shared.services import validation as validation_service
from shared.services.plans import finish_plan
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import make_store
from worker.assets import AssetCache

log = logging.getLogger(__name__)
# The split each dataset parameter reads from a saved DatasetDict (a single split is read whatever its name).
SPLITS = {"dataset": "train", "validation_dataset": "validation"}
STORAGE_CODES = frozenset({JobErrorCode.storage_error, JobErrorCode.storage_unavailable})


@dataclass
class Inputs:
    """A job's inputs, fetched and checked."""

    datasets: dict[str, DatasetSummary]
    model_dir: Path
    # sha256 of each dataset file as read here; the runner trains only on the same content.
    digests: dict[str, str]
    base_model: str  # as the job records it: a Hub id pinned to its commit
    dataset_uris: dict[str, str]  # the same, for datasets


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
    summaries, digests, pinned = {}, {}, {}
    for param, uri in (("dataset", dataset), ("validation_dataset", validation_dataset)):
        if not uri:
            continue
        uri = pinned[param] = cache.pin_dataset(uri, param=param)
        path = cache.dataset_file(uri, session=session, team_id=team_id, param=param)
        digests[param] = dataset_digest(path)
        try:
            summaries[param] = read_dataset(path, split=SPLITS[param])
        except DatasetInvalid as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, f"{param}: {exc}") from exc
        mismatch = method_mismatch(spec.method, DatasetFormat(summaries[param].format))
        if mismatch is not None:
            raise JobFailure(JobErrorCode.invalid_dataset, f"{param}: {mismatch}")
    for source in job_sources(spec):
        cache.adapter_dir(source, session=session, team_id=team_id)
    assert spec.base_model is not None
    base_model = cache.pin_model(spec.base_model)
    return Inputs(summaries, cache.model_dir(base_model), digests, base_model, pinned)


def fitted(spec: JobSpec, inputs: Inputs) -> JobSpec:
    """The spec with the defaults that depend on the base model filled in (as the API does when it can
    read the model's config)."""
    from worker.planning import model_shape

    spec = spec.model_copy(update={"base_model": inputs.base_model, **inputs.dataset_uris})
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
    (None if it was not this run's to check; `validating` when the check broke and will be tried again)."""
    with session_scope(settings.database_url) as session:
        attempt = validation_service.begin_validation(session=session, settings=settings, job_id=job_id)
    if attempt is None:
        log.info("job %s is not waiting for validation; nothing to do", job_id)
        return None
    cache = AssetCache(settings, make_store(settings))
    try:
        with session_scope(settings.database_url) as session:
            inputs = check_inputs(
                cache,
                session,
                team_id=attempt.team_id,
                spec=attempt.spec,
                dataset=attempt.dataset,
                validation_dataset=attempt.validation_dataset,
            )
        spec = fitted(attempt.spec, inputs)
        plan = plan_for(settings, spec, inputs)
        if plan is not None and plan["status"] == "refused":
            raise JobFailure(
                JobErrorCode.invalid_config, f"the plan refused this job: {refusal_message(plan)}"
            )
    except JobFailure as failure:
        with session_scope(settings.database_url) as session:
            if failure.code in STORAGE_CODES:  # an outage, not the job's fault: try again after a back-off
                validation_service.broke(
                    session=session, settings=settings, attempt=attempt, error=failure.message
                )
                return JobStatus(session.get(Job, job_id).status)
            validation_service.reject(
                session=session, job_id=job_id, code=failure.code, message=failure.message
            )
        return JobStatus.failed
    except Exception as exc:
        log.exception("validation of job %s broke (try %d)", job_id, attempt.try_number)
        with session_scope(settings.database_url) as session:
            validation_service.broke(
                session=session,
                settings=settings,
                attempt=attempt,
                error=f"{type(exc).__name__}: {exc}"[:1000],
            )
            return JobStatus(session.get(Job, job_id).status)
    with session_scope(settings.database_url) as session:
        return validation_service.accept(
            session=session,
            settings=settings,
            job_id=job_id,
            spec=spec,
            digests=inputs.digests,
            dataset_uris=inputs.dataset_uris,
            datasets=inputs.datasets,
            plan=plan,
        )


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
        except Exception as exc:  # a dry run is not retried: say what broke instead of staying pending
            log.exception("plan %s broke", plan_id)
            session.rollback()
            finish_plan(
                session=session,
                plan_id=plan_id,
                result=None,
                error_code=JobErrorCode.internal_error.value,
                error_message=f"making the plan broke ({type(exc).__name__}: {exc}); try again, and tell the "
                "operators if it happens again",
            )
            return "failed"
        finish_plan(session=session, plan_id=plan_id, result=plan)
        return str(plan["status"])
