"""Writes what a training process observes (events, metrics, checkpoints) to the database and storage,
for one attempt only: once another attempt owns the job, every write is refused."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import Checkpoint, Job
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "checkpoint"


def checkpoint_prefix(step: int) -> str:
    return f"step-{step:08d}"


class AttemptWriter:
    """The database writes of one attempt, fenced by its attempt number and retried through short outages."""

    def __init__(
        self, settings: Settings, job_id: str, attempt: int, on_lost: Callable[[], None] = lambda: None
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._pending: list[tuple[str, int, dict[str, Any]]] = []

    def _owns_job(self, session: Session) -> bool:
        owner = session.scalar(select(Job.attempt).where(Job.id == self.job_id))
        if owner != self.attempt:
            self.lost.set()
            self.on_lost()
            return False
        return True

    def _write(self, what: str, action: Callable[[Session], None], *, retry_for: float) -> bool:
        """Runs a fenced write; retries while the database is unreachable, up to `retry_for` seconds."""
        deadline = time.monotonic() + retry_for
        delay = 0.5
        while True:
            try:
                with session_scope(self.settings.database_url) as session:
                    if not self._owns_job(session):
                        return False
                    action(session)
                return True
            except Exception:
                if time.monotonic() >= deadline:
                    log.exception("could not write %s for job %s", what, self.job_id)
                    raise
                log.warning("writing %s for job %s failed; retrying in %.1fs", what, self.job_id, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        self._write(
            "an event",
            lambda session: job_service.add_event(
                session=session,
                job_id=self.job_id,
                type=type,
                message=message,
                level=level,
                attempt=self.attempt,
                data=data,
            ),
            retry_for=60,
        )

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        # Metrics are buffered while the database is away and written when it is back: none is dropped.
        self._pending.append((split, step, values))
        pending, self._pending = self._pending, []

        def write(session: Session) -> None:
            for p_split, p_step, p_values in pending:
                job_service.record_metric(
                    session=session,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    split=p_split,
                    step=p_step,
                    values=p_values,
                )

        try:
            self._write("metrics", write, retry_for=0)
        except Exception:
            self._pending = pending + self._pending

    def flush(self) -> None:
        """Writes buffered metrics, waiting up to a minute for the database."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write(
                "buffered metrics",
                lambda session: [
                    job_service.record_metric(
                        session=session, job_id=self.job_id, attempt=self.attempt, split=a, step=b, values=c
                    )
                    for a, b, c in pending
                ],
                retry_for=60,
            )


class CheckpointStore:
    """Uploads a checkpoint folder, then records it; a checkpoint is listed only once every file is stored."""

    def __init__(self, settings: Settings, store: ObjectStore, writer: AttemptWriter, team_id: str) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.team_id = team_id

    def save(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        prefix = checkpoint_prefix(step)
        job_id = self.writer.job_id
        stored = self.store.put_tree(f"artifacts/{self.team_id}/{job_id}/checkpoints/{prefix}", folder)
        names = [
            f"{prefix}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*")) if p.is_file()
        ]

        def record(session: Session) -> None:
            job = session.get(Job, job_id)
            assert job is not None
            old = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
            )
            if old is not None:  # a resumed attempt saved the same step again: the new files replace it
                job_service.delete_artifacts(
                    session=session, job_id=job_id, kind=CHECKPOINT_KIND, prefix=prefix
                )
                session.delete(old)
                session.flush()
            job_service.record_artifacts(
                session=session, job=job, kind=CHECKPOINT_KIND, stored=zip(names, stored, strict=True)
            )
            session.add(
                Checkpoint(
                    job_id=job_id,
                    attempt=self.writer.attempt,
                    step=step,
                    prefix=prefix,
                    num_files=len(stored),
                    size_bytes=sum(s.size for s in stored),
                    metrics=metrics,
                )
            )
            job_service.add_event(
                session=session,
                job_id=job_id,
                type="checkpoint",
                message=f"checkpoint at step {step} stored ({len(stored)} files)",
                attempt=self.writer.attempt,
                data={"step": step},
            )

        self.writer._write("a checkpoint", record, retry_for=60)
