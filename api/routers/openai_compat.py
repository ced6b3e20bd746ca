"""/v1/fine_tuning: OpenAI's fine-tuning API over Tuneforge jobs, for code written against the `openai` client.

    client = openai.OpenAI(api_key=TUNEFORGE_KEY, base_url="https://tuneforge.example.com/v1")
    file = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct",
        training_file=file.id,
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
        extra_body={"tuneforge": {"method": "dora", "adapter": {"rank": 16, "alpha": 32}}},
    )

Mapping onto a JobSpec (the job is an ordinary Tuneforge job, also visible under /v1/jobs):

- model -> base_model; training_file -> dataset; validation_file -> validation_dataset.
- hyperparameters (or method.supervised.hyperparameters, not both): n_epochs -> epochs, batch_size ->
  batch_size, learning_rate_multiplier -> learning_rate = BASE_LEARNING_RATE (2e-4) x multiplier; "auto" or
  left out keeps Tuneforge's default. seed -> hyperparameters.seed (default 42, not random: a retry with an
  Idempotency-Key must describe the same job).
- method.type must be "supervised"; "dpo" and "reinforcement" are refused (400, param method.type).
- suffix is kept in the job's metadata under `tuneforge.suffix` (hidden from this surface's `metadata`).
- integrations: none are supported; a non-empty list is refused.
- The `tuneforge` body field (the client's extra_body) carries the PEFT settings, each the JobSpec field of
  the same name: {"method": "lora|dora|rslora|qlora", "adapter": {...}, "quantization": {...},
  "hyperparameters": {...any JobSpec hyperparameter, e.g. max_steps...}, "resources": {...}, "priority"}.
  A setting given through an OpenAI field may not be repeated there (epochs, batch_size, learning_rate,
  seed; max_steps clashes with n_epochs).

Jobs of other methods (merge, fusion, export) are Tuneforge-only: this surface neither lists nor shows them.
Errors here take OpenAI's shape {"error": {"message", "type", "param", "code"}} and name OpenAI's fields
(`model`, `training_file`, `tuneforge.adapter.rank`...); invalid requests are 400 (the native API says 422).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.errors import describe
from api.idempotency import IdempotencyKeyHeader
from api.openai_schemas import (
    BASE_LEARNING_RATE,
    CHECKPOINT_PREFIX,
    EVENT_PREFIX,
    RESULTS_FILENAME,
    SUFFIX_KEY,
    FineTuningJobCheckpointList,
    FineTuningJobCheckpointOut,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobEventOut,
    FineTuningJobList,
    FineTuningJobOut,
    TuneforgeOptions,
    results_job_id,
    unix,
)
from api.routers.jobs import submit_job
from api.schemas import FileOut
from shared.db import beyond
from shared.errors import Conflict, InvalidRequest, NotFound, TuneforgeError
from shared.models import Checkpoint, Job, JobEvent, JobMetric, Team
from shared.schemas import LORA_METHODS, MAX_METADATA_KEYS, JobSpec
from shared.services import jobs as job_service
from shared.services.idempotency import PARAM as IDEMPOTENCY_PARAM
from shared.states import JobStatus
from shared.tenancy import TeamID

# The methods this surface shows: those that train an adapter on a dataset.
TRAINING_METHODS = tuple(sorted(m.value for m in LORA_METHODS))

# --------------------------------------------------------------------------------------- OpenAI's errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_SOURCES = ("body", "query", "path", "header", "form")
# Parts pydantic adds to an error's location for the union member it tried; they name no field.
_TYPE_TAGS = ("literal[", "constrained-", "function-", "list[", "dict[", "nullable[", "json-or-python[")
_PLAIN_TYPES = frozenset({"int", "float", "str", "bool", "none"})


def openai_error(
    status: int, code: str | None, message: str, param: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: Iterable[Any]) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p not in _SOURCES and not (isinstance(p, str) and (p.startswith(_TYPE_TAGS) or p in _PLAIN_TYPES))
    ]
    return ".".join(parts) or None


def _first_error(errors: list[Any]) -> tuple[str | None, str, str]:
    """(param, message, pydantic type) of the most useful error: for `"auto" | number` fields, pydantic
    reports both members; the literal's complaint ("should be 'auto'") says less than the number's."""
    ranked = sorted(errors, key=lambda e: e.get("type") == "literal_error" and len(errors) > 1)
    first = ranked[0]
    return _param(first.get("loc", ())), first.get("msg", "invalid"), first.get("type", "")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    param, message, kind = _first_error(errors) if errors else (None, "invalid request", "")
    if kind == "json_invalid":
        return openai_error(400, "invalid_json", "the request body is not valid JSON", None)
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(
        kind, "invalid_value"
    )
    return openai_error(400, code, f"{param}: {message}" if param else message, param)


def render_error(exc: Exception, request: Request) -> JSONResponse:
    """An error on this surface, in OpenAI's shape."""
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    status, code, message, param, headers = describe(exc, request)
    if isinstance(exc, TuneforgeError):
        status = 400 if status == 422 else status
        if status == 409 and exc.param != IDEMPOTENCY_PARAM:
            # A state conflict (cancelling a finished job) does not go away on retry; the client would
            # otherwise retry every 409. A busy Idempotency-Key does: the client may retry that.
            headers["x-should-retry"] = "false"
    return openai_error(status, code, message, param, headers)


class OpenAIRoute(APIRoute):
    """A route that answers its errors in OpenAI's shape; the native routes keep the app's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return render_error(exc, request)

        return route


router = APIRouter(
    prefix="/v1/fine_tuning", tags=["fine-tuning (OpenAI-compatible)"], route_class=OpenAIRoute
)

# ----------------------------------------------------------------------------------- request -> JobSpec

# JobSpec fields that the OpenAI body names differently; the rest come from the `tuneforge` field.
_OPENAI_NAMES = {"base_model": "model", "dataset": "training_file", "validation_dataset": "validation_file"}


class _Origins:
    """Where each JobSpec field came from in the OpenAI request, so that errors name what the caller sent."""

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}

    def name(self, param: str | None) -> str | None:
        if param is None:
            return None
        if param in self.exact:
            return self.exact[param]
        head, dot, rest = param.partition(".")
        if head in _OPENAI_NAMES:
            return _OPENAI_NAMES[head] + dot + rest
        if head in TuneforgeOptions.model_fields:
            return f"tuneforge.{param}"
        return param


def to_job_spec(body: FineTuningJobCreate) -> tuple[JobSpec, _Origins]:
    """Maps an OpenAI create request onto a JobSpec (see the module's docstring)."""
    origins = _Origins()
    options = body.tuneforge or TuneforgeOptions()
    if body.integrations:
        raise InvalidRequest(
            "integrations are not supported by Tuneforge; leave them out", param="integrations"
        )
    openai_hp, prefix = body.hyperparameters, "hyperparameters"
    if body.method is not None:
        kind = body.method.type
        if kind in ("dpo", "reinforcement"):
            raise InvalidRequest(
                f"method type {kind!r} is not available on Tuneforge; use 'supervised' (choose the PEFT method "
                "with extra_body tuneforge.method: lora, dora, rslora or qlora)",
                param="method.type",
                code="unsupported_method",
            )
        if kind != "supervised":
            raise InvalidRequest(f"unknown method type {kind!r}; use 'supervised'", param="method.type")
        for other in ("dpo", "reinforcement"):
            if getattr(body.method, other) is not None:
                raise InvalidRequest(
                    f"method.{other} applies only to method type {other}", param=f"method.{other}"
                )
        supervised = body.method.supervised.hyperparameters if body.method.supervised else None
        if supervised is not None:
            if openai_hp is not None:
                raise InvalidRequest(
                    "give hyperparameters in method.supervised.hyperparameters or in hyperparameters, not both",
                    param="hyperparameters",
                )
            openai_hp, prefix = supervised, "method.supervised.hyperparameters"

    hp: dict[str, Any] = dict(options.hyperparameters or {})
    for key in hp:
        origins.exact[f"hyperparameters.{key}"] = f"tuneforge.hyperparameters.{key}"

    def take(field: str, value: Any, openai_param: str, clashes: tuple[str, ...]) -> None:
        for clash in clashes:
            if clash in hp:
                raise InvalidRequest(
                    f"{openai_param} and tuneforge.hyperparameters.{clash} both set the {field}; give one",
                    param=f"tuneforge.hyperparameters.{clash}",
                )
        hp[field] = value
        origins.exact[f"hyperparameters.{field}"] = openai_param

    if openai_hp is not None:
        if openai_hp.n_epochs not in (None, "auto"):
            take("epochs", openai_hp.n_epochs, f"{prefix}.n_epochs", ("epochs", "max_steps"))
        if openai_hp.batch_size not in (None, "auto"):
            take("batch_size", openai_hp.batch_size, f"{prefix}.batch_size", ("batch_size",))
        multiplier = openai_hp.learning_rate_multiplier
        if multiplier not in (None, "auto"):
            learning_rate = BASE_LEARNING_RATE * float(multiplier)
            take("learning_rate", learning_rate, f"{prefix}.learning_rate_multiplier", ("learning_rate",))
    if body.seed is not None:
        take("seed", body.seed, "seed", ("seed",))

    metadata = dict(body.metadata or {})
    if SUFFIX_KEY in metadata:
        raise InvalidRequest(f"the metadata key {SUFFIX_KEY!r} is reserved for the suffix", param="metadata")
    if body.suffix is not None:
        if len(metadata) >= MAX_METADATA_KEYS:
            raise InvalidRequest(
                f"with a suffix, metadata takes at most {MAX_METADATA_KEYS - 1} keys (Tuneforge keeps the "
                "suffix in the job's metadata)",
                param="metadata",
            )
        metadata[SUFFIX_KEY] = body.suffix

    values: dict[str, Any] = {
        "base_model": body.model,
        "dataset": body.training_file,
        "validation_dataset": body.validation_file,
        "method": options.method,
        "adapter": options.adapter.model_dump() if options.adapter else None,
        "quantization": options.quantization.model_dump() if options.quantization else None,
        "hyperparameters": hp,
        "resources": options.resources.model_dump() if options.resources else None,
        "priority": options.priority,
        "metadata": metadata,
    }
    try:
        spec = JobSpec.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        param, message, _ = _first_error(list(exc.errors()))
        named = origins.name(param)
        raise InvalidRequest(f"{named}: {message}" if named else message, param=named) from exc
    return spec, origins


# -------------------------------------------------------------------------------------------- helpers


def team_label(session: Session, team: TeamID) -> str:
    """The team as it appears in fine-tuned model names: its name, made safe for a `:`-separated name."""
    found = session.get(Team, team)
    label = re.sub(r"[^A-Za-z0-9_.\-]+", "-", found.name if found else team).strip("-")
    return label or team


def get_training_job(session: Session, team: TeamID, job_id: str) -> Job:
    """A team's fine-tuning job; jobs of other methods (merge, fusion, export) are not shown here."""
    job = job_service.get_job(session=session, team_id=team, job_id=job_id)
    if job.method not in TRAINING_METHODS:
        raise NotFound(
            f"job {job_id} is a {job.method} job, not a fine-tuning job; read it at /v1/jobs/{job_id}",
            param="fine_tuning_job_id",
        )
    return job


def _cursor(value: str, prefix: str, pattern: str) -> re.Match[str]:
    match = re.fullmatch(re.escape(prefix) + pattern, value)
    if match is None:
        raise InvalidRequest(f"after: {value!r} is not an id this list returned", param="after")
    return match


def _metadata_filters(request: Request) -> list[tuple[str, str]]:
    """OpenAI's `metadata[key]=value` query filters."""
    found = []
    for name, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.{1,64})\]", name)
        if match:
            found.append((match.group(1), value))
    return found


# ------------------------------------------------------------------------------------------------ jobs


@router.post("/jobs", response_model=FineTuningJobOut)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response | FineTuningJobOut:
    """Creates a fine-tuning job (OpenAI's body; PEFT settings in the `tuneforge` field). It is checked,
    stored and queued like any Tuneforge job."""
    spec, origins = to_job_spec(body)
    try:
        created = submit_job(
            spec, request, session, settings, store, team, idempotency_key, endpoint="fine_tuning.jobs.create"
        )
    except TuneforgeError as exc:
        exc.param = origins.name(exc.param)
        raise
    if isinstance(created, Response):
        # The stored first answer is the native job; the replay shows the same job in this surface's shape.
        job = job_service.get_job(session=session, team_id=team, job_id=json.loads(bytes(created.body))["id"])
        out = FineTuningJobOut.of(job, team_label(session, team))
        return JSONResponse(out.model_dump(mode="json"), headers={"Idempotent-Replayed": "true"})
    return FineTuningJobOut.of(created, team_label(session, team))


@router.get("/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[str | None, Query(description="the id of the last job of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Lists the team's fine-tuning jobs, newest first (`metadata[key]=value` filters on metadata)."""
    query = select(Job).where(Job.team_id == team, Job.method.in_(TRAINING_METHODS))
    for key, value in _metadata_filters(request):
        query = query.where(Job.user_metadata[key].as_string() == value)
    if after is not None:
        anchor = session.execute(
            select(Job.created_at, Job.id).where(
                Job.id == after, Job.team_id == team, Job.method.in_(TRAINING_METHODS)
            )
        ).one_or_none()
        if anchor is None:
            raise InvalidRequest(f"after: no fine-tuning job {after!r} in your team", param="after")
        query = query.where(beyond(Job, anchor.created_at, anchor.id))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    label = team_label(session, team)
    return FineTuningJobList(
        data=[FineTuningJobOut.of(j, label) for j in jobs[:limit]], has_more=len(jobs) > limit
    )


@router.get("/jobs/{fine_tuning_job_id}", response_model=FineTuningJobOut)
def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, team: CallerTeam
) -> FineTuningJobOut:
    """Returns one fine-tuning job."""
    return FineTuningJobOut.of(get_training_job(session, team, fine_tuning_job_id), team_label(session, team))


@router.post("/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJobOut)
def cancel_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, team: CallerTeam
) -> FineTuningJobOut:
    """Cancels a job: a job that has not started is `cancelled` at once; a training one stays `running`
    (tuneforge.status `cancelling`) for the seconds its worker takes to stop, then is `cancelled`.
    A finished job answers 409."""
    get_training_job(session, team, fine_tuning_job_id)
    job = job_service.cancel_job(session=session, team_id=team, job_id=fine_tuning_job_id)
    session.commit()
    return FineTuningJobOut.of(job, team_label(session, team))


@router.get("/jobs/{fine_tuning_job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[
        str | None, Query(description="the id of the last event of the previous page: older events follow")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> FineTuningJobEventList:
    """Returns the job's events, newest first; `after` continues with the events older than that one."""
    job = get_training_job(session, team, fine_tuning_job_id)
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.id < int(_cursor(after, EVENT_PREFIX, r"([0-9]{1,18})").group(1)))
    events = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return FineTuningJobEventList(
        data=[FineTuningJobEventOut.of(e) for e in events[:limit]], has_more=len(events) > limit
    )


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    team: CallerTeam,
    after: Annotated[
        str | None, Query(description="the id of the last checkpoint of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    """Returns the job's stored checkpoints, latest step first. Each is a complete, resumable training state
    (download it at `download_url`); the job's final adapter is its artifact, not a checkpoint."""
    job = get_training_job(session, team, fine_tuning_job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after is not None:
        anchor = session.scalar(
            select(Checkpoint.step).where(
                Checkpoint.job_id == job.id,
                Checkpoint.id == int(_cursor(after, CHECKPOINT_PREFIX, r"([0-9]{1,18})").group(1)),
            )
        )
        if anchor is None:
            raise InvalidRequest(f"after: job {job.id} has no checkpoint {after!r}", param="after")
        query = query.where(Checkpoint.step < anchor)
    checkpoints = list(session.scalars(query.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    page = checkpoints[:limit]
    # The eval loss at these checkpoints' steps only (a long job has many thousand metric rows).
    valid = dict(
        session.execute(
            select(JobMetric.step, JobMetric.loss).where(
                JobMetric.job_id == job.id,
                JobMetric.split == "eval",
                JobMetric.step.in_([c.step for c in page]),
            )
        ).all()
    )
    label = team_label(session, team)
    return FineTuningJobCheckpointList(
        data=[FineTuningJobCheckpointOut.of(c, job, label, valid.get(c.step)) for c in page],
        has_more=len(checkpoints) > limit,
    )


# -------------------------------------------------------------------------------------- results files

RESULTS_COLUMNS = (
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "epoch",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "num_tokens",
)


def results_csv(session: Session, job: Job) -> tuple[bytes, int]:
    """A job's metrics as OpenAI's results CSV (step, train_loss, train_accuracy, valid_loss,
    valid_mean_token_accuracy; accuracies are not measured here and stay empty), with Tuneforge's own
    columns after them. Returns the bytes and the number of rows."""
    curves = job_service.get_metrics(session=session, team_id=TeamID(job.team_id), job_id=job.id)
    rows: dict[int, dict[str, Any]] = {}
    for point in curves["train"]:
        rows.setdefault(point.step, {}).update(
            train_loss=point.loss,
            epoch=point.epoch,
            learning_rate=point.learning_rate,
            grad_norm=point.grad_norm,
            tokens_per_second=point.tokens_per_second,
            num_tokens=point.num_tokens,
        )
    for point in curves["eval"]:
        rows.setdefault(point.step, {})["valid_loss"] = point.loss
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULTS_COLUMNS)
    for step in sorted(rows):
        values = {"step": step, **rows[step]}
        writer.writerow(["" if values.get(c) is None else values[c] for c in RESULTS_COLUMNS])
    return out.getvalue().encode(), len(rows)


def find_results_file(session: Session, team: TeamID, file_id: str) -> tuple[FileOut, bytes] | None:
    """A succeeded job's results file (made from its metrics when asked, never stored), or None when
    `file_id` is not a results file id. /v1/files serves it; it is not listed there and cannot be deleted."""
    job = results_job(session, team, file_id)
    if job is None:
        return None
    content, num_rows = results_csv(session, job)
    record = FileOut(
        id=file_id,
        bytes=len(content),
        created_at=unix(job.finished_at or job.updated_at),
        filename=RESULTS_FILENAME,
        purpose="fine-tune-results",
        sha256=hashlib.sha256(content).hexdigest(),
        format="csv",
        num_samples=num_rows,
    )
    return record, content


def results_job(session: Session, team: TeamID, file_id: str) -> Job | None:
    """The succeeded job whose results file `file_id` names, or None when it is no results file id; 404 when
    it names no such job of the team."""
    job_id = results_job_id(file_id)
    if job_id is None:
        return None
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team))
    if job is None or job.method not in TRAINING_METHODS or job.status != JobStatus.succeeded:
        raise NotFound(f"file {file_id} not found", param="file_id")
    return job


def refuse_results_file_delete(session: Session, team: TeamID, file_id: str) -> None:
    """A results file is made from its job's metrics, never stored: it cannot be deleted (404 if the team
    has no such job)."""
    if results_job(session, team, file_id) is not None:
        raise Conflict(
            f"{file_id} is a job's results file; it is made from the job's metrics and cannot be deleted",
            param="file_id",
        )
