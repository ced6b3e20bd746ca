"""The lease of a claimed attempt: heartbeats from a background thread, noticing a cancellation or the loss
of the job to another attempt (the reaper hands a job whose heartbeats stopped to another worker)."""

from __future__ import annotations

import logging
import threading

from shared.db import session_scope
from shared.services import claims
from shared.settings import Settings
from shared.states import JobStatus

log = logging.getLogger(__name__)


class Lease:
    """Heartbeats a claimed attempt every `heartbeat_interval_seconds` while the `with` block runs."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        """Renews the lease once; notes a cancellation or a lost lease."""
        with session_scope(self.settings.database_url) as session:
            status = claims.heartbeat(session=session, job_id=self.job_id, attempt=self.attempt)
        if status is None:
            self.lost.set()
        elif status is JobStatus.cancelling:
            self.cancel_requested.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_seconds):
            try:
                self.beat()
            except Exception:  # the database may be restarting; the lease has slack for that
                log.warning("heartbeat for job %s failed; retrying", self.job_id, exc_info=True)
