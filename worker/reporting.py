"""The one writer of an attempt: every database write that the worker and its training process make for a job
(status moves, events, metrics, checkpoints, results) goes through an AttemptWriter, fenced by the attempt
number and retried while the database restarts.

Fencing: each write first reads the job's attempt number under a share lock, so a claim by another attempt
waits for the write to finish or finds it done; a write from an attempt that no longer owns the job is
refused (and the writer remembers that its attempt lost the job).

In the training process the writer runs in the background (`start_background`): events and metric points are
queued by the training loop, which never waits for the database, and a thread writes them in batches, each
batch one fenced transaction, in the order they came. While the database is away the batch is kept and tried
again; `flush` waits until everything queued is written.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
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
# The background writer writes at most this often, so a training loop's points go in batches: each write is a
# transaction whose CPU time (a few ms) the training steps share the cores with. Once a second, as the training
# output is shipped (log_ship_interval_seconds); flush() and flush_queued() do not wait for it.
BATCH_INTERVAL_SECONDS = 1.0
# How long a process that exits without flushing waits for what it queued to be written.
EXIT_FLUSH_SECONDS = 5.0
# An event or a metric point, queued for the background writer.
Entry = tuple[str, dict[str, Any]]


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
        # The background writer's queue, its wake-up and the batch it is writing (None: not started).
        self._queue: list[Entry] | None = None
        self._changed = threading.Condition()
        self._writing: list[Entry] = []
        self._error: BaseException | None = None
        self._hurry = False
        self._thread: threading.Thread | None = None
        # Entries queued and entries written (or given up on) so far: written in order, so everything queued
        # before a moment is written once the second count reaches the first's value at that moment.
        self._queued_total = 0
        self._written_total = 0

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
        """Appends an event to the job's log (queued when the writer runs in the background)."""
        entry = {"type": type, "message": message, "level": level, "data": data}
        if self._enqueue(("event", entry)):
            return
        self.write(lambda session: self._record_event(session, entry), "an event")

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
        """Records one logged step (queued when the writer runs in the background). While the database is away
        the points are kept and written with the next one: none is dropped."""
        if self._enqueue(("metric", {"split": split, "step": step, "values": values})):
            return
        self._pending.append((split, step, values))
        pending, self._pending = self._pending, []
        try:
            self.write(lambda session: self._record(session, pending), "metrics", retry_for=0)
        except (OperationalError, InterfaceError):
            log.warning("could not write metrics of job %s; keeping them for the next write", self.job_id)
            self._pending = pending + self._pending

    def flush(self, timeout: float = RETRY_SECONDS) -> None:
        """Writes everything kept or queued, waiting for the database up to `timeout` seconds; raises the
        database's last error if it could not."""
        if self._queue is None:
            if self._pending:
                pending, self._pending = self._pending, []
                self.write(
                    lambda session: self._record(session, pending), "buffered metrics", retry_for=timeout
                )
            return
        deadline = time.monotonic() + timeout
        with self._changed:
            self._hurry = True
            self._changed.notify_all()
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    kept = len(self._queue) + len(self._writing)
                    raise self._error or TimeoutError(f"{kept} events and metric points are still unwritten")
                self._changed.wait(min(left, 0.5))

    def flush_queued(self, timeout: float = RETRY_SECONDS) -> None:
        """Waits until everything queued before this call is written (what is queued meanwhile may still wait:
        a training loop that keeps logging does not hold the caller up); raises like `flush`."""
        if self._queue is None:
            self.flush(timeout)
            return
        deadline = time.monotonic() + timeout
        with self._changed:
            target = self._queued_total
            self._hurry = True
            self._changed.notify_all()
            while self._written_total < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = target - self._written_total
                    raise self._error or TimeoutError(
                        f"{missing} events and metric points are still unwritten"
                    )
                self._changed.wait(min(left, 0.5))

    def start_background(self) -> None:
        """From now on events and metric points are queued and written by a thread of this writer."""
        if self._thread is not None:
            return
        self._queue = []
        self._thread = threading.Thread(target=self._write_queued, name="attempt-writer", daemon=True)
        self._thread.start()
        # A process that ends without flushing (a crash) still writes what it queued, if the database answers.
        atexit.register(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        try:
            self.flush(timeout=EXIT_FLUSH_SECONDS)
        except Exception:
            log.warning("events and metrics of job %s were left unwritten at exit", self.job_id)

    def _enqueue(self, entry: Entry) -> bool:
        if self._queue is None:
            return False
        with self._changed:
            self._queue.append(entry)
            self._queued_total += 1
            self._changed.notify_all()
        return True

    def _write_queued(self) -> None:
        delay = 0.5
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                assert self._queue is not None
                self._writing, self._queue[:] = list(self._queue), []
                self._hurry = False
            batch = self._writing
            pause = BATCH_INTERVAL_SECONDS
            try:
                self.write(
                    lambda session, batch=batch: self._record_entries(session, batch),
                    "events and metrics",
                    retry_for=0,
                )
                delay, self._error = 0.5, None
                done = len(batch)
            except (OperationalError, InterfaceError) as exc:
                # The database is away: keep the batch, in front of whatever came since, and try again.
                log.warning("could not write events and metrics of job %s (%s); retrying", self.job_id, exc)
                with self._changed:
                    assert self._queue is not None
                    self._queue[:0] = batch
                    self._error = exc
                pause, delay = delay, min(2 * delay, 5.0)
                done = 0
            except Exception:
                log.exception("events and metrics of job %s could not be written; dropped", self.job_id)
                done = len(batch)
            with self._changed:
                self._writing = []
                self._written_total += done
                self._changed.notify_all()
                # Wait a little for more to batch with, unless someone flushes.
                self._changed.wait_for(lambda: self._hurry, timeout=pause)

    def _record_entries(self, session: Session, entries: list[Entry]) -> None:
        for kind, entry in entries:
            if kind == "event":
                self._record_event(session, entry)
            else:
                self._record(session, [(entry["split"], entry["step"], entry["values"])])

    def _record_event(self, session: Session, entry: dict[str, Any]) -> None:
        job_service.add_event(session=session, job_id=self.job_id, attempt=self.attempt, **entry)

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
