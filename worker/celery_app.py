"""The Celery app a worker process runs: `tuneforge worker` (or `celery -A worker.celery_app worker`)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from shared.logs import configure_logging
from shared.queue import make_celery
from shared.settings import get_settings
from worker import supervisor
from worker.maintenance import start_maintenance

settings = get_settings()
configure_logging(settings.log_level)
app = make_celery(settings)
app.conf.imports = ("worker.tasks",)
log = logging.getLogger(__name__)


@worker_ready.connect
def _start_maintenance(**_: Any) -> None:
    start_maintenance(settings)


@worker_shutting_down.connect
def _checkpoint_on_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    # A warm shutdown (SIGTERM) waits for the running task: make it checkpoint and hand the job back.
    log.warning("worker shutting down (%s, %s): running jobs checkpoint and return to the queue", sig, how)
    supervisor.SHUTDOWN.set()
