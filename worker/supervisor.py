"""Supervising an attempt's training process group: start it (one process, or torchrun for multi-GPU and
ZeRO jobs), watch it, and stop all of it at once when the job is cancelled, the attempt loses its lease, the
run-time limit passes, or the worker shuts down, the job is preempted or paused (then it is asked to
checkpoint first). What it ended with
is an Outcome; worker/outcomes.py decides what that means for the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.schemas import JobSpec
from shared.settings import Settings
from worker.launch import FAILURE_FILE, OUTCOME_PREFIX, RESULT_FILE, STOP_FILE
from worker.lease import Lease
from worker.reporting import AttemptWriter
from worker.training.distributed import child_environment
from worker.warm import WarmRuntime

# What a forked attempt takes from the worker's environment besides its TUNEFORGE_* settings.
WARM_ENV = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")

# Set when the worker is asked to shut down warm (SIGTERM): running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()
POLL_SECONDS = 0.25
LOG_FILE = "training.log"


@dataclass
class Outcome:
    """How a training process ended."""

    kind: str  # ok | failed | oom | stopped | cancelled | lost | timeout | crashed
    code: int | None = None
    detail: str = ""


def training_command(spec: JobSpec, work_dir: Path) -> list[str]:
    """The command line of the training process group: one process, torchrun's group on this node, or the
    driver of a Ray Train job for jobs that span several nodes."""
    if spec.resources.nodes > 1:
        return [sys.executable, "-m", "worker.ray_launch", str(work_dir)]
    launch = [sys.executable, "-m", "worker.launch", str(work_dir)]
    processes = spec.resources.gpus
    # DeepSpeed needs the process-group environment torchrun sets, even for one process (without it, it goes
    # looking for MPI).
    if processes == 1 and spec.resources.zero_stage == 0:
        return launch
    # --standalone: torchrun's rendezvous binds a free port itself (no race for a port picked here).
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *launch[1:],
    ]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class TrainingProcesses:
    """An attempt's training process group: started fresh (Popen, under torchrun for several ranks) or forked
    from the warm runtime (worker/warm.py). Its pid is the group's id either way."""

    def __init__(
        self, popen: subprocess.Popen[bytes] | None = None, *, warm: WarmRuntime | None = None, pid: int = 0
    ):
        self.popen, self.warm = popen, warm
        self.pid = popen.pid if popen is not None else pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.popen.poll() if self.popen is not None else self.warm.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        if self.popen is not None:
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        assert self.warm is not None
        self.returncode = self.warm.wait(self.pid, timeout)
        return self.returncode


def start_training(
    spec: JobSpec, work_dir: Path, log_path: Path, env: dict[str, str], warm: WarmRuntime | None
) -> TrainingProcesses:
    """Starts the training process group: forked from the warm runtime for jobs on this node when there is
    one, else as a fresh process (torchrun for several ranks, the Ray driver for jobs spanning nodes)."""
    resources = spec.resources
    if warm is not None and resources.nodes == 1:
        group = resources.gpus > 1 or resources.zero_stage > 0  # DeepSpeed wants a process group even alone
        only = {k: v for k, v in env.items() if k.startswith("TUNEFORGE_") or k in WARM_ENV}
        return TrainingProcesses(warm=warm, pid=warm.spawn(work_dir, log_path, resources.gpus, only, group))
    with log_path.open("ab") as log_file:
        return TrainingProcesses(
            subprocess.Popen(
                training_command(spec, work_dir),
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )


def stop_group(proc: TrainingProcesses, grace_seconds: float) -> None:
    """Stops a whole process group: SIGTERM, then SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if proc.wait(wait) is not None:
            return


def _ranks_ended(work_dir: Path) -> list[dict[str, str | None]]:
    endings = []
    for path in sorted(work_dir.glob(f"{OUTCOME_PREFIX}*.json")):
        try:
            endings.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # a rank killed while writing: it said nothing
            continue
    return endings


def _what_the_ranks_said(work_dir: Path) -> Outcome | None:
    """The outcome the ranks reported, whatever the launcher's exit code: a job failure wins (rank 0's if it
    failed too), then out of memory, then a stop after a checkpoint; success needs rank 0's result."""
    endings = _ranks_ended(work_dir)
    failed = [e for e in endings if e["kind"] == "failed"]
    if failed:
        main = (
            json.loads((work_dir / FAILURE_FILE).read_text()) if (work_dir / FAILURE_FILE).exists() else None
        )
        first = main or {"code": failed[0]["code"], "message": failed[0]["message"]}
        return Outcome("failed", detail=json.dumps(first))
    if any(e["kind"] == "oom" for e in endings):
        return Outcome("oom")
    if any(e["kind"] == "stopped" for e in endings):
        return Outcome("stopped")
    if endings and all(e["kind"] == "ok" for e in endings) and (work_dir / RESULT_FILE).exists():
        return Outcome("ok")
    return None


def supervise(
    *,
    settings: Settings,
    spec: JobSpec,
    work_dir: Path,
    lease: Lease,
    writer: AttemptWriter,
    seconds_left: float,
    devices: Sequence[str] = (),
    warm: WarmRuntime | None = None,
) -> Outcome:
    """Runs the training process group on `devices` (its CUDA_VISIBLE_DEVICES) until it ends, is cancelled,
    runs past `seconds_left` or must stop (a warm shutdown of the worker, a preemption or a pause: it
    checkpoints first). With `warm`, the processes are forked from the warm runtime."""
    for path in [
        *work_dir.glob(f"{OUTCOME_PREFIX}*.json"),
        *(work_dir / n for n in (RESULT_FILE, FAILURE_FILE, STOP_FILE)),
    ]:
        path.unlink(missing_ok=True)
    env = (
        os.environ
        | child_environment(str(settings.cache_dir))
        | settings.to_env()
        | {"TUNEFORGE_JOB_ID": writer.job_id, "TUNEFORGE_ATTEMPT": str(writer.attempt)}
        | ({"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {})
    )
    log_path = work_dir / LOG_FILE
    deadline = time.monotonic() + seconds_left
    proc = start_training(spec, work_dir, log_path, env, warm)
    stop_asked_at: float | None = None
    while proc.poll() is None:
        time.sleep(POLL_SECONDS)
        if lease.cancel_requested.is_set():
            stop_group(proc, settings.kill_grace_seconds)
            return Outcome("cancelled")
        if lease.lost.is_set():
            stop_group(proc, settings.kill_grace_seconds)
            return Outcome("lost")
        if time.monotonic() > deadline:
            stop_group(proc, settings.kill_grace_seconds)
            return Outcome("timeout")
        stop = SHUTDOWN.is_set() or lease.preempted.is_set() or lease.pause_requested.is_set()
        if stop and stop_asked_at is None:
            (work_dir / STOP_FILE).touch()
            stop_asked_at = time.monotonic()
            if lease.pause_requested.is_set():
                writer.event("pausing", "pause requested: checkpointing, then the job is paused")
            elif SHUTDOWN.is_set():
                writer.event("shutdown", "the worker is shutting down; checkpointing to resume elsewhere")
            else:
                writer.event(
                    "preempted",
                    "making room for a higher-priority job: checkpointing, then back to the queue",
                )
        if stop_asked_at is not None and time.monotonic() - stop_asked_at > settings.shutdown_grace_seconds:
            stop_group(proc, settings.kill_grace_seconds)
            return Outcome("stopped", detail="no checkpoint in time; resuming from the last one")
    code = proc.poll()
    said = _what_the_ranks_said(work_dir)
    if said is not None:
        said.code = code
        return said
    if stop_asked_at is not None:
        return Outcome("stopped", code, "the training process ended while checkpointing")
    return Outcome("crashed", code, _tail(log_path))
