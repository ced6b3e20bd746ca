"""The Celery app a worker process runs: `tuneforge worker` (or `celery -A worker.celery_app worker`).

A worker checks submitted jobs (validation and plans), and, when it trains, runs the node agent that claims
and runs jobs on this node's GPUs (worker/node.py). Celery carries only the nudges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from shared.logs import configure_logging
from shared.queue import make_celery, worker_queues
from shared.settings import get_settings
from worker import node, supervisor
from worker.maintenance import start_maintenance

settings = get_settings()
configure_logging(settings.log_level)
app = make_celery(settings)
app.conf.imports = ("worker.tasks",)
log = logging.getLogger(__name__)
# What this process serves, set by `serve` before Celery starts (the training node's GPUs, if any).
_devices: list[str] = []


def serve(role: str, devices: Sequence[str]) -> None:
    """Runs the worker in this process: `role` all, train or validate; `devices` the GPUs it drives."""
    _devices[:] = list(devices) if role in ("all", "train") else []
    queues = worker_queues(
        settings, len(devices), validate=role in ("all", "validate"), train=role in ("all", "train")
    )
    app.worker_main(
        [
            "worker",
            "--concurrency=1",
            # Tasks only check jobs or wake the node agent: training runs in the agent's process groups.
            "--pool=solo",
            f"--queues={','.join(queues)}",
            f"--hostname={settings.worker_id}@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@worker_ready.connect
def _start(**_: Any) -> None:
    start_maintenance(settings)
    if _devices:
        node.start_node(settings, _devices)


@worker_shutting_down.connect
def _checkpoint_on_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    # A warm shutdown (SIGTERM): running attempts checkpoint and hand their jobs back before the worker leaves.
    log.warning("worker shutting down (%s, %s): running jobs checkpoint and return to the queue", sig, how)
    supervisor.SHUTDOWN.set()
    agent = node.current()
    if agent is not None:
        agent.stop(timeout=settings.shutdown_grace_seconds + settings.kill_grace_seconds + 30)
