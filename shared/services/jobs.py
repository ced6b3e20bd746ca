"""Jobs: creation, reads scoped to a team, cancellation, and the fenced writes a worker makes."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, bindparam, exists, func, insert, literal, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from shared.datasets import DatasetFormat, method_mismatch
from shared.db import beyond
from shared.errors import Conflict, InvalidRequest, NotFound, TooManyRequests
from shared.hub import check_hub_allowed, parse_hub_id
from shared.models import (
    PRIORITY_RANK,
    Attempt,
    Job,
    JobEvent,
    JobMetric,
    Team,
    UploadedFile,
    Webhook,
    new_id,
    utcnow,
)
from shared.planning import (
    ModelConfigError,
    ModelShape,
    feature_refusals,
    fit_to_model,
    static_refusals,
    targeted_layers,
)
from shared.schemas import AVAILABLE_METHODS, LORA_METHODS, JobSpec, Method, job_sources
from shared.services.models import model_config
from shared.services.usage import charge_ctes, close_attempt, expire_attempts, minute_of
from shared.services.webhooks import record_job_finished
from shared.settings import Settings
from shared.states import ACTIVE, TERMINAL, JobStatus, sources_of
from shared.storage import ObjectStore
from shared.tenancy import TeamID
from shared.uris import resolve_dataset_uri

if TYPE_CHECKING:
    from shared.services.adapters import AdapterInfo

MAX_PAGE = 100


# Built once, a Core statement: every submission runs it.
_UPLOAD_FORMAT = select(UploadedFile.format).where(
    UploadedFile.id == bindparam("file_id"), UploadedFile.team_id == bindparam("team_id")
)


def _check_dataset(
    *, session: Session, settings: Settings, team_id: TeamID, value: str, param: str, method: Method
) -> str:
    source = resolve_dataset_uri(value, settings, param=param, team_id=team_id)
    if source.kind == "upload":
        found = session.connection().scalar(_UPLOAD_FORMAT, {"file_id": source.file_id, "team_id": team_id})
        if found is None:
            raise InvalidRequest(f"uploaded file {source.file_id} does not exist", param=param)
        # Other sources are read by the worker, which makes the same check before queueing.
        mismatch = method_mismatch(method, DatasetFormat(found))
        if mismatch is not None:
            raise InvalidRequest(f"{source.file_id}: {mismatch}", param=param)
    return source.uri


def _check_sources(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> str | None:
    """Checks the finished adapters a merge, fusion or export job reads; returns the base model they share."""
    from shared.services.adapters import describe_source

    section = spec.method.value
    sources = job_sources(spec)
    param = (
        (lambda i: f"{section}.source") if spec.export is not None else (lambda i: f"{section}.sources[{i}]")
    )
    infos = [
        describe_source(
            session=session, settings=settings, store=store, team_id=team_id, source=source, param=param(i)
        )
        for i, source in enumerate(sources)
    ]
    for i, info in enumerate(infos):
        if info.peft_type != "LORA":
            raise InvalidRequest(f"{info.label} is a {info.peft_type or 'non-LoRA'} adapter", param=param(i))
        if info.use_dora and spec.method in (Method.merge, Method.fusion):
            raise InvalidRequest(
                f"{info.label} is a DoRA adapter; its magnitude vectors cannot be combined with other adapters "
                "(export it into its base instead)",
                param=param(i),
            )
    bases = {info.base_model for info in infos}
    if len(bases) > 1:
        listing = "; ".join(f"{info.label}: {info.base_model}" for info in infos)
        raise InvalidRequest(
            f"the adapters were trained on different base models ({listing})", param=param(0)
        )
    base = bases.pop() if bases else None
    if spec.base_model is not None and base is not None and spec.base_model != base:
        raise InvalidRequest(
            f"the adapters were trained on {base}, not {spec.base_model}", param="base_model"
        )
    if spec.merge is not None and spec.merge.combination_type not in ("cat", "svd"):
        ranks = {info.rank for info in infos}
        if len(ranks) > 1:
            raise InvalidRequest(
                f"combination_type {spec.merge.combination_type} needs adapters of one rank, got ranks "
                f"{sorted(ranks)}; use cat or svd",
                param="merge.combination_type",
            )
    return base


def _init_source(
    session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> AdapterInfo:
    from shared.services.adapters import describe_init_from

    assert spec.init_from is not None
    return describe_init_from(
        session=session, settings=settings, store=store, team_id=team_id, init_from=spec.init_from
    )


def _target_leaves(settings: Settings, store: ObjectStore, spec: JobSpec) -> frozenset[str] | None:
    """The leaf names of the layers the job's adapter wraps (None when presets cannot be resolved here)."""
    assert spec.adapter is not None and spec.base_model is not None
    target = spec.adapter.target_modules
    if isinstance(target, list):
        return frozenset(name.rsplit(".", 1)[-1] for name in target)
    config = model_config(settings=settings, store=store, name=spec.base_model)
    try:
        shape = ModelShape.from_config(config) if config is not None else None
    except ModelConfigError:
        shape = None
    return frozenset(layer.name for layer in targeted_layers(spec, shape)) if shape is not None else None


def _check_init_from(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> None:
    """A job continuing from another's adapter must have the shape of that adapter: same base model, rank,
    wrapped layers and DoRA magnitudes (scaling, dropout and the training settings may change)."""
    info = _init_source(session, settings, store, team_id, spec)
    adapter = spec.adapter
    assert adapter is not None
    if info.peft_type != "LORA":
        raise InvalidRequest(
            f"{info.label} is a {info.peft_type or 'non-LoRA'} adapter", param="init_from.job"
        )
    if spec.base_model != info.base_model:
        raise InvalidRequest(
            f"init_from: {info.label} was trained on {info.base_model}, not {spec.base_model}; continue it on "
            f"{info.base_model}",
            param="base_model",
        )
    if adapter.rank != info.rank:
        raise InvalidRequest(
            f"init_from: {info.label} has rank {info.rank}, this job rank {adapter.rank}; set adapter.rank to "
            f"{info.rank}",
            param="adapter.rank",
        )
    if bool(adapter.use_dora) != info.use_dora:
        raise InvalidRequest(
            f"init_from: {info.label} is "
            + (
                "a DoRA adapter; continue it with method dora (or qlora with adapter.use_dora)"
                if info.use_dora
                else "a LoRA adapter without DoRA magnitudes; continue it with method lora, rslora or qlora"
            ),
            param="method",
        )
    source = frozenset(name.rsplit(".", 1)[-1] for name in info.target_modules)
    leaves = _target_leaves(settings, store, spec)
    if leaves is not None and leaves != source:
        raise InvalidRequest(
            f"init_from: {info.label} adapts {sorted(source)}, this job {sorted(leaves)}; set "
            f"adapter.target_modules to {sorted(source)}",
            param="adapter.target_modules",
        )


def team_limits(session: Session, settings: Settings, team_id: str) -> tuple[int, int]:
    """The team's limits of running and of waiting jobs (its own, or the deployment's defaults)."""
    team = session.get(Team, team_id)
    running = (team.max_running_jobs if team else None) or settings.team_max_running_jobs
    queued = (team.max_queued_jobs if team else None) or settings.team_max_queued_jobs
    return running, queued


# A team's limit of waiting jobs (its own, or the deployment's default) and its waiting jobs counted up to that
# limit only (a team far over it, after a lowered limit, costs no more than one at it): one statement, one round
# trip, built once (building it cost more CPU than running it).
_QUEUED_LIMIT = (
    select(func.coalesce(func.max(Team.max_queued_jobs), bindparam("default")))
    .where(Team.id == bindparam("team_id"))
    .scalar_subquery()
)
_WAITING_JOBS = select(
    _QUEUED_LIMIT,
    select(func.count())
    .select_from(
        select(Job.id)
        .where(
            Job.team_id == bindparam("team_id"),
            Job.status.in_([JobStatus.validating.value, JobStatus.queued.value]),
        )
        .limit(_QUEUED_LIMIT)
        .subquery()
    )
    .scalar_subquery(),
)


def check_queue_quota(*, session: Session, settings: Settings, team_id: TeamID) -> None:
    """Raises 429 when the team already has as many jobs waiting as its limit allows."""
    limit, waiting = (
        session.connection()
        .execute(_WAITING_JOBS, {"team_id": team_id, "default": settings.team_max_queued_jobs})
        .one()
    )
    if waiting >= limit:
        raise TooManyRequests(
            f"your team has {waiting} jobs waiting, its limit is {limit}; wait for some to start or cancel some",
            param="team",
        )


@dataclass(frozen=True)
class CheckedSpec:
    """A spec that passed every check before queueing, with what the checks resolved."""

    spec: JobSpec  # base_model filled in for merge and export
    dataset: str | None
    validation_dataset: str | None


def _check_resources(*, settings: Settings, spec: JobSpec) -> None:
    """A job must fit one node, or span several on the deployment's Ray cluster."""
    resources = spec.resources
    if resources.nodes == 1:
        if resources.gpus > settings.max_gpus_per_job:
            raise InvalidRequest(
                f"no node here has {resources.gpus} GPUs (at most {settings.max_gpus_per_job} per node); use fewer, "
                "or spread the job over nodes (resources.nodes and gpus_per_node) where a Ray cluster is configured",
                param="resources.gpus",
            )
        return
    if settings.ray_address is None:
        raise InvalidRequest(
            f"resources.nodes {resources.nodes}: this deployment has no Ray cluster (TUNEFORGE_RAY_ADDRESS is not "
            f"set), so a job cannot span several nodes; use nodes 1 with at most {settings.max_gpus_per_job} GPUs",
            param="resources.nodes",
        )
    if spec.method not in LORA_METHODS:
        raise InvalidRequest(
            f"{spec.method.value} jobs run on one node; only adapter training spans several",
            param="resources.nodes",
        )
    if (resources.gpus_per_node or 1) > settings.max_gpus_per_job:
        raise InvalidRequest(
            f"no node here has {resources.gpus_per_node} GPUs (at most {settings.max_gpus_per_job} per node)",
            param="resources.gpus_per_node",
        )


def check_spec(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> CheckedSpec:
    """Runs the checks a submitted job gets before it is stored (a dry run gets the same); raises a 4xx
    error naming the field to change."""
    if spec.method not in AVAILABLE_METHODS:
        available = ", ".join(sorted(AVAILABLE_METHODS))
        raise InvalidRequest(
            f"method {spec.method.value!r} is not available in this release; available: {available}",
            param="method",
        )
    if job_sources(spec):
        base = _check_sources(session=session, settings=settings, store=store, team_id=team_id, spec=spec)
        spec = spec.model_copy(update={"base_model": spec.base_model or base})
    if spec.init_from is not None and spec.base_model is None:
        spec = spec.model_copy(
            update={"base_model": _init_source(session, settings, store, team_id, spec).base_model}
        )
    registry = settings.model_registry()
    hub_ref = parse_hub_id(spec.base_model) if spec.base_model not in registry and spec.base_model else None
    if hub_ref is not None:
        check_hub_allowed(hub_ref, settings, param="base_model")
    elif spec.base_model not in registry:
        known = ", ".join(sorted(registry)) or "none registered"
        hub = (
            " or a Hugging Face Hub id (org/name[@revision]) on the allowlist"
            if settings.hub_allowlist
            else ""
        )
        raise InvalidRequest(
            f"unknown base model {spec.base_model!r}; available: {known}{hub}", param="base_model"
        )
    _check_resources(settings=settings, spec=spec)
    _check_integrations(settings=settings, spec=spec)
    if spec.init_from is not None:
        _check_init_from(session=session, settings=settings, store=store, team_id=team_id, spec=spec)
    hp = spec.hyperparameters
    if hp is not None and hp.max_seq_length is not None and hp.max_seq_length > settings.max_seq_length:
        raise InvalidRequest(
            f"max_seq_length is limited to {settings.max_seq_length} on this deployment",
            param="hyperparameters.max_seq_length",
        )
    if hp is not None and hp.eval_steps is not None and spec.validation_dataset is None:
        raise InvalidRequest("eval_steps needs a validation_dataset", param="hyperparameters.eval_steps")
    lacking = feature_refusals(spec, settings.worker_features)
    if lacking:
        raise InvalidRequest(lacking[0].message, param=lacking[0].param, code="refused_combination")
    spec = _fit_to_model(settings=settings, store=store, spec=spec)
    datasets = {
        param: _check_dataset(
            session=session, settings=settings, team_id=team_id, value=value, param=param, method=spec.method
        )
        for param, value in (("dataset", spec.dataset), ("validation_dataset", spec.validation_dataset))
        if value is not None
    }
    return CheckedSpec(spec, datasets.get("dataset"), datasets.get("validation_dataset"))


def _check_integrations(*, settings: Settings, spec: JobSpec) -> None:
    """Refuses trackers this deployment cannot log to (no MLflow server, no W&B key)."""
    for index, integration in enumerate(spec.integrations):
        if integration.type == "mlflow" and not settings.mlflow_tracking_uri:
            raise InvalidRequest(
                "this deployment has no MLflow tracking server (TUNEFORGE_MLFLOW_TRACKING_URI); remove the "
                "mlflow integration",
                param=f"integrations.{index}",
            )
        if (
            integration.type == "wandb"
            and settings.wandb_api_key is None
            and settings.wandb_mode != "offline"
        ):
            raise InvalidRequest(
                "this deployment has no W&B key (TUNEFORGE_WANDB_API_KEY); remove the wandb integration",
                param=f"integrations.{index}",
            )


def _fit_to_model(*, settings: Settings, store: ObjectStore, spec: JobSpec) -> JobSpec:
    """Fits defaults to the base model (a max_seq_length the user did not set stays within its context) and
    refuses combinations its shape rules out. Reads config.json only, never weights; when this process
    cannot read it, the worker runs the same checks before queueing."""
    if spec.adapter is None or spec.base_model is None:
        return spec
    config = model_config(settings=settings, store=store, name=spec.base_model)
    if config is None:
        return spec
    try:
        shape = ModelShape.from_config(config)
    except ModelConfigError:
        return spec
    spec = fit_to_model(spec, shape)
    refusals = static_refusals(spec, shape)
    if refusals:
        first = refusals[0]
        more = (
            f" (and {len(refusals) - 1} more: {'; '.join(r.message for r in refusals[1:])})"
            if len(refusals) > 1
            else ""
        )
        raise InvalidRequest(first.message + more, param=first.param, code="refused_combination")
    return spec


def create_job(
    *,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    team_id: TeamID,
    spec: JobSpec,
    enqueued_at: datetime | None = None,
) -> Job:
    """Checks a spec against this deployment and records a new job in `validating` (not yet enqueued; a caller
    that sends it after the commit passes the send time, written with the job instead of by an update)."""
    checked = check_spec(session=session, settings=settings, store=store, team_id=team_id, spec=spec)
    spec = checked.spec
    check_queue_quota(session=session, settings=settings, team_id=team_id)
    assert spec.base_model is not None
    now = utcnow()
    job = Job(
        id=new_id("ftjob"),
        team_id=team_id,
        status=JobStatus.validating,
        method=spec.method,
        base_model=spec.base_model,
        dataset_uri=checked.dataset,
        validation_uri=checked.validation_dataset,
        spec=spec.model_dump(mode="json"),
        priority=spec.priority,
        priority_rank=PRIORITY_RANK[spec.priority],
        gpus=spec.resources.gpus,
        nodes=spec.resources.nodes,
        user_metadata=dict(spec.metadata),
        attempt=0,
        result={},
        enqueued_at=enqueued_at,
        runtime_seconds=0.0,
        validation_tries=0,
        created_at=now,
        updated_at=now,
    )
    # A Core insert of every column (the ORM's unit of work cost more than the rest of the insert). The object
    # stays out of the session: callers read it for their answer; a later change goes through a query.
    session.connection().execute(_JOB_INSERT, {column: getattr(job, attr) for attr, column in _JOB_COLUMNS})
    add_event(session=session, job_id=job.id, type="created", message=f"job created ({spec.method.value})")
    return job


_JOB_INSERT = insert(Job)
# (attribute, column) of every column of a job: `user_metadata` is the column `metadata`.
_JOB_COLUMNS = [(prop.key, prop.columns[0].key) for prop in sa_inspect(Job).column_attrs]


def get_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """Returns a team's job, or raises NotFound (also for another team's job)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team_id))
    if job is None:
        raise NotFound(f"job {job_id} not found", param="job_id")
    return job


def _encode_cursor(created_at: datetime, item_id: str | int) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, item_id = json.loads(raw)
        moment = datetime.fromisoformat(created)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("cursor is not one this API returned", param="cursor") from exc
    # A forged cursor must not reach the query: a naive time cannot be compared with stored ones, and an
    # id that is not printable text (a number, NUL) is no id this API returned.
    if moment.tzinfo is None or not (isinstance(item_id, str) and item_id.isprintable()):
        raise InvalidRequest("cursor is not one this API returned", param="cursor")
    return moment, item_id


def list_jobs(
    *,
    session: Session,
    team_id: TeamID,
    status: JobStatus | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Returns a page of a team's jobs, newest first, and the cursor of the next page."""
    query = select(Job).where(Job.team_id == team_id)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(beyond(Job, created, job_id))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = (
        _encode_cursor(jobs[limit - 1].created_at, jobs[limit - 1].id) if len(jobs) > limit else None
    )
    return jobs[:limit], next_cursor


_EVENT_INSERT = insert(JobEvent)


def add_event(
    *,
    session: Session,
    job_id: str,
    type: str,
    message: str,
    level: str = "info",
    attempt: int = 0,
    data: dict[str, Any] | None = None,
) -> None:
    """Appends an event to a job's log, in the caller's transaction."""
    session.flush()  # the insert goes around the session: what it holds (the job, maybe) goes first
    # A Core insert: every move of every job writes events, and the ORM's unit of work costs more than it. The
    # values go as parameters of one statement built once (a statement with values costs a cache key each time).
    session.connection().execute(
        _EVENT_INSERT,
        {
            "job_id": job_id,
            "type": type,
            "message": message,
            "level": level,
            "attempt": attempt,
            "data": data or {},
        },
    )


def list_attempts(*, session: Session, team_id: TeamID, job_id: str) -> list[Attempt]:
    """Returns a team's job's attempts in order: where each ran, on which GPUs, and how it ended."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    return list(session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))


def attempts_counted(*, session: Session, job_id: str, attempt: int) -> int:
    """How many of a job's attempts up to `attempt` count against max_attempts: all but those that ended
    because the user paused the job (a pause is no failure)."""
    paused = session.scalar(
        select(func.count())
        .select_from(Attempt)
        .where(Attempt.job_id == job_id, Attempt.outcome == JobStatus.paused.value)
    )
    return attempt - int(paused or 0)


def list_events(
    *, session: Session, team_id: TeamID, job_id: str, after: int | None = None, limit: int = 100
) -> tuple[list[JobEvent], int | None]:
    """Returns a job's events in order, starting after event id `after`, and the id to continue from."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    events = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    next_after = events[limit - 1].id if len(events) > limit else None
    return events[:limit], next_after


def transition(
    *,
    session: Session,
    job_id: str,
    to: JobStatus,
    attempt: int | None = None,
    from_: frozenset[JobStatus] | None = None,
    message: str | None = None,
    event_data: dict[str, Any] | None = None,
    conditions: Sequence[ColumnElement[bool]] = (),
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Moves a job to `to` if the state machine allows it from its current status — and, when given, only
    from the statuses in `from_` and only for that attempt. Returns False when the job had moved on."""
    sources = sources_of(to) if from_ is None else sources_of(to) & from_
    now = now or utcnow()
    values.setdefault("updated_at", now)
    if to in TERMINAL:
        values.setdefault("finished_at", now)
    if to is JobStatus.queued:  # back in the queue: a preemption that asked for this is done
        values.setdefault("preempt_requested_at", None)
    event = {
        "type": "status",
        "message": message or f"job is {to.value}",
        "level": "error" if to is JobStatus.failed else "info",
        "attempt": attempt or 0,
        "data": {"status": to.value, **(event_data or {})},
    }
    if session.get_bind().dialect.name == "postgresql":
        # One round trip: every job's every move comes here, an attempt's end among them.
        moved = _move_in_one(session, job_id, to, sources, attempt, tuple(conditions), values, event, now)
        if moved is None:
            return False
        if moved.hooks and to in TERMINAL:
            record_job_finished(session=session, job_id=job_id, status=to)
        return True
    query = update(Job).where(Job.id == job_id, Job.status.in_([s.value for s in sources]), *conditions)
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    changed = session.execute(query.values(status=to.value, **values)).rowcount == 1
    if changed and to not in ACTIVE:
        # Leaving running or cancelling frees the attempt's GPUs (a no-op from validating or queued).
        close_attempt(session, job_id, to.value, now)
    if changed:
        add_event(session=session, job_id=job_id, **event)
        record_job_finished(session=session, job_id=job_id, status=to)  # webhooks; terminal statuses only
    return changed


def _move_in_one(
    session: Session,
    job_id: str,
    to: JobStatus,
    sources: frozenset[JobStatus],
    attempt: int | None,
    conditions: tuple[ColumnElement[bool], ...],
    values: dict[str, Any],
    event: dict[str, Any],
    now: datetime,
) -> Any:
    """On PostgreSQL, `transition` as one statement (see _move_statement). Returns its row (team_id, hooks),
    None when the job had moved on. What the session holds of the job and its attempts is expired."""
    session.flush()  # the statement goes around the session: what it holds goes first
    shape = (to, sources, attempt is not None, tuple(values))
    statement = _move_statement(*shape, conditions) if conditions else _cached_move_statement(*shape)
    params = {f"v_{name}": value for name, value in values.items()}
    params |= {f"e_{name}": value for name, value in event.items()}
    params |= {"p_job": job_id, "p_attempt": attempt, "p_now": now, "p_minute": minute_of(now)}
    params["p_outcome"] = to.value
    row = session.connection().execute(statement, params).first()
    for loaded in [o for o in session.identity_map.values() if isinstance(o, Job) and o.id == job_id]:
        session.expire(loaded)
    expire_attempts(session, lambda a: a.job_id == job_id)
    return row


def _move_statement(
    to: JobStatus,
    sources: frozenset[JobStatus],
    with_attempt: bool,
    names: tuple[str, ...],
    conditions: tuple[ColumnElement[bool], ...] = (),
) -> Any:
    """A job's move to `to` in one PostgreSQL statement: the job's UPDATE (bound: p_job, p_attempt, v_<name>
    for each value, p_now); when it leaves running, cancelling or pausing, its attempt's close (ended,
    charged, its team's running counts dropped, as usage.close_attempt; bound p_minute, p_outcome); its status
    event (e_<field>); and whether its team has webhooks. Selects (team_id, hooks) of the moved job."""
    where = [Job.id == bindparam("p_job"), Job.status.in_([s.value for s in sources]), *conditions]
    if with_attempt:
        where.append(Job.attempt == bindparam("p_attempt"))
    columns = {name: Job.__mapper__.attrs[name].columns[0] for name in names}
    values = {column: bindparam(f"v_{name}", type_=column.type) for name, column in columns.items()}
    move = update(Job).where(*where).values({Job.status: literal(to.value), **values})
    moved = move.returning(Job.id, Job.team_id).cte("moved")
    event = JobEvent.__table__.c
    written = insert(JobEvent).from_select(
        ["job_id", "type", "message", "level", "attempt", "data", "created_at"],
        select(
            moved.c.id,
            *(bindparam(f"e_{name}", type_=event[name].type) for name in ("type", "message", "level")),
            bindparam("e_attempt", type_=event.attempt.type),
            bindparam("e_data", type_=event.data.type),
            bindparam("p_now", type_=event.created_at.type),
        ),
    )
    hooks = exists().where(Webhook.team_id == moved.c.team_id, Webhook.disabled_at.is_(None))
    statement = select(moved.c.team_id, hooks.label("hooks")).add_cte(written.cte("written"))
    if to not in ACTIVE:
        # Leaving running or cancelling frees the attempt's GPUs (nothing to close from validating or queued).
        for cte in charge_ctes(Attempt.job_id.in_(select(moved.c.id)), closing=True)[1]:
            statement = statement.add_cte(cte)
    return statement


_cached_move_statement = cache(_move_statement)


def cancel_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """Cancels a job: at once if it waits (or is paused), through `cancelling` if it is running."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    status = JobStatus(job.status)
    if status in TERMINAL:
        raise Conflict(f"job {job_id} already {status.value}; nothing to cancel", param="job_id")
    if status is JobStatus.cancelling:
        return job
    if status in (JobStatus.validating, JobStatus.queued, JobStatus.paused):
        target = JobStatus.cancelled
    else:
        target = JobStatus.cancelling
    if not transition(
        session=session,
        job_id=job_id,
        to=target,
        from_=frozenset({status}),
        message="cancelled by the user" if target is JobStatus.cancelled else "cancellation requested",
        cancel_requested_at=utcnow(),
    ):
        # The job moved under us (a worker claimed or finished it): decide again on its new status.
        session.expire(job)
        return cancel_job(session=session, team_id=team_id, job_id=job_id)
    session.refresh(job)
    return job


def record_metric(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    split: str,
    step: int,
    values: dict[str, float | int | None],
) -> None:
    """Stores one logged step (a resumed attempt overwrites the steps it repeats)."""
    existing = session.scalar(
        select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.split == split, JobMetric.step == step)
    )
    if existing is None:
        existing = JobMetric(job_id=job_id, split=split, step=step)
        session.add(existing)
    # Which attempt wrote the point, and when: a resumed attempt rewrites the steps it repeats.
    existing.attempt = attempt
    existing.created_at = utcnow()
    for name, value in values.items():
        setattr(existing, name, value)
    session.flush()


def metric_points_after(*, session: Session, job_id: str, after: int, limit: int = 500) -> list[JobMetric]:
    """Returns a job's metric points recorded after point id `after` (new points; a resumed attempt's rewrite
    of a step keeps its id), oldest first. The caller has checked that the job is the team's."""
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > after)
    return list(session.scalars(query.order_by(JobMetric.id).limit(limit)))


def get_metrics(*, session: Session, team_id: TeamID, job_id: str) -> dict[str, list[JobMetric]]:
    """Returns a job's train and eval curves, ordered by step."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step))
    curves: dict[str, list[JobMetric]] = {"train": [], "eval": []}
    for row in rows:
        curves.setdefault(row.split, []).append(row)
    return curves
