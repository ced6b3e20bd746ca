"""Celery tasks: each takes an id and calls the code that does the work."""

from __future__ import annotations

import logging

from shared.queue import PLAN_TASK, TRAIN_TASK, VALIDATE_TASK
from shared.settings import get_settings
from worker import node, validation
from worker.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=VALIDATE_TASK)
def validate_job(job_id: str) -> str | None:
    status = validation.validate_job(get_settings(), job_id)
    return status and status.value


@app.task(name=TRAIN_TASK)
def run_job(job_id: str) -> None:
    # "Look at job X": which job runs where is decided when a node claims, in the database.
    agent = node.current()
    if agent is None:
        log.warning("job %s was sent to a worker that runs no node agent; a node will claim it", job_id)
        return
    agent.wake()


@app.task(name=PLAN_TASK)
def plan_job(plan_id: str) -> str | None:
    return validation.make_job_plan(get_settings(), plan_id)
