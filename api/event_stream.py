"""A job's events as server-sent events, polled from the database until the job ends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session

from api.answers import encode
from api.schemas import EventOut
from shared.models import JobMetric
from shared.services import jobs as job_service
from shared.states import TERMINAL, JobStatus
from shared.tenancy import TeamID

IDLE_POLL_SECONDS = 1.0


def _metric(point: JobMetric) -> bytes:
    payload = {
        "id": point.id,
        "split": point.split,
        "step": point.step,
        "epoch": point.epoch,
        "loss": point.loss,
        "learning_rate": point.learning_rate,
        "grad_norm": point.grad_norm,
        "tokens_per_second": point.tokens_per_second,
        "num_tokens": point.num_tokens,
        "attempt": point.attempt,
        "recorded_at": point.created_at,
    }
    return b"event: metric\ndata: " + encode(payload) + b"\n\n"


def job_event_stream(
    factory: Callable[[], Session], team_id: TeamID, job_id: str, *, metrics: bool = False
) -> Iterator[bytes]:
    """Yields each event as it is recorded (with `metrics`, each metric point too, as `metric` events: every
    point so far, then each new one), then an `end` event with the final status."""
    after: int | None = None
    after_point = 0
    while True:
        points: list[JobMetric] = []
        with factory() as poll:
            page, _ = job_service.list_events(
                session=poll, team_id=team_id, job_id=job_id, after=after, limit=500
            )
            job = job_service.get_job(session=poll, team_id=team_id, job_id=job_id)
            finished = JobStatus(job.status) in TERMINAL
            if metrics:
                points = job_service.metric_points_after(session=poll, job_id=job_id, after=after_point)
        for point in points:
            after_point = point.id
            yield _metric(point)
        for event in page:
            after = event.id
            payload = EventOut.of(event).model_dump_json()
            yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
        if finished and not page and not points:
            yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n".encode()
            return
        if not page and not points:
            time.sleep(IDLE_POLL_SECONDS)
            # A comment (SSE clients skip it) between idle polls: without it this generator never returns to
            # the server while the job is quiet, so a client that left is never noticed and its thread polls
            # until the job ends (enough of them exhaust the threadpool).
            yield b": keep-alive\n\n"
