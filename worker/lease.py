"""The lease of a claimed attempt: what its heartbeats learn (cancelled, paused, lost to another attempt, asked
to make room for a higher-priority job). A node worker beats all its attempts' leases at once
(worker/node.py); an attempt run on its own keeps its lease with a thread of its own (`Lease.keep`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from shared.db import session_scope
from shared.services import claims
from shared.services.claims import LeaseState
from shared.settings import Settings
from shared.states import JobStatus

log = logging.getLogger(__name__)


class Lease:
    """One attempt's lease, as its heartbeats find it."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self.preempted = threading.Event()
        self.pause_requested = threading.Event()

    def apply(self, state: LeaseState) -> None:
        """Takes in what a heartbeat found."""
        if state.status is None:
            self.lost.set()
        elif state.status is JobStatus.cancelling:
            self.cancel_requested.set()
        elif state.status is JobStatus.pausing:
            self.pause_requested.set()
        if state.preempt:
            self.preempted.set()

    def beat(self) -> None:
        """Renews the lease once, on its own."""
        with session_scope(self.settings.database_url) as session:
            state = claims.renew(session=session, job_id=self.job_id, attempt=self.attempt)
        self.apply(state)

    @contextmanager
    def keep(self) -> Iterator[Lease]:
        """Heartbeats this lease every `heartbeat_interval_seconds` from a thread while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.settings.heartbeat_interval_seconds):
                try:
                    self.beat()
                except Exception:  # the database may be restarting; the lease has slack for that
                    log.warning("heartbeat for job %s failed; retrying", self.job_id, exc_info=True)

        thread = threading.Thread(target=loop, name=f"lease-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=10)
