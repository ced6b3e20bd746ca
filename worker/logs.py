"""Job logs: what an attempt's training processes print (work_dir/training.log, every rank and the launcher).

While the attempt runs, a thread ships each new piece of the file to the database (attempt_log_chunks, fenced
by the attempt like every other write), so the API can tail and follow it from any host. When the attempt ends
the whole log is stored in object storage (`logs/<team>/<job>/attempt-<n>.log`, with its sha256) and its
chunks are dropped. A log longer than `log_max_bytes` keeps its beginning and is marked truncated; a log that
could not be stored stays readable from its chunks.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from shared.models import Attempt, AttemptLogChunk
from shared.storage import StorageError, make_store
from worker.reporting import AttemptWriter

log = logging.getLogger(__name__)
# The most one database row holds.
CHUNK_BYTES = 256 * 1024


def log_key(team_id: str, job_id: str, attempt: int) -> str:
    return f"logs/{team_id}/{job_id}/attempt-{attempt}.log"


class LogShipper:
    """Ships one attempt's training output while it runs, and stores it when it ends."""

    def __init__(self, writer: AttemptWriter, path: Path, *, max_bytes: int, interval: float) -> None:
        self.writer = writer
        self.path = path
        self.max_bytes = max_bytes
        self.interval = interval
        self.shipped = 0
        self.truncated = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> LogShipper:
        self._thread = threading.Thread(target=self._run, name=f"logs-{self.writer.job_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.ship()
            except Exception:  # the database is away: the bytes stay in the file and go with the next try
                log.warning("could not ship the log of job %s", self.writer.job_id, exc_info=True)

    def ship(self) -> int:
        """Writes the output printed since the last call (up to the limit); returns the bytes shipped."""
        with self._lock:
            total = 0
            while self.shipped < self.max_bytes:
                data = self._read(self.shipped, min(CHUNK_BYTES, self.max_bytes - self.shipped))
                if not data:
                    break
                if self.writer.write(lambda s, d=data: self._insert(s, d), "the log", retry_for=5) is None:
                    break  # the attempt lost the job: nothing more of it is written
                self.shipped += len(data)
                total += len(data)
            if self.shipped >= self.max_bytes and not self.truncated and self._size() > self.max_bytes:
                self.truncated = True
            return total

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def _read(self, offset: int, length: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        except FileNotFoundError:
            return b""

    def _insert(self, session: Session, data: bytes) -> bool:
        writer = self.writer
        session.add(
            AttemptLogChunk(job_id=writer.job_id, attempt=writer.attempt, offset=self.shipped, data=data)
        )
        session.execute(
            update(Attempt)
            .where(Attempt.job_id == writer.job_id, Attempt.number == writer.attempt)
            .values(log_bytes=self.shipped + len(data), log_truncated=self.truncated)
        )
        return True

    def finish(self, team_id: str) -> None:
        """Stops shipping, ships the rest and stores the whole log in object storage (one try: a log that
        cannot be stored now stays in the database rather than holding the job's end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        writer = self.writer
        try:
            self.ship()
        except Exception:
            log.warning("could not ship the end of the log of job %s", writer.job_id, exc_info=True)
            return
        if self.shipped == 0:
            return
        data = self._read(0, self.shipped)
        key = log_key(team_id, writer.job_id, writer.attempt)
        try:
            stored = make_store(writer.settings).put_bytes(key, data)
        except StorageError as exc:
            log.warning("could not store the log of job %s: %s", writer.job_id, exc)
            writer.event(
                "log",
                f"the training output of attempt {writer.attempt} could not be stored in object storage "
                f"({exc}); it stays readable from the database",
                level="warning",
            )
            return
        digest = hashlib.sha256(data).hexdigest()
        assert stored.sha256 == digest

        def record(session: Session) -> bool:
            session.execute(
                update(Attempt)
                .where(Attempt.job_id == writer.job_id, Attempt.number == writer.attempt)
                .values(log_key=key, log_sha256=digest, log_bytes=len(data), log_truncated=self.truncated)
            )
            session.execute(
                delete(AttemptLogChunk).where(
                    AttemptLogChunk.job_id == writer.job_id, AttemptLogChunk.attempt == writer.attempt
                )
            )
            return True

        try:
            writer.write(record, "the stored log", retry_for=30)
        except Exception:
            log.warning("could not record the stored log of job %s", writer.job_id, exc_info=True)
