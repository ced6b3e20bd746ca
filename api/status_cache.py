"""The answers of GET /v1/jobs/{id} (the JSON body and its ETag) kept in memory, exact to within the delivery of a
PostgreSQL notification.

Triggers on jobs, attempts and job_metrics (migration 0010_cache13) announce, at commit, every change to what a job's
answer shows on the channel `tuneforge_jobs`: the job's id, followed by ` queue` when the change moves the queue
places shown in other queued jobs' answers. Each API process listens on one connection of its own and drops the
answers a notification names (all queued jobs' answers for ` queue`).

The race "an answer read from the database, the job changed and its notification handled before that answer is
stored" is closed by a sequence number: a fill remembers the number it began at, and an answer is stored only if no
notification about its job (nor a clearing of the whole cache) came after that. While the listening connection is
down (PostgreSQL restarting) the cache is empty and bypassed; it is used again only once a new connection listens,
and answers read before that are not stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, NamedTuple

from api.answers import etag_of

log = logging.getLogger(__name__)

CHANNEL = "tuneforge_jobs"
QUEUE_SUFFIX = " queue"


class StatusAnswer(NamedTuple):
    """One job's answer as a team sees it."""

    team: str
    body: bytes
    etag: str
    queued: bool


class StatusCache:
    """Job answers by job id, at most `max_entries` (the oldest stored goes first), used only while `live` (its
    listener listens). Reads and fills run on the event loop; `forget` may also come from threadpool threads
    (the write routes), hence the lock around every change."""

    def __init__(self, max_entries: int = 10_000, max_notes: int = 100_000) -> None:
        self.max_entries = max_entries
        self.max_notes = max_notes
        self.live = False
        self._answers: dict[str, StatusAnswer] = {}
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._seq = 0  # bumped by every notification and every clearing
        self._floor = 0  # fills begun before it are not stored
        self._queue_seq = 0  # the latest notification that moved the queue
        self._changed: dict[str, int] = {}  # job id -> its latest notification, since the floor

    def get(self, team: str, job_id: str) -> StatusAnswer | None:
        """The stored answer of a team's job, or None (also for another team's job: its read answers 404)."""
        answer = self._answers.get(job_id) if self.live else None
        return answer if answer is not None and answer.team == team else None

    def begin(self) -> int:
        """The mark a fill takes before it reads the job."""
        return self._seq

    def fill(self, mark: int, team: str, job_id: str, body: bytes, queued: bool) -> StatusAnswer:
        """The answer of a job read since `mark`, stored unless its job changed (or the cache was cleared) since."""
        answer = StatusAnswer(team, body, etag_of(body), queued)
        if not self.live:
            return answer
        with self._lock:
            if (
                not self.live
                or mark < self._floor
                or self._changed.get(job_id, -1) > mark
                or (queued and self._queue_seq > mark)
            ):
                return answer
            if len(self._answers) >= self.max_entries and job_id not in self._answers:
                oldest = next(iter(self._answers))
                del self._answers[oldest]
                self._queued.discard(oldest)
            self._answers[job_id] = answer
            if queued:
                self._queued.add(job_id)
            else:
                self._queued.discard(job_id)
        return answer

    def forget(self, job_id: str, queue: bool = False) -> None:
        """Drops a job's answer (and with `queue`, every queued job's), and keeps answers being read from being
        stored."""
        with self._lock:
            self._seq += 1
            if len(self._changed) >= self.max_notes:
                self._clear()
            self._changed[job_id] = self._seq
            self._answers.pop(job_id, None)
            self._queued.discard(job_id)
            if queue:
                self._queue_seq = self._seq
                for queued in self._queued:
                    self._answers.pop(queued, None)
                self._queued.clear()

    def notified(self, payload: str) -> None:
        """Handles a notification of the channel: `<job id>` or `<job id> queue`."""
        queue = payload.endswith(QUEUE_SUFFIX)
        self.forget(payload.removesuffix(QUEUE_SUFFIX) if queue else payload, queue)

    def set_live(self, live: bool) -> None:
        """Empties the cache; it is used from now on only if `live`. Reads begun before are not stored."""
        with self._lock:
            self.live = live
            self._clear()

    def _clear(self) -> None:
        self._seq += 1
        self._floor = self._seq
        self._answers.clear()
        self._queued.clear()
        self._changed.clear()


async def listen(cache: StatusCache, url: str, *, retry_max_seconds: float = 5.0) -> None:
    """Keeps one connection listening on the channel for `cache`, reconnecting while PostgreSQL is away (the cache
    bypassed meanwhile). Runs until cancelled."""
    import psycopg

    from shared.db import libpq_url

    url = libpq_url(url)
    delay = 0.25
    while True:
        try:
            # Keepalives: a peer that vanished without closing the socket is noticed within seconds.
            connection = await psycopg.AsyncConnection.connect(
                url,
                autocommit=True,
                connect_timeout=5,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=2,
            )
            async with connection:
                await connection.execute(f"LISTEN {CHANNEL}")
                cache.set_live(True)  # only now: the reads from here on see every change after them announced
                if delay > 0.25:
                    log.warning("listening for job changes again; the status cache is back in use")
                delay = 0.25
                async for note in connection.notifies():
                    cache.notified(note.payload)
        except psycopg.Error as exc:
            if cache.live or delay == 0.25:
                log.warning("the status cache's listener lost PostgreSQL (%s); reading answers from it", exc)
        finally:
            cache.set_live(False)
        await asyncio.sleep(delay)
        delay = min(delay * 2, retry_max_seconds)


def start(cache: StatusCache, url: str) -> Any:
    """Starts `listen` on the running loop; returns its task."""
    return asyncio.get_running_loop().create_task(listen(cache, url), name="status-cache-listener")


def forget_job(request: Any, job_id: str) -> None:
    """Drops a job's answer once this process committed a change to the job (and the queued jobs' answers, whose
    places it may move): the caller's next GET sees the change without waiting for the notification."""
    request.app.state.status_cache.forget(job_id, queue=True)
