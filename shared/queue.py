"""The broker: the Celery app both sides share (the API sends tasks by name, the worker runs them), the
queue names, and reading what waits in them.

The broker only carries "look at job X". PostgreSQL holds the job; a lost message never loses a job.
Services send only after the transaction that made a job ready commits: shared/services/dispatch.py.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from shared.settings import Settings

log = logging.getLogger(__name__)

VALIDATE_TASK = "tuneforge.validate_job"
TRAIN_TASK = "tuneforge.run_job"
PLAN_TASK = "tuneforge.plan_job"


def validate_queue(settings: Settings) -> str:
    return f"{settings.queue_prefix}.validate"


def train_queue(settings: Settings, gpus: int) -> str:
    """The queue of jobs that need `gpus` GPUs; a worker with N GPUs consumes the queues of 1..N."""
    return f"{settings.queue_prefix}.train.g{gpus}"


def worker_queues(settings: Settings, gpus: int, *, validate: bool = True, train: bool = True) -> list[str]:
    queues = [validate_queue(settings)] if validate else []
    return queues + ([train_queue(settings, n) for n in range(1, gpus + 1)] if train else [])


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
    app.conf.update(
        # A task is acknowledged only when it returns, and handed to another worker if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Task events let Flower show each job's tasks (from the moment a worker receives one), not only the
        # workers. No `task-sent` event: it would be a second broker write for every job submitted.
        worker_send_task_events=True,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        task_default_queue=validate_queue(settings),
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


# Redis serves lower numbers first (kombu's priority steps 0, 3, 6, 9).
BROKER_PRIORITY = {"high": 0, "normal": 3, "low": 6}


def enqueue(settings: Settings, task: str, job_id: str, queue: str, priority: str = "normal") -> bool:
    """Sends `task(job_id)` to `queue` now; returns False (and logs) if the broker could not take it. Services
    do not call this directly: they use shared/services/dispatch.py, which sends after their commit."""
    app = _producer(settings)
    try:
        app.send_task(
            task,
            args=[job_id],
            # The message's printable copies of its arguments (what Celery's saferepr would make of one id, at
            # a fifth of a submission's publishing CPU).
            argsrepr=repr([job_id]),
            kwargsrepr="{}",
            queue=queue,
            priority=BROKER_PRIORITY.get(priority, BROKER_PRIORITY["normal"]),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception:  # the job is in the database; the sweeper re-sends it
        log.exception("could not enqueue %s for job %s", task, job_id)
        return False
    return True


def queued_messages(settings: Settings) -> str | None:
    """Returns the raw text of every message waiting in Tuneforge's queues (job ids appear in it), or None
    when the broker cannot be read."""
    try:
        if settings.broker_url.startswith("filesystem"):
            folder = settings.broker_folder / "queue"
            return "\n".join(p.read_text(errors="replace") for p in folder.glob("*.msg"))
        if settings.broker_url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
            chunks = []
            for key in client.scan_iter(f"{settings.queue_prefix}.*"):
                if client.type(key) == b"list":
                    chunks.extend(item.decode(errors="replace") for item in client.lrange(key, 0, -1))
            return "\n".join(chunks)
    except Exception:
        log.warning("could not read the broker's queues", exc_info=True)
    return None


def queue_depths(settings: Settings) -> dict[str, int]:
    """Returns how many messages wait in each Tuneforge queue (empty when the broker cannot be read)."""
    try:
        if settings.broker_url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
            return {
                key.decode(): client.llen(key)
                for key in client.scan_iter(f"{settings.queue_prefix}.*")
                if client.type(key) == b"list"
            }
        if settings.broker_url.startswith("filesystem"):
            depths: dict[str, int] = {}
            for path in (settings.broker_folder / "queue").glob("*.msg"):
                queue = path.name.split(".", 1)[1].removesuffix(".msg")
                depths[queue] = depths.get(queue, 0) + 1
            return depths
    except Exception:
        log.warning("could not read the broker's queue depths", exc_info=True)
    return {}
