"""A job's events as server-sent events, polled from the database until the job ends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session

from api.schemas import EventOut
from shared.services import jobs as job_service
from shared.states import TERMINAL, JobStatus
from shared.tenancy import TeamID

IDLE_POLL_SECONDS = 1.0


def job_event_stream(factory: Callable[[], Session], team_id: TeamID, job_id: str) -> Iterator[bytes]:
    """Yields each event as it is recorded, then an `end` event with the final status."""
    after: int | None = None
    while True:
        with factory() as poll:
            page, _ = job_service.list_events(
                session=poll, team_id=team_id, job_id=job_id, after=after, limit=500
            )
            job = job_service.get_job(session=poll, team_id=team_id, job_id=job_id)
            finished = JobStatus(job.status) in TERMINAL
        for event in page:
            after = event.id
            payload = EventOut.of(event).model_dump_json()
            yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
        if finished and not page:
            yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n".encode()
            return
        if not page:
            time.sleep(IDLE_POLL_SECONDS)
            # A comment (SSE clients skip it) between idle polls: without it this generator never returns to
            # the server while the job is quiet, so a client that left is never noticed and its thread polls
            # until the job ends (enough of them exhaust the threadpool).
            yield b": keep-alive\n\n"
