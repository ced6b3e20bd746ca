"""Reading a job's logs: the output of each attempt's training processes, in pages of whole lines by byte
offset. A running attempt's log is read from the chunks its worker ships to the database (worker/logs.py);
an ended one's from object storage."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.errors import InvalidRequest, NotFound
from shared.models import Attempt, AttemptLogChunk, utcnow
from shared.services.jobs import get_job
from shared.storage import ObjectStore
from shared.tenancy import TeamID

DEFAULT_PAGE_BYTES = 256 * 1024
MAX_PAGE_BYTES = 1024 * 1024
MAX_TAIL_LINES = 10_000
# An ended attempt whose worker never stored its log (the worker was lost) is complete after this long.
STORE_GRACE = timedelta(seconds=30)


def _chunk_bytes(session: Session, job_id: str, attempt: int, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of a running attempt's shipped chunks."""
    end = start + length
    rows = session.execute(
        select(AttemptLogChunk.offset, AttemptLogChunk.data)
        .where(
            AttemptLogChunk.job_id == job_id,
            AttemptLogChunk.attempt == attempt,
            AttemptLogChunk.offset < end,
            AttemptLogChunk.offset + func.length(AttemptLogChunk.data) > start,
        )
        .order_by(AttemptLogChunk.offset)
    ).all()
    data = bytearray()
    for offset, chunk in rows:
        if offset > start + len(data):  # a gap: never shipped (cannot happen unless rows were removed)
            break
        data += bytes(chunk)[start + len(data) - offset :]
    return bytes(data[:length])


def _reader(session: Session, store: ObjectStore, job_id: str, attempt: Attempt):
    if attempt.log_key:
        return lambda start, length: store.read_range(attempt.log_key, start, length)
    return lambda start, length: _chunk_bytes(session, job_id, attempt.number, start, length)


def _tail_offset(read: Any, size: int, lines: int) -> int:
    """The offset of the start of the last `lines` whole lines of a log of `size` bytes."""
    window = 64 * 1024
    while True:
        start = max(0, size - window)
        data = read(start, size - start)
        body = data[:-1] if data.endswith(b"\n") else data
        breaks = [i for i, b in enumerate(body) if b == 0x0A]
        if len(breaks) >= lines:
            return start + breaks[-lines] + 1
        if start == 0:
            return 0
        window *= 4


def read_log(
    *,
    session: Session,
    store: ObjectStore,
    team_id: TeamID,
    job_id: str,
    attempt: int | None = None,
    offset: int | None = None,
    limit: int = DEFAULT_PAGE_BYTES,
    tail: int | None = None,
) -> dict[str, Any]:
    """A page of whole lines of one attempt's log (the latest attempt unless `attempt` is given): from byte
    `offset` (default 0) or, with `tail`, the last `tail` lines; at most `limit` bytes. `next_offset` is where
    the next page (or, while the attempt runs, its next output) starts."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    if offset is not None and tail is not None:
        raise InvalidRequest("give offset or tail, not both", param="tail")
    attempts = list(session.scalars(select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)))
    numbers = [a.number for a in attempts]
    page: dict[str, Any] = {
        "job_id": job.id,
        "attempt": None,
        "attempts": numbers,
        "offset": 0,
        "next_offset": 0,
        "size": 0,
        "lines": [],
        "has_more": False,
        "complete": False,
        "truncated": False,
        "stored": False,
        "sha256": None,
    }
    if not attempts:
        if attempt is not None:
            raise NotFound(f"job {job_id} has not run yet: it has no attempt {attempt}", param="attempt")
        return page  # not started: nothing printed yet
    chosen = attempts[-1] if attempt is None else next((a for a in attempts if a.number == attempt), None)
    if chosen is None:
        raise NotFound(
            f"job {job_id} has no attempt {attempt}; its attempts: {', '.join(map(str, numbers))}",
            param="attempt",
        )
    size = chosen.log_bytes
    read = _reader(session, store, job.id, chosen)
    start = _tail_offset(read, size, tail) if tail is not None else min(offset or 0, size)
    data = read(start, min(limit, size - start)) if size > start else b""
    ended = chosen.ended_at is not None
    stored = chosen.log_key is not None
    complete = stored or (ended and utcnow() - chosen.ended_at > STORE_GRACE)
    window_end = start + len(data)  # past it, more bytes than fit the page
    last_break = data.rfind(b"\n")
    if complete and window_end >= size:
        pass  # the log's last line, ended without a newline
    elif last_break >= 0:
        data = data[: last_break + 1]  # the rest of the line comes with the next page
    elif len(data) < limit:
        data = b""  # a line still being written: it comes whole once it ends
    page.update(
        attempt=chosen.number,
        offset=start,
        next_offset=start + len(data),
        size=size,
        lines=data.decode("utf-8", errors="replace").splitlines(),
        has_more=window_end < size,
        complete=complete and start + len(data) >= size,
        truncated=chosen.log_truncated,
        stored=stored,
        sha256=chosen.log_sha256,
    )
    return page
