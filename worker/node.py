"""The node worker: one per node, driving all its GPUs. It claims, from the database, the best queued job that
fits its free GPUs (shared/services/claims.py), runs each attempt in a thread of its own on a disjoint set
of GPUs (worker/gpus.py), heartbeats every attempt at once, and gives the GPUs back when an attempt ends,
however it ends. The broker's messages only wake it up; it also looks for work every `claim_poll_seconds`,
so a lost message delays nothing for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from shared.db import session_scope
from shared.services import claims
from shared.services.claims import Claim, NodeCapacity
from shared.settings import Settings
from worker import runner
from worker.gpus import GpuAllocator
from worker.lease import Lease
from worker.supervisor import SHUTDOWN
from worker.warm import runtime_for

log = logging.getLogger(__name__)


@dataclass
class _Running:
    claim: Claim
    lease: Lease
    thread: threading.Thread


class NodeAgent:
    """Claims and runs attempts on this node's GPUs until stopped."""

    def __init__(self, settings: Settings, devices: Sequence[str], *, ray_drivers: int = 1) -> None:
        self.settings = settings
        self.allocator = GpuAllocator(devices)
        # Jobs that span several nodes run on Ray; this worker drives up to `ray_drivers` of them at once.
        self.ray_drivers = ray_drivers if settings.ray_address else 0
        self.running: dict[str, _Running] = {}
        # Attempts fork from one process that has imported the training stack (worker/warm.py).
        self.warm = runtime_for(settings)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()  # no more claims
        self._stop_beats = threading.Event()  # set once the last attempt has ended: no more heartbeats
        self._threads: list[threading.Thread] = []

    # -- the node as the database sees it -------------------------------------------------------------

    def capacity(self) -> NodeCapacity:
        with self._lock:
            drivers = sum(1 for r in self.running.values() if r.claim.launcher == "ray")
        return NodeCapacity(
            worker_id=self.settings.worker_id,
            total_gpus=self.allocator.total,
            free_gpus=self.allocator.free(),
            ray_driver_free=drivers < self.ray_drivers,
        )

    def beat(self) -> None:
        """One heartbeat for the node and every attempt it runs."""
        with self._lock:
            leases = {job_id: r.lease for job_id, r in self.running.items()}
        with session_scope(self.settings.database_url) as session:
            states = claims.beat(
                session=session,
                node=self.capacity(),
                leases=[(job_id, lease.attempt) for job_id, lease in leases.items()],
                ray_driver=self.ray_drivers > 0,
            )
        for job_id, state in states.items():
            leases[job_id].apply(state)

    # -- running -----------------------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        self.beat()
        for target, name in ((self._claim_loop, "node-claims"), (self._heartbeat_loop, "node-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "node %s drives %d GPU(s): %s",
            self.settings.worker_id,
            self.allocator.total,
            self.allocator.devices,
        )
        return self

    def wake(self) -> None:
        """Looks for work now (a job was queued, or an attempt ended)."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stops claiming and waits up to `timeout` for the running attempts to end (on a warm shutdown they
        checkpoint and go back to the queue), then leaves the pool."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            attempts = [r.thread for r in self.running.values()]
        for thread in attempts:
            thread.join(timeout)
        self._stop_beats.set()
        for thread in self._threads:
            thread.join(10)
        try:
            with session_scope(self.settings.database_url) as session:
                claims.retire_node(session=session, worker_id=self.settings.worker_id)
        except Exception:
            log.warning("could not take node %s out of the pool", self.settings.worker_id, exc_info=True)

    def claim_once(self) -> list[Claim]:
        """Claims the best jobs that fit the free GPUs now, together (one transaction), and starts their
        attempts; an empty list when none fits."""
        node = self.capacity()
        if not node.free_gpus and not node.ray_driver_free:
            return []
        with session_scope(self.settings.database_url) as session:
            started = claims.claim_batch(session=session, settings=self.settings, node=node)
        for claim in started:
            self._launch(claim)
        return started

    def _launch(self, claim: Claim) -> None:
        devices = self.allocator.take(claim.gpu_indices)
        lease = Lease(self.settings, claim.job_id, claim.attempt)
        thread = threading.Thread(
            target=self._run, args=(claim, lease, devices), name=f"attempt-{claim.job_id}", daemon=True
        )
        with self._lock:
            self.running[claim.job_id] = _Running(claim, lease, thread)
        thread.start()

    def _run(self, claim: Claim, lease: Lease, devices: list[str]) -> None:
        try:
            runner.run_attempt(self.settings, lease, devices, warm=self.warm)
        except Exception:
            log.exception("attempt %d of job %s broke its thread", claim.attempt, claim.job_id)
        finally:
            with self._lock:
                self.running.pop(claim.job_id, None)
            self.allocator.give_back(claim.gpu_indices)
            self.wake()

    def _claim_loop(self) -> None:
        while not self._stop.is_set() and not SHUTDOWN.is_set():
            try:
                while not self._stop.is_set() and not SHUTDOWN.is_set() and self.claim_once():
                    pass
            except Exception:  # the database may be restarting: look again at the next wake-up
                log.warning("claiming failed on node %s", self.settings.worker_id, exc_info=True)
            self._wake.wait(self.settings.claim_poll_seconds)
            self._wake.clear()

    def _heartbeat_loop(self) -> None:
        while not self._stop_beats.wait(self.settings.heartbeat_interval_seconds):
            try:
                self.beat()
            except Exception:  # the database may be restarting; leases have slack for that
                log.warning("heartbeat of node %s failed; retrying", self.settings.worker_id, exc_info=True)


_agent: NodeAgent | None = None


def start_node(settings: Settings, devices: Sequence[str]) -> NodeAgent:
    """Starts this process's node agent."""
    global _agent
    _agent = NodeAgent(settings, devices).start()
    return _agent


def current() -> NodeAgent | None:
    """This process's node agent, if it runs one."""
    return _agent
