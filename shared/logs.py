"""Structured logs: one JSON object a line, carrying the job id and attempt of the work in progress."""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_job: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("tuneforge_job", default=None)


@contextmanager
def job_context(job_id: str, attempt: int) -> Iterator[None]:
    """Tags every log record made inside with the job id and attempt."""
    token = _job.set((job_id, attempt))
    try:
        yield
    finally:
        _job.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        job = _job.get() or (
            (os.environ["TUNEFORGE_JOB_ID"], int(os.environ.get("TUNEFORGE_ATTEMPT", "0")))
            if "TUNEFORGE_JOB_ID" in os.environ
            else None
        )
        if job is not None:
            entry["job_id"], entry["attempt"] = job
        if "RANK" in os.environ:
            entry["rank"] = int(os.environ["RANK"])
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    """Sends the root logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
