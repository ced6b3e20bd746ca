"""The job state machine: every status a job can have and the moves between them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    validating = "validating"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    pausing = "pausing"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# The statuses in which an attempt holds the job (and its GPUs).
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.running, JobStatus.cancelling, JobStatus.pausing})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.validating: frozenset({JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    # queued -> paused: the user holds a waiting job; no worker claims it until it is resumed.
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.failed, JobStatus.cancelled, JobStatus.paused}),
    # running -> queued: the worker was lost (or shut down warm) and another attempt will resume the job.
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling, JobStatus.queued, JobStatus.pausing}
    ),
    # A job being cancelled can still fail if stopping it broke; one whose worker vanished is just cancelled.
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed}),
    # A job asked to pause checkpoints and stops (paused); it may finish or fail first, or be cancelled.
    JobStatus.pausing: frozenset(
        {JobStatus.paused, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling}
    ),
    # Resumed: back in the queue, to continue from its latest checkpoint.
    JobStatus.paused: frozenset({JobStatus.queued, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class IllegalTransition(Exception):
    """A move the state machine does not allow."""

    def __init__(self, job_id: str, current: JobStatus | str, target: JobStatus | str) -> None:
        super().__init__(f"job {job_id} cannot go from {current} to {target}")
        self.job_id = job_id
        self.current = JobStatus(current)
        self.target = JobStatus(target)


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Returns the statuses from which `target` can be reached."""
    return frozenset(src for src, targets in TRANSITIONS.items() if target in targets)


def check_transition(job_id: str, current: JobStatus | str, target: JobStatus | str) -> None:
    """Raises IllegalTransition unless the state machine allows current -> target."""
    if JobStatus(target) not in TRANSITIONS[JobStatus(current)]:
        raise IllegalTransition(job_id, current, target)
