"""The one writer of an attempt: every database write that the worker and its training process make for a job
(status moves, events, metrics, checkpoints, results) goes through an AttemptWriter, fenced by the attempt
number and retried while the database restarts.

Fencing: each write first reads the job's attempt number under a share lock, so a claim by another attempt
waits for the write to finish or finds it done; a write from an attempt that no longer owns the job is
refused (and the writer remembers that its attempt lost the job).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.db import retry_transient, session_scope
from shared.models import Job
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import ACTIVE, JobStatus
from shared.storage import PatientStore, StorageError, make_store

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a write waits for a restarting database before it gives up.
RETRY_SECONDS = 60.0


def patient_store(settings: Settings, writer: AttemptWriter) -> PatientStore:
    """The deployment's object storage for one attempt: an outage is retried for `storage_patience_seconds`,
    each retry an event on the job, then the operation fails with StorageUnavailable."""

    def told(what: str, retry: int, retries: int, error: StorageError, wait: float) -> None:
        log.warning("object storage unreachable while %s (%s); retry %d of %d", what, error, retry, retries)
        try:
            writer.event(
                "storage",
                f"object storage unreachable, retrying ({retry} of {retries}): {what} failed ({error}); "
                f"next try in {wait:.0f}s",
                level="warning",
                data={"retry": retry, "retries": retries, "operation": what},
            )
        except Exception:  # the database may be away too; the retries go on regardless
            log.warning("could not record the storage retry of job %s", writer.job_id, exc_info=True)

    return PatientStore(
        make_store(settings), patience_seconds=settings.storage_patience_seconds, on_retry=told
    )


class AttemptWriter:
    """The database writes of one attempt of one job."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.lost = threading.Event()
        self._pending: list[tuple[str, int, dict[str, Any]]] = []

    def write(
        self, action: Callable[[Session], T], what: str, *, retry_for: float = RETRY_SECONDS
    ) -> T | None:
        """Runs `action` in a transaction of its own if this attempt still owns the job; returns its result,
        or None (and sets `lost`) when another attempt owns the job."""

        def fenced() -> T | None:
            with session_scope(self.settings.database_url) as session:
                owner = session.scalar(
                    select(Job.attempt).where(Job.id == self.job_id).with_for_update(read=True)
                )
                if owner != self.attempt:
                    self.lost.set()
                    return None
                return action(session)

        return retry_transient(fenced, retry_for=retry_for, what=f"{what} (job {self.job_id})")

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        """Appends an event to the job's log."""
        self.write(
            lambda session: job_service.add_event(
                session=session,
                job_id=self.job_id,
                type=type,
                message=message,
                level=level,
                attempt=self.attempt,
                data=data,
            ),
            "an event",
        )

    def move(self, to: JobStatus, message: str, **values: object) -> bool:
        """Moves the job to `to`, only from a status this attempt holds it in (running or cancelling): if the
        reaper already handed the job back (same attempt number, now queued), nothing changes."""
        moved = self.write(
            lambda session: job_service.transition(
                session=session,
                job_id=self.job_id,
                to=to,
                attempt=self.attempt,
                from_=ACTIVE,
                message=message,
                **values,
            ),
            f"the move to {to.value}",
        )
        return bool(moved)

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        """Records one logged step. While the database is away the points are kept and written with the next
        one: none is dropped."""
        self._pending.append((split, step, values))
        pending, self._pending = self._pending, []
        try:
            self.write(lambda session: self._record(session, pending), "metrics", retry_for=0)
        except (OperationalError, InterfaceError):
            log.warning("could not write metrics of job %s; keeping them for the next write", self.job_id)
            self._pending = pending + self._pending

    def flush(self) -> None:
        """Writes the metric points kept while the database was away, waiting for it up to a minute."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.write(lambda session: self._record(session, pending), "buffered metrics")

    def _record(self, session: Session, points: list[tuple[str, int, dict[str, Any]]]) -> None:
        for split, step, values in points:
            job_service.record_metric(
                session=session,
                job_id=self.job_id,
                attempt=self.attempt,
                split=split,
                step=step,
                values=values,
            )
