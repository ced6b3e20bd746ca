"""What operators watch: job counts and run times for /metrics, and whether the service's dependencies
answer for /readyz. Read at request time from the database, the broker and storage, so every API replica
reports the same."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kombu import Connection
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from shared.models import Job, Node
from shared.settings import Settings
from shared.states import ACTIVE, TERMINAL, JobStatus
from shared.storage import ObjectStore

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0)


@dataclass(frozen=True)
class JobStatistics:
    by_status: dict[str, int]
    failures: list[tuple[str | None, int]]  # error code, count
    # Finished jobs whose run time is at most each of DURATION_BUCKETS, then their count and total seconds.
    runtime_buckets: list[int]
    finished: int
    finished_seconds: float
    heartbeats: list[tuple[str, datetime | None]]  # running (cancelling, pausing) job, last heartbeat
    # Each node worker: id, host, its GPUs, how many are busy, its last heartbeat.
    nodes: list[tuple[str, str, int, int, datetime]]


def job_statistics(*, session: Session) -> JobStatistics:
    """Counts of jobs by status and failures by code, the run-time histogram of finished jobs, and the last
    heartbeat of every running one."""
    by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    failures = session.execute(
        select(Job.error_code, func.count())
        .where(Job.status == JobStatus.failed.value)
        .group_by(Job.error_code)
    ).all()
    *buckets, finished, seconds = session.execute(
        select(
            *[func.sum(case((Job.runtime_seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS],
            func.count(),
            func.coalesce(func.sum(Job.runtime_seconds), 0.0),
        ).where(Job.status.in_([s.value for s in TERMINAL]), Job.started_at.is_not(None))
    ).one()
    heartbeats = session.execute(
        select(Job.id, Job.heartbeat_at).where(Job.status.in_([s.value for s in ACTIVE]))
    ).all()
    nodes = session.execute(
        select(Node.id, Node.host, Node.total_gpus, Node.busy_gpus, Node.heartbeat_at).order_by(Node.id)
    ).all()
    return JobStatistics(
        by_status=by_status,
        failures=[(code, count) for code, count in failures],
        runtime_buckets=[int(count or 0) for count in buckets],
        finished=int(finished),
        finished_seconds=float(seconds),
        heartbeats=[(job_id, beat) for job_id, beat in heartbeats],
        nodes=[(node_id, host, total, len(busy or []), beat) for node_id, host, total, busy, beat in nodes],
    )


def readiness(*, session: Session, settings: Settings, store: ObjectStore) -> dict[str, str]:
    """Whether the database, object storage and the broker answer: "ok" or the error, by name."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        store.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {exc}"
    try:
        if settings.broker_url.startswith("filesystem"):
            if not settings.broker_folder.is_dir():
                raise RuntimeError(f"broker folder {settings.broker_folder} is missing")
        else:
            with Connection(settings.broker_url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    return checks
