"""Reads for the OpenAI-compatible surface (/v1/fine_tuning): a team's fine-tuning jobs, newest first, with
OpenAI's cursors; their events and checkpoints; and each succeeded job's results file (a CSV of its metrics,
made on request, never stored, served through /v1/files)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import beyond
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.models import Checkpoint, Job, JobEvent, JobMetric, Team
from shared.schemas import LORA_METHODS
from shared.services.jobs import cancel_job, get_job, get_metrics
from shared.services.pausing import pause_job, resume_job
from shared.settings import Settings
from shared.states import JobStatus
from shared.tenancy import TeamID

# The methods this surface shows: those that train an adapter on a dataset.
TRAINING_METHODS = tuple(sorted(m.value for m in LORA_METHODS))
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
RESULTS_FILE_PREFIX = "file-results-"
RESULTS_FILE = re.compile(r"^file-results-([0-9a-f]{24})$")
RESULTS_FILENAME = "step_metrics.csv"
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


def team_label(*, session: Session, team_id: TeamID) -> str:
    """The team as it appears in fine-tuned model names: its name, made safe for a `:`-separated name."""
    found = session.get(Team, team_id)
    label = re.sub(r"[^A-Za-z0-9_.\-]+", "-", found.name if found else team_id).strip("-")
    return label or team_id


def get_training_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """A team's fine-tuning job; jobs of other methods (merge, fusion, export) are not shown here."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    if job.method not in TRAINING_METHODS:
        raise NotFound(
            f"job {job_id} is a {job.method} job, not a fine-tuning job; read it at /v1/jobs/{job_id}",
            param="fine_tuning_job_id",
        )
    return job


def cancel_training_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """Cancels a fine-tuning job (see jobs.cancel_job) and commits."""
    get_training_job(session=session, team_id=team_id, job_id=job_id)
    job = cancel_job(session=session, team_id=team_id, job_id=job_id)
    session.commit()
    return job


def pause_training_job(*, session: Session, team_id: TeamID, job_id: str) -> Job:
    """Pauses a fine-tuning job (see pausing.pause_job) and commits."""
    get_training_job(session=session, team_id=team_id, job_id=job_id)
    job = pause_job(session=session, team_id=team_id, job_id=job_id)
    session.commit()
    return job


def resume_training_job(*, session: Session, settings: Settings, team_id: TeamID, job_id: str) -> Job:
    """Resumes a paused fine-tuning job (see pausing.resume_job) and commits."""
    get_training_job(session=session, team_id=team_id, job_id=job_id)
    job = resume_job(session=session, settings=settings, team_id=team_id, job_id=job_id)
    session.commit()
    return job


def _cursor(value: str, prefix: str) -> int:
    match = re.fullmatch(re.escape(prefix) + r"([0-9]{1,18})", value)
    if match is None:
        raise InvalidRequest(f"after: {value!r} is not an id this list returned", param="after")
    return int(match.group(1))


def list_training_jobs(
    *,
    session: Session,
    team_id: TeamID,
    after: str | None,
    limit: int,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[list[Job], bool]:
    """A page of the team's fine-tuning jobs, newest first, after the job `after`, matching every
    (key, value) of `metadata`; and whether more follow."""
    query = select(Job).where(Job.team_id == team_id, Job.method.in_(TRAINING_METHODS))
    for key, value in metadata:
        query = query.where(Job.user_metadata[key].as_string() == value)
    if after is not None:
        anchor = session.execute(
            select(Job.created_at, Job.id).where(
                Job.id == after, Job.team_id == team_id, Job.method.in_(TRAINING_METHODS)
            )
        ).one_or_none()
        if anchor is None:
            raise InvalidRequest(f"after: no fine-tuning job {after!r} in your team", param="after")
        query = query.where(beyond(Job, anchor.created_at, anchor.id))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return jobs[:limit], len(jobs) > limit


def list_training_events(
    *, session: Session, team_id: TeamID, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """A fine-tuning job's events, newest first; `after` (an event id this list returned) continues with
    older ones. Also returns whether more follow."""
    job = get_training_job(session=session, team_id=team_id, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.id < _cursor(after, EVENT_PREFIX))
    events = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return events[:limit], len(events) > limit


@dataclass(frozen=True)
class CheckpointPage:
    job: Job
    checkpoints: list[Checkpoint]
    eval_loss: dict[int, float | None]  # by step, for the checkpoints of this page
    has_more: bool


def list_training_checkpoints(
    *, session: Session, team_id: TeamID, job_id: str, after: str | None, limit: int
) -> CheckpointPage:
    """A fine-tuning job's checkpoints, latest step first, with the eval loss at each one's step."""
    job = get_training_job(session=session, team_id=team_id, job_id=job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after is not None:
        anchor = session.scalar(
            select(Checkpoint.step).where(
                Checkpoint.job_id == job.id, Checkpoint.id == _cursor(after, CHECKPOINT_PREFIX)
            )
        )
        if anchor is None:
            raise InvalidRequest(f"after: job {job.id} has no checkpoint {after!r}", param="after")
        query = query.where(Checkpoint.step < anchor)
    checkpoints = list(session.scalars(query.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    page = checkpoints[:limit]
    # The eval loss at these checkpoints' steps only (a long job has many thousand metric rows).
    eval_loss = dict(
        session.execute(
            select(JobMetric.step, JobMetric.loss).where(
                JobMetric.job_id == job.id,
                JobMetric.split == "eval",
                JobMetric.step.in_([c.step for c in page]),
            )
        ).all()
    )
    return CheckpointPage(job, page, eval_loss, len(checkpoints) > limit)


# ------------------------------------------------------------------------------------------ results files


def results_file_id(job_id: str) -> str:
    """The id of a finished job's results file (a CSV of its metrics, made on request, never stored)."""
    return RESULTS_FILE_PREFIX + job_id.removeprefix("ftjob-")


def results_job_id(file_id: str) -> str | None:
    """The job whose results file `file_id` is, or None when it is not a results file id."""
    match = RESULTS_FILE.match(file_id)
    return f"ftjob-{match.group(1)}" if match else None


@dataclass(frozen=True)
class ResultsFile:
    """A succeeded job's metrics as OpenAI's results CSV."""

    id: str
    filename: str
    content: bytes
    sha256: str
    num_rows: int
    created_at: datetime


def results_csv(session: Session, job: Job) -> tuple[bytes, int]:
    """A job's metrics as OpenAI's results CSV (step, train_loss, train_accuracy, valid_loss,
    valid_mean_token_accuracy; accuracies are not measured here and stay empty), with Tuneforge's own
    columns after them. Returns the bytes and the number of rows."""
    curves = get_metrics(session=session, team_id=TeamID(job.team_id), job_id=job.id)
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


def _results_job(session: Session, team_id: TeamID, file_id: str) -> Job | None:
    """The succeeded job whose results file `file_id` names, or None when it is no results file id; 404 when
    it names no such job of the team."""
    job_id = results_job_id(file_id)
    if job_id is None:
        return None
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team_id))
    if job is None or job.method not in TRAINING_METHODS or job.status != JobStatus.succeeded:
        raise NotFound(f"file {file_id} not found", param="file_id")
    return job


def find_results_file(*, session: Session, team_id: TeamID, file_id: str) -> ResultsFile | None:
    """A succeeded job's results file, or None when `file_id` is not a results file id (404 when it is one
    but names no succeeded fine-tuning job of the team)."""
    job = _results_job(session, team_id, file_id)
    if job is None:
        return None
    content, num_rows = results_csv(session, job)
    return ResultsFile(
        id=file_id,
        filename=RESULTS_FILENAME,
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        num_rows=num_rows,
        created_at=job.finished_at or job.updated_at,
    )


def refuse_results_file_delete(*, session: Session, team_id: TeamID, file_id: str) -> None:
    """A results file is made from its job's metrics, never stored: it cannot be deleted (404 if the team
    has no such job)."""
    if _results_job(session, team_id, file_id) is not None:
        raise Conflict(
            f"{file_id} is a job's results file; it is made from the job's metrics and cannot be deleted",
            param="file_id",
        )
