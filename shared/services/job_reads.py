"""The reads clients poll (a job, pages of jobs, a job's metrics) on the API's event loop: one autocommit
round trip each (shared/db.py AsyncDatabase), the columns the answer shows and nothing else, rows rather than
ORM objects. The statements are built once, with named parameters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    null,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import aliased

from shared.db import AsyncDatabase
from shared.errors import NotFound
from shared.models import Attempt, Job, JobMetric
from shared.services.jobs import _decode_cursor, _encode_cursor
from shared.states import JobStatus
from shared.tenancy import TeamID

# What a job's answer shows (api/schemas.py job_answer).
JOB_COLUMNS = (
    Job.id,
    Job.status,
    Job.method,
    Job.base_model,
    Job.dataset_uri,
    Job.validation_uri,
    Job.spec,
    Job.priority,
    Job.user_metadata.label("user_metadata"),  # the column is named metadata
    Job.attempt,
    Job.error_code,
    Job.error_message,
    Job.trainable_params,
    Job.total_params,
    Job.trained_tokens,
    Job.result,
    Job.plan,
    Job.input_digests,
    Job.created_at,
    Job.updated_at,
    Job.started_at,
    Job.finished_at,
    Job.worker_id,
    Job.gpus,
    Job.nodes,
    Attempt.host.label("placement_host"),
    Attempt.gpu_indices.label("placement_gpu_indices"),
    Attempt.launcher.label("placement_launcher"),
)
# The latest attempt (one probe of the (job_id, number) index).
LATEST_ATTEMPT = and_(Attempt.job_id == Job.id, Attempt.number == Job.attempt)
_AHEAD = aliased(Job)
# 1 + the queued jobs ahead of a queued one by priority, then age (the queued-jobs index), for one job's GET.
QUEUED = literal_column("'queued'")  # a literal, not a parameter: these statements bind named values only
QUEUE_POSITION = case(
    (
        Job.status == QUEUED,
        select(func.count() + literal_column("1"))
        .where(
            _AHEAD.status == QUEUED,
            or_(
                _AHEAD.priority_rank < Job.priority_rank,
                and_(_AHEAD.priority_rank == Job.priority_rank, _AHEAD.created_at < Job.created_at),
            ),
        )
        .scalar_subquery(),
    ),
    else_=None,
).label("queue_position")
# A training job's progress, read only while it trains (a few probes of the (job_id, split, step) index): its
# latest training point (step, epoch, when) and the first point of its current attempt (step, when), from which
# api/schemas.py job_answer estimates the total steps and the time left.
TRAINING = literal_column("'running'"), literal_column("'cancelling'")
_TRAIN_POINT = and_(JobMetric.job_id == Job.id, JobMetric.split == literal_column("'train'"))
_THIS_ATTEMPT = and_(_TRAIN_POINT, JobMetric.attempt == Job.attempt)


def _while_training(column: Any, where: Any, newest: bool, label: str) -> Any:
    order = JobMetric.step.desc() if newest else JobMetric.step.asc()
    point = select(column).where(where).order_by(order).limit(literal_column("1")).scalar_subquery()
    return case((Job.status.in_(TRAINING), point), else_=None).label(label)


PROGRESS_COLUMNS = (
    _while_training(JobMetric.step, _TRAIN_POINT, True, "progress_step"),
    _while_training(JobMetric.epoch, _TRAIN_POINT, True, "progress_epoch"),
    _while_training(JobMetric.created_at, _TRAIN_POINT, True, "progress_at"),
    _while_training(JobMetric.step, _THIS_ATTEMPT, False, "progress_first_step"),
    _while_training(JobMetric.created_at, _THIS_ATTEMPT, False, "progress_first_at"),
)
METRIC_COLUMNS = (
    JobMetric.split,
    JobMetric.step,
    JobMetric.epoch,
    JobMetric.loss,
    JobMetric.learning_rate,
    JobMetric.grad_norm,
    JobMetric.tokens_per_second,
    JobMetric.num_tokens,
    JobMetric.attempt,
    JobMetric.created_at,
)


def _job_query(columns: tuple[Any, ...] = JOB_COLUMNS) -> Select:
    return (
        select(*columns, QUEUE_POSITION, *PROGRESS_COLUMNS)
        .outerjoin(Attempt, LATEST_ATTEMPT)
        .where(Job.id == bindparam("job_id"), Job.team_id == bindparam("team_id"))
    )


def _job_page_query(by_status: bool, after: bool, columns: tuple[Any, ...] = JOB_COLUMNS) -> Select:
    query = (
        select(*columns, *PROGRESS_COLUMNS)
        .outerjoin(Attempt, LATEST_ATTEMPT)
        .where(Job.team_id == bindparam("team_id"))
    )
    if by_status:
        query = query.where(Job.status == bindparam("status"))
    if after:
        # shared.db.beyond, newest first, with the anchor as parameters.
        after_created = bindparam("after_created", type_=Job.created_at.type)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after_created, bindparam("after_id")))
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(bindparam("limit", type_=Integer))


JOB = _job_query()
JOB_PAGES = {(s, a): _job_page_query(s, a) for s in (False, True) for a in (False, True)}
# The job outer-joined to its points: no row means no such job of the team, one row with a null step a job
# without points. In the order of the (job_id, split, step) index.
METRICS = (
    select(Job.id.label("job_id"), *METRIC_COLUMNS)
    .select_from(Job)
    .outerjoin(JobMetric, JobMetric.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.team_id == bindparam("team_id"))
    .order_by(JobMetric.split, JobMetric.step)
)


# On PostgreSQL the database writes each job's answer itself (api/schemas.py job_answer, but for `progress`, which
# api/schemas.py job_json adds): JSON text that the API sends as it is, without parsing the JSON columns (the
# spec, the plan) into Python objects and serializing them again, which was most of a page's cost. The columns
# next to it are the ones the API still needs: the page cursor, and while the job trains, its progress.
def _text(name: str) -> Any:
    return literal_column(f"'{name}'")


def _json_field(column: Any, name: str) -> Any:
    return column.op("->")(_text(name))


_EMPTY_OBJECT, _EMPTY_LIST, _JSON_NULL = (literal_column(f"'{v}'::jsonb") for v in ("{}", "[]", "null"))


def _or_empty(value: Any, empty: Any) -> Any:
    # `value or {}` (or []): SQL NULL and JSON null alike.
    return func.coalesce(func.nullif(value, _JSON_NULL), empty)


def _utc(column: Any) -> Any:
    # As pydantic writes an aware UTC datetime: microseconds only when there are some, `Z` for UTC.
    text = func.to_char(column.op("AT TIME ZONE")(_text("UTC")), _text('YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
    return func.replace(text, _text(".000000Z"), _text("Z"))


def _object(*pairs: tuple[str, Any]) -> Any:
    return func.json_build_object(*(part for name, value in pairs for part in (_text(name), value)))


# Spec fields the answer shows, in JobOut's order (the spec is a JobSpec, dumped when the job was created).
_SPEC_FIELDS_1 = (
    "adapter",
    "quantization",
    "dpo",
    "merge",
    "fusion",
    "export",
    "hyperparameters",
    "init_from",
)
_SPEC_FIELDS_2 = ("eval_prompts", "eval_samples", "eval_max_new_tokens")


def _answer_query(rows: Select, queue: bool) -> Select:
    job = rows.subquery("job")
    c = job.c
    spec = c.spec
    answer = _object(
        ("object", _text("job")),
        ("id", c.id),
        ("status", c.status),
        ("method", c.method),
        ("base_model", c.base_model),
        ("dataset", c.dataset_uri),
        ("validation_dataset", c.validation_uri),
        *((name, _json_field(spec, name)) for name in _SPEC_FIELDS_1),
        ("suffix", _json_field(spec, "suffix")),
        ("resources", _json_field(spec, "resources")),
        ("priority", c.priority),
        ("metadata", _or_empty(c.user_metadata, _EMPTY_OBJECT)),
        ("integrations", _or_empty(_json_field(spec, "integrations"), _EMPTY_LIST)),
        *((name, _json_field(spec, name)) for name in _SPEC_FIELDS_2),
        ("attempt", c.attempt),
        (
            "error",
            case(
                (
                    func.coalesce(c.error_code, _text("")) != _text(""),
                    _object(
                        ("code", c.error_code),
                        ("message", func.coalesce(c.error_message, _text(""))),
                        ("param", null()),
                    ),
                ),
                else_=null(),
            ),
        ),
        ("trainable_params", c.trainable_params),
        ("total_params", c.total_params),
        ("trained_tokens", c.trained_tokens),
        ("result", _or_empty(c.result, _EMPTY_OBJECT)),
        ("plan", c.plan),
        ("dataset_sha256", c.input_digests),
        ("created_at", _utc(c.created_at)),
        ("updated_at", _utc(c.updated_at)),
        ("started_at", _utc(c.started_at)),
        ("finished_at", _utc(c.finished_at)),
        (
            "placement",
            case(
                (
                    c.placement_host.is_not(None),
                    _object(
                        ("worker_id", c.worker_id),
                        ("host", c.placement_host),
                        ("gpu_indices", _or_empty(c.placement_gpu_indices, _EMPTY_LIST)),
                        ("launcher", c.placement_launcher),
                    ),
                ),
                else_=null(),
            ),
        ),
        (
            "queue",
            case(
                (
                    and_(c.status == QUEUED, c.queue_position.is_not(None)),
                    _object(("position", c.queue_position), ("gpus", c.gpus), ("nodes", c.nodes)),
                ),
                else_=null(),
            )
            if queue
            else null(),
        ),
    )
    return select(
        cast(answer, Text).label("answer"),
        c.id,
        c.status,
        c.created_at,
        case((c.status.in_(TRAINING), _json_field(spec, "hyperparameters")), else_=null()).label(
            "hyperparameters"
        ),
        *(getattr(c, column.name) for column in PROGRESS_COLUMNS),
    )


# The spec as one uncompressed value: each `->` of a stored (compressed) spec would decompress it again, and
# the answer reads 14 of its fields (a page's cost in the database fell by a third). OFFSET 0 keeps the single
# job's query a subquery of its own, so that this is done once per row, not once per field.
_ANSWER_COLUMNS = tuple(
    Job.spec.op("||")(_EMPTY_OBJECT).label("spec") if column is Job.spec else column for column in JOB_COLUMNS
)
JOB_ANSWER = _answer_query(_job_query(_ANSWER_COLUMNS).offset(literal_column("0")), queue=True)
JOB_ANSWER_PAGES = {
    (s, a): _answer_query(_job_page_query(s, a, _ANSWER_COLUMNS), queue=False).order_by(
        literal_column("job.created_at").desc(), literal_column("job.id").desc()
    )
    for s in (False, True)
    for a in (False, True)
}


async def read_job(*, db: AsyncDatabase, team_id: TeamID, job_id: str) -> Any:
    """Returns a team's job, or raises NotFound (also for another team's job): on PostgreSQL a row of JOB_ANSWER
    (its answer as JSON text), otherwise of JOB."""
    row = await db.fetch_one(JOB_ANSWER if db.postgres else JOB, job_id=job_id, team_id=team_id)
    if row is None:
        raise NotFound(f"job {job_id} not found", param="job_id")
    return row


async def read_job_page(
    *,
    db: AsyncDatabase,
    team_id: TeamID,
    status: JobStatus | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> tuple[list[Any], str | None]:
    """Returns a page of a team's jobs (rows as read_job's), newest first, and the cursor of the next page (keyset pagination on
    the (team_id, created_at, id) and (team_id, status, created_at, id) indexes)."""
    params: dict[str, Any] = {"team_id": team_id, "limit": limit + 1}
    if status is not None:
        params["status"] = status.value
    if cursor:
        params["after_created"], params["after_id"] = _decode_cursor(cursor)
    pages = JOB_ANSWER_PAGES if db.postgres else JOB_PAGES
    rows = await db.fetch_all(pages[status is not None, bool(cursor)], **params)
    next_cursor = (
        _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    )
    return rows[:limit], next_cursor


async def read_metrics(*, db: AsyncDatabase, team_id: TeamID, job_id: str) -> list[tuple[Any, ...]]:
    """Returns a team's job's metric points by split, then step, as tuples of METRIC_COLUMNS' values (a job
    has thousands); raises NotFound."""
    rows = await db.fetch_tuples(METRICS, job_id=job_id, team_id=team_id)
    if not rows:
        raise NotFound(f"job {job_id} not found", param="job_id")
    # The first column is the job's id; a job without points has one row of nulls.
    return [row[1:] for row in rows if row[2] is not None]
