"""The Celery app both sides share: the API sends tasks by name, the worker runs them.

The broker only carries "run job X now". PostgreSQL holds the job; a lost message never loses a job.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from shared.settings import Settings

log = logging.getLogger(__name__)

VALIDATE_TASK = "tuneforge.validate_job"
TRAIN_TASK = "tuneforge.run_job"


def queue_names(settings: Settings) -> dict[str, str]:
    """Returns the queue each task goes to."""
    return {VALIDATE_TASK: f"{settings.queue_prefix}.validate", TRAIN_TASK: f"{settings.queue_prefix}.train"}


def make_celery(settings: Settings) -> Celery:
    """Returns a Celery app configured for at-least-once delivery of long tasks."""
    app = Celery("tuneforge", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    queues = queue_names(settings)
    app.conf.update(
        # A task is acknowledged only when it returns, and handed to another worker if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Task events let Flower show each job's tasks, not only the workers.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        task_routes={name: {"queue": queue} for name, queue in queues.items()},
        task_default_queue=queues[TRAIN_TASK],
    )
    return app


_producers: dict[tuple[object, ...], Celery] = {}
_producers_lock = threading.Lock()


def _producer(settings: Settings) -> Celery:
    # One app (and so one broker connection pool) per broker configuration in this process.
    key = (
        settings.broker_url,
        settings.queue_prefix,
        settings.broker_folder,
        settings.broker_visibility_timeout_seconds,
    )
    with _producers_lock:
        if key not in _producers:
            _producers[key] = make_celery(settings)
        return _producers[key]


def enqueue(settings: Settings, task: str, job_id: str) -> bool:
    """Sends `task(job_id)` to its queue; returns False (and logs) if the broker could not take it."""
    app = _producer(settings)
    try:
        app.send_task(
            task,
            args=[job_id],
            queue=queue_names(settings)[task],
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception:  # the job is in the database; the sweeper re-sends it
        log.exception("could not enqueue %s for job %s", task, job_id)
        return False
    return True
