"""The Celery app a worker process runs: `celery -A worker.celery_app worker`."""

from __future__ import annotations

import logging

from shared.queue import make_celery
from shared.settings import get_settings

settings = get_settings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = make_celery(settings)
app.conf.imports = ("worker.tasks",)
