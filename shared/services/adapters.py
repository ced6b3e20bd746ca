"""Finished adapters a job reads (merge, fusion and export sources, the adapter or checkpoint a training job
continues from): found, checked, described."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidRequest
from shared.models import CHECKPOINT_KIND, Artifact, Checkpoint, Job
from shared.schemas import AdapterSource, InitFrom
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import ObjectStore, StorageError, parse_s3_uri
from shared.tenancy import TeamID
from shared.uris import check_own_objects


@dataclass(frozen=True)
class AdapterInfo:
    """What the adapter_config.json of a finished adapter says."""

    label: str  # how to name it in messages
    base_model: str
    rank: int
    target_modules: frozenset[str]
    use_dora: bool
    use_rslora: bool
    peft_type: str


def _info(label: str, config: dict, base_model: str | None, param: str) -> AdapterInfo:
    # The file may be anyone's JSON (an s3:// source is any object in an allowed bucket): a malformed one
    # is the caller's error, not the server's.
    try:
        targets = config.get("target_modules") or []
        return AdapterInfo(
            label=label,
            base_model=base_model or str(config.get("base_model_name_or_path") or ""),
            rank=int(config.get("r") or 0),
            target_modules=frozenset([targets] if isinstance(targets, str) else targets),
            use_dora=bool(config.get("use_dora")),
            use_rslora=bool(config.get("use_rslora")),
            peft_type=str(config.get("peft_type") or ""),
        )
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(
            f"{label}: adapter_config.json is not a valid adapter configuration", param=param
        ) from exc


def describe_source(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    source: AdapterSource,
    param: str,
) -> AdapterInfo:
    """Finds a finished adapter and reads its configuration; raises InvalidRequest naming `param`."""
    if source.job_id is not None:
        job = session.scalar(select(Job).where(Job.id == source.job_id, Job.team_id == team_id))
        if job is None:
            raise InvalidRequest(f"job {source.job_id} not found", param=param)
        if job.status != JobStatus.succeeded:
            raise InvalidRequest(
                f"job {source.job_id} is {job.status}; only succeeded jobs have an adapter to use",
                param=param,
            )
        artifact = session.scalar(
            select(Artifact).where(
                Artifact.job_id == job.id, Artifact.kind == "adapter", Artifact.name == "adapter_config.json"
            )
        )
        if artifact is None:
            raise InvalidRequest(
                f"job {source.job_id} produced no adapter (it was a {job.method} job)", param=param
            )
        try:
            config = json.loads(store.read_bytes(artifact.storage_key))
        except (StorageError, ValueError) as exc:
            raise InvalidRequest(
                f"could not read the adapter of job {source.job_id}: {exc}", param=param
            ) from exc
        return _info(f"job {job.id}", config, job.base_model, param)
    assert source.uri is not None
    bucket, prefix = parse_s3_uri(source.uri)
    if bucket not in settings.allowed_s3_buckets:
        allowed = ", ".join(settings.allowed_s3_buckets)
        raise InvalidRequest(
            f"bucket {bucket!r} is not allowed here; allowed buckets: {allowed}", param=param
        )
    key = f"{prefix.rstrip('/')}/adapter_config.json"
    check_own_objects(bucket, key, settings, team_id=team_id, param=param)
    try:
        config = json.loads(store.read_bytes(key, bucket=bucket))
    except StorageError as exc:
        raise InvalidRequest(f"no adapter_config.json under {source.uri}", param=param) from exc
    except ValueError as exc:
        raise InvalidRequest(f"{source.uri}/adapter_config.json is not valid JSON", param=param) from exc
    return _info(source.uri, config, None, param)


def describe_init_from(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, init_from: InitFrom
) -> AdapterInfo:
    """Finds the adapter a training job continues from (a job of the team: its final adapter, or the adapter
    of one of its checkpoints) and reads its configuration; raises InvalidRequest naming the field."""
    if init_from.checkpoint_step is None:
        return describe_source(
            session=session,
            settings=settings,
            store=store,
            team_id=team_id,
            source=AdapterSource(job_id=init_from.job),
            param="init_from.job",
        )
    job = session.scalar(select(Job).where(Job.id == init_from.job, Job.team_id == team_id))
    if job is None:
        raise InvalidRequest(f"job {init_from.job} not found", param="init_from.job")
    step, param = init_from.checkpoint_step, "init_from.checkpoint_step"
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    )
    if checkpoint is None:
        steps = session.scalars(
            select(Checkpoint.step).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
        ).all()
        listing = ", ".join(map(str, steps)) if steps else "none"
        raise InvalidRequest(
            f"job {job.id} has no checkpoint at step {step}; its checkpoints: {listing}", param=param
        )
    artifact = session.scalar(
        select(Artifact).where(
            Artifact.job_id == job.id,
            Artifact.kind == CHECKPOINT_KIND,
            Artifact.name == f"{checkpoint.prefix}/adapter_config.json",
        )
    )
    if artifact is None:
        raise InvalidRequest(f"the checkpoint at step {step} of job {job.id} holds no adapter", param=param)
    try:
        config = json.loads(store.read_bytes(artifact.storage_key))
    except (StorageError, ValueError) as exc:
        raise InvalidRequest(
            f"could not read the adapter of job {job.id} at step {step}: {exc}", param=param
        ) from exc
    return _info(f"job {job.id} at step {step}", config, job.base_model, param)
