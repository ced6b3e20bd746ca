"""Database tables (SQLAlchemy 2, typed). The schema changes only through Alembic migrations."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

DEFAULT_TEAM_ID = "team-default"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone, so it is put back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Returns a fresh public id such as `ftjob-3f9c…` (24 hex digits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Limits for this team; none means the deployment's defaults.
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    # Jobs of the team running now and the GPUs they hold (a claim adds, the end of an attempt takes back).
    running_jobs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running_gpus: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class UploadedFile(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_team_created", "team_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    num_samples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When a read found the stored bytes no longer match sha256: they are never served again.
    damaged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


QUEUED_ONLY = text("status = 'queued'")
HELD_ONLY = text("ended_at IS NULL")
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
# The artifact kind of a checkpoint's files.
CHECKPOINT_KIND = "checkpoint"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        # A team's jobs of one status, newest first: the filtered list and the count of waiting jobs.
        Index("ix_jobs_team_status_created", "team_id", "status", "created_at", "id"),
        # The claim's candidates: each team's queued jobs in priority, then age order.
        Index(
            "ix_jobs_queued_team_rank",
            "team_id",
            "priority_rank",
            "created_at",
            "id",
            postgresql_where=QUEUED_ONLY,
            sqlite_where=QUEUED_ONLY,
        ),
        # A queued job's position: the queued jobs before it by priority, then age.
        Index(
            "ix_jobs_queued_rank",
            "priority_rank",
            "created_at",
            postgresql_where=QUEUED_ONLY,
            sqlite_where=QUEUED_ONLY,
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    status: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(255))
    dataset_uri: Mapped[str | None] = mapped_column(String(2048))  # none for merge and export jobs
    validation_uri: Mapped[str | None] = mapped_column(String(2048))
    # The full validated JobSpec, defaults filled in; the columns above are copies for filtering.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    # What the claim ranks and filters on (copies of the spec): 0 high, 1 normal, 2 low; GPUs in all; nodes.
    priority_rank: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # A job that waited too long for more GPUs than were free: the node holding them back for it, and since.
    reserved_for: Mapped[str | None] = mapped_column(String(255))
    reserved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when a higher-priority job needs this one's GPUs: it checkpoints and goes back to the queue.
    preempt_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    user_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)

    # Attempt number of the current (or last) claim; writes from any other attempt are refused.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the broker was last given this job; the sweeper re-sends jobs the broker lost.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A retry waits until then (growing back-off).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Seconds spent running over all finished attempts (the run-time limit counts them all).
    runtime_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # Validation runs that broke unexpectedly; past the limit the job fails instead of being re-sent.
    validation_tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # What the checks before queueing found: dataset statistics, parameter counts, the memory estimate.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # sha256 of each dataset (by parameter) as validation read it; every attempt checks its copy against it.
    input_digests: Mapped[dict[str, str] | None] = mapped_column(JSONType)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", order_by="Artifact.name")


class Attempt(Base):
    """One run of a job: where it ran (host, GPU indices), with which launcher, how it ended, and the
    GPU-seconds charged to its team so far. An attempt holds its GPUs until `ended_at` is set."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
        Index("ix_attempts_held_team", "team_id", postgresql_where=HELD_ONLY, sqlite_where=HELD_ONLY),
        Index("ix_attempts_held_worker", "worker_id", postgresql_where=HELD_ONLY, sqlite_where=HELD_ONLY),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    number: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    gpu_indices: Mapped[list[int]] = mapped_column(JSONType)
    gpus: Mapped[int] = mapped_column(Integer)
    launcher: Mapped[str] = mapped_column(String(16))  # process | torchrun | ray
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(16))  # the job's status when the attempt ended
    charged_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # The output of its training processes: bytes shipped so far (live chunks while it runs), and once it
    # ended, the object holding all of it (its first log_max_bytes; log_truncated when there was more).
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    log_key: Mapped[str | None] = mapped_column(String(1024))
    log_sha256: Mapped[str | None] = mapped_column(String(64))
    log_truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AttemptLogChunk(Base):
    """A piece of a running attempt's output at byte `offset` of its log; the chunks of an attempt are removed
    once its whole log is in object storage."""

    __tablename__ = "attempt_log_chunks"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "offset", name="uq_attempt_log_chunks_offset"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Node(Base):
    """A node worker: its GPUs, which of them are busy, and when it last checked in."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the worker id
    host: Mapped[str] = mapped_column(String(255))
    total_gpus: Mapped[int] = mapped_column(Integer)
    busy_gpus: Mapped[list[int]] = mapped_column(JSONType)
    ray_driver: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GpuUsage(Base):
    """GPU-seconds a team used in one minute: the fair share ranks teams by their sum over a sliding window."""

    __tablename__ = "gpu_usage"
    __table_args__ = (Index("ix_gpu_usage_minute", "minute"),)

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), primary_key=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "split", "step", name="uq_job_metrics_job_split_step"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # The attempt that wrote this point, and when (a resumed attempt rewrites the steps it repeats).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    split: Mapped[str] = mapped_column(String(8))  # train | eval
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    num_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind", "name", name="uq_artifacts_job_kind_name"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    kind: Mapped[str] = mapped_column(String(16))  # adapter | checkpoint | merged
    name: Mapped[str] = mapped_column(String(512))  # path inside the artifact directory
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When a read found the stored bytes no longer match sha256: they are never served again.
    damaged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Plan(Base):
    """A dry run: the checks a job would get before queueing, without the job."""

    __tablename__ = "plans"
    __table_args__ = (Index("ix_plans_team_created", "team_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    status: Mapped[str] = mapped_column(String(16))  # pending | ready | refused | failed
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    """A complete training state in object storage (its files are artifacts of kind `checkpoint`)."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    prefix: Mapped[str] = mapped_column(String(1024))  # artifact names start with it: step-00000010/
    num_files: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """A team's API key, stored as an HMAC of the secret (the key is shown once, when created)."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_team", "team_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # the key's public part, for lookup
    digest: Mapped[str] = mapped_column(String(64))  # HMAC-SHA256(secret_key, key)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(Base):
    """The first answer to a request carrying an Idempotency-Key, replayed for its retries."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("team_id", "endpoint", "key", name="uq_idempotency_team_endpoint_key"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)  # none while the first request is in progress
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Webhook(Base):
    """A URL a team wants told about its jobs' terminal states (payloads signed with the secret)."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_team", "team_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event for one webhook, retried with back-off until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "job_id", "event", name="uq_webhook_deliveries_once"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
