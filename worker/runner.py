"""Runs one attempt of a job: claim it, keep its lease alive, start the training process, watch it, finish.

The training itself runs in a child process group (worker/launch.py; under torchrun for multi-GPU and ZeRO jobs),
so a cancel can stop all of it at once, a crash or an out-of-memory error cannot take the worker down, and
a warm shutdown can ask it to checkpoint first. Every write is fenced by the attempt number this worker
claimed: a worker that lost its job (its lease expired and another took over) cannot overwrite it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from shared.db import retry_transient, session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.logs import job_context
from shared.models import Job, utcnow
from shared.queue import enqueue_job
from shared.schemas import JobSpec, job_sources
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import ACTIVE, JobStatus
from shared.storage import StorageError, make_store, sha256_file
from worker.assets import AssetCache
from worker.launch import EXIT_FAILED, EXIT_OK, EXIT_OUT_OF_MEMORY, EXIT_STOPPED, LaunchSpec
from worker.training.distributed import child_environment

log = logging.getLogger(__name__)

T = TypeVar("T")
# Set when the worker is asked to shut down warm (SIGTERM): running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()
POLL_SECONDS = 0.25


class Lease:
    """Heartbeats a claimed attempt from a background thread and notices cancellation or a lost lease."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        with session_scope(self.settings.database_url) as session:
            status = job_service.heartbeat(session=session, job_id=self.job_id, attempt=self.attempt)
        if status is None:
            self.lost.set()
        elif status is JobStatus.cancelling:
            self.cancel_requested.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_seconds):
            try:
                self.beat()
            except Exception:  # the database may be restarting; the lease has slack for that
                log.warning("heartbeat for job %s failed; retrying", self.job_id, exc_info=True)


@dataclass
class Outcome:
    """How a training process ended."""

    kind: str  # ok | failed | oom | stopped | cancelled | lost | timeout | crashed
    code: int | None = None
    detail: str = ""


def memory_event(metrics: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measured peak memory of a finished attempt next to the plan's per-GPU estimate, as an event's
    message and data; None when the recipe measured nothing."""
    gpu = metrics.get("peak_gpu_memory_bytes")
    host = metrics.get("peak_host_memory_bytes")
    if gpu is None and host is None:
        return None
    estimate = ((plan or {}).get("memory") or {}).get("total")
    parts = []
    if gpu is not None:
        parts.append(f"GPU {gpu / 2**30:.2f} GiB")
        if estimate:
            parts[-1] += f" (the plan estimated {estimate / 2**30:.2f} GiB, {gpu / estimate:.0%} of it)"
    if host is not None:
        parts.append(f"host {host / 2**30:.2f} GiB")
    return {
        "message": "peak memory of the training process: " + ", ".join(parts),
        "data": {"peak_gpu_bytes": gpu, "peak_host_bytes": host, "plan_estimate_bytes": estimate},
    }


def check_pinned(param: str, uri: str, path: Path, digests: dict[str, str] | None) -> None:
    """Refuses a dataset whose content is not what validation read (a file or URL rewritten since): the
    job would train on data nobody checked, and a resumed attempt would mix two datasets."""
    expected = (digests or {}).get(param)
    if expected is None:  # validated before digests were recorded
        return
    actual = sha256_file(path)
    if actual != expected:
        raise JobFailure(
            JobErrorCode.invalid_dataset,
            f"{param}: {uri} changed after the job was validated (sha256 {expected[:12]}… then, "
            f"{actual[:12]}… now); a job trains only on the data that was checked: restore the file or "
            "submit the job again",
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Attempt:
    """One claimed attempt of a job, from preparation to its final write."""

    def __init__(self, settings: Settings, job_id: str, attempt: int, lease: Lease, work_dir: Path) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.lease = lease
        self.work_dir = work_dir
        self.store = make_store(settings)
        self.cache = AssetCache(settings, self.store)
        self.started = time.monotonic()

    # -- writes, all fenced by the attempt ----------------------------------------------------------

    def write(self, action: Callable[[Session], T], what: str) -> T:
        """Runs a write in its own transaction, riding out a database restart."""

        def attempt() -> T:
            with session_scope(self.settings.database_url) as session:
                return action(session)

        return retry_transient(attempt, what=f"{what} (job {self.job_id})")

    def event(self, type: str, message: str, level: str = "info", **data: object) -> None:
        def add(session: Session) -> None:
            job = session.get(Job, self.job_id)
            if job is not None and job.attempt == self.attempt:
                job_service.add_event(
                    session=session,
                    job_id=self.job_id,
                    type=type,
                    message=message,
                    level=level,
                    attempt=self.attempt,
                    data=dict(data),
                )

        self.write(add, "an event")

    def move(self, to: JobStatus, message: str, **values: object) -> bool:
        return self.write(
            lambda session: job_service.transition(
                session=session,
                job_id=self.job_id,
                to=to,
                attempt=self.attempt,
                # Only from a state this attempt is in: if the reaper already handed the job back (same
                # attempt number, now queued), this attempt must not fail or requeue it again.
                from_=ACTIVE,
                message=message,
                **values,
            ),
            f"the move to {to.value}",
        )

    def fail(self, code: JobErrorCode, message: str) -> JobStatus:
        self.move(JobStatus.failed, f"job failed: {message}", error_code=code.value, error_message=message)
        return JobStatus.failed

    def requeue(self, message: str, *, delay: float = 0.0) -> JobStatus:
        """Gives the job back to the queue for another attempt (after `delay` seconds)."""
        not_before = utcnow() + timedelta(seconds=delay) if delay > 0 else None
        moved = self.move(JobStatus.queued, message, not_before=not_before, enqueued_at=None, worker_id=None)
        # A delayed retry is sent by the sweeper once its back-off ends; so is this one if sending fails.
        if moved and delay <= 0:
            try:
                with session_scope(self.settings.database_url) as session:
                    job = session.get(Job, self.job_id)
                    if job is not None:
                        enqueue_job(self.settings, session, job)
            except Exception:
                log.warning(
                    "could not send job %s to the queue; the sweeper will", self.job_id, exc_info=True
                )
        return JobStatus.queued

    def retry_or_fail(self, code: JobErrorCode, reason: str) -> JobStatus:
        """Applies the retry budget: another attempt after a growing back-off, or failure with the reason."""
        if self.attempt >= self.settings.max_attempts:
            return self.fail(code, f"{reason}; gave up after {self.attempt} attempts")
        delay = self.settings.retry_backoff_seconds * (2 ** (self.attempt - 1))
        return self.requeue(
            f"attempt {self.attempt} failed ({reason}); attempt {self.attempt + 1} of "
            f"{self.settings.max_attempts} in {delay:.0f}s",
            delay=delay,
        )

    # -- the attempt ----------------------------------------------------------------------------------

    def load(self) -> tuple[JobSpec, Job]:
        with session_scope(self.settings.database_url) as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            session.expunge(job)
        return JobSpec.model_validate(job.spec), job

    def prepare(self, spec: JobSpec, job: Job) -> LaunchSpec:
        """Fetches the job's inputs into the worker's cache, and the latest checkpoint to resume from."""
        with session_scope(self.settings.database_url) as session:
            paths = {}
            for param, uri in (("dataset", job.dataset_uri), ("validation_dataset", job.validation_uri)):
                if uri:
                    path = self.cache.dataset_file(uri, session=session, team_id=job.team_id, param=param)
                    check_pinned(param, uri, path, job.input_digests)
                    paths[param] = str(path)
            sources = [
                str(self.cache.adapter_dir(source, session=session, team_id=job.team_id))
                for source in job_sources(spec)
            ]
        assert spec.base_model is not None
        model_dir = self.cache.model_dir(spec.base_model)
        return LaunchSpec(
            job_id=self.job_id,
            attempt=self.attempt,
            team_id=job.team_id,
            spec=spec.model_dump(mode="json"),
            model_dir=str(model_dir),
            train_path=paths.get("dataset"),
            eval_path=paths.get("validation_dataset"),
            sources=sources,
            resume_from=self.latest_checkpoint(),
        )

    def latest_checkpoint(self) -> str | None:
        """Downloads the job's latest complete checkpoint; returns its folder (None if there is none)."""
        with session_scope(self.settings.database_url) as session:
            latest = job_service.latest_checkpoint(session=session, job_id=self.job_id)
        if latest is None:
            return None
        checkpoint, files = latest
        folder = self.work_dir / "resume" / f"checkpoint-{checkpoint.step}"
        shutil.rmtree(folder, ignore_errors=True)
        for artifact in files:
            relative = artifact.name.removeprefix(checkpoint.prefix + "/")
            self.store.get_file(artifact.storage_key, folder / relative, expected_sha256=artifact.sha256)
        return str(folder)

    def command(self, spec: JobSpec) -> list[str]:
        launch = [sys.executable, "-m", "worker.launch", str(self.work_dir)]
        processes = spec.resources.gpus
        # DeepSpeed needs the process-group environment torchrun sets, even for one process (without it,
        # it goes looking for MPI).
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

    def supervise(self, spec: JobSpec, runtime_before: float) -> Outcome:
        """Runs the training process group until it ends, is cancelled, times out or must stop."""
        for name in ("result.json", "failure.json", "STOP"):
            (self.work_dir / name).unlink(missing_ok=True)
        env = (
            os.environ
            | child_environment(str(self.settings.cache_dir))
            | self.settings.to_env()
            | {"TUNEFORGE_JOB_ID": self.job_id, "TUNEFORGE_ATTEMPT": str(self.attempt)}
        )
        limit = 60 * (spec.resources.max_runtime_minutes or self.settings.default_max_runtime_minutes)
        log_path = self.work_dir / "training.log"
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                self.command(spec), env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        stop_asked_at: float | None = None
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            if self.lease.cancel_requested.is_set():
                self.kill(proc)
                return Outcome("cancelled")
            if self.lease.lost.is_set():
                self.kill(proc)
                return Outcome("lost")
            if runtime_before + time.monotonic() - self.started > limit:
                self.kill(proc)
                return Outcome("timeout", detail=f"{limit / 60:.0f} minutes")
            if SHUTDOWN.is_set() and stop_asked_at is None:
                (self.work_dir / "STOP").touch()
                stop_asked_at = time.monotonic()
                self.event("shutdown", "the worker is shutting down; checkpointing to resume elsewhere")
            if (
                stop_asked_at is not None
                and time.monotonic() - stop_asked_at > self.settings.shutdown_grace_seconds
            ):
                self.kill(proc)
                return Outcome("stopped", detail="no checkpoint in time; resuming from the last one")
        code = proc.returncode
        if code == EXIT_OK:
            return Outcome("ok", code)
        if code == EXIT_STOPPED:
            return Outcome("stopped", code)
        if code == EXIT_OUT_OF_MEMORY:
            return Outcome("oom", code)
        if code == EXIT_FAILED:
            return Outcome("failed", code, (self.work_dir / "failure.json").read_text())
        if stop_asked_at is not None:
            return Outcome("stopped", code, "the training process ended while checkpointing")
        return Outcome("crashed", code, _tail(log_path))

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Stops the whole training process group: SIGTERM, then SIGKILL after the grace period."""
        for sig, wait in ((signal.SIGTERM, self.settings.kill_grace_seconds), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def halve_micro_batch(self, spec: JobSpec) -> JobSpec | None:
        """Returns the spec with half the micro-batch and twice the accumulation, or None at batch size 1."""
        hp = spec.hyperparameters
        if hp is None or hp.batch_size <= 1:
            return None
        new_hp = hp.model_copy(
            update={
                "batch_size": hp.batch_size // 2,
                "gradient_accumulation_steps": hp.gradient_accumulation_steps * 2,
            }
        )
        new_spec = spec.model_copy(update={"hyperparameters": new_hp})
        with session_scope(self.settings.database_url) as session:
            job = session.get(Job, self.job_id)
            if job is None or job.attempt != self.attempt:
                return None
            job.spec = new_spec.model_dump(mode="json")
            job_service.add_event(
                session=session,
                job_id=self.job_id,
                type="out_of_memory",
                level="warning",
                message=f"out of memory at micro-batch {hp.batch_size}; retrying with micro-batch "
                f"{new_hp.batch_size} and gradient accumulation {new_hp.gradient_accumulation_steps} "
                "(the same effective batch)",
                attempt=self.attempt,
                data={
                    "batch_size": new_hp.batch_size,
                    "gradient_accumulation_steps": new_hp.gradient_accumulation_steps,
                },
            )
        return new_spec

    def finish(self, spec: JobSpec) -> JobStatus | None:
        """Uploads the result folder and marks the job succeeded, in one fenced transaction."""
        result = json.loads((self.work_dir / "result.json").read_text())
        output = Path(result["output_dir"])
        kind = result["kind"]
        prefix = f"artifacts/{self.team_id}/{self.job_id}/attempt-{self.attempt}/{kind}"
        stored = self.store.put_tree(prefix, output)
        names = [p.relative_to(output).as_posix() for p in sorted(output.rglob("*")) if p.is_file()]

        def succeed(session: Session) -> JobStatus | None:
            job = session.get(Job, self.job_id)
            assert job is not None
            if job.attempt != self.attempt or job.status != JobStatus.running:
                return None
            job_service.record_artifacts(
                session=session, job=job, kind=kind, stored=zip(names, stored, strict=True)
            )
            memory = memory_event(result["metrics"], job.plan)
            if memory is not None:
                job_service.add_event(
                    session=session, job_id=self.job_id, type="memory", attempt=self.attempt, **memory
                )
            job_service.transition(
                session=session,
                job_id=self.job_id,
                to=JobStatus.succeeded,
                attempt=self.attempt,
                message="job succeeded"
                + (f" after {result['metrics']['steps']} steps" if result["metrics"].get("steps") else ""),
                trainable_params=result["trainable_params"],
                total_params=result["total_params"],
                trained_tokens=result["trained_tokens"],
                result=result["metrics"],
            )
            return JobStatus.succeeded

        return self.write(succeed, "the result")

    def run(self) -> JobStatus | None:
        spec, job = self.load()
        self.team_id = job.team_id
        try:
            launch = self.prepare(spec, job)
        except JobFailure as failure:
            return self.fail(failure.code, failure.message)
        except StorageError as exc:
            return self.retry_or_fail(JobErrorCode.storage_error, f"object storage failed: {exc}")
        self.event(
            "worker",
            f"running {spec.method.value} on {self.settings.worker_id}",
            worker=self.settings.worker_id,
        )
        while True:
            launch.write(self.work_dir)
            outcome = self.supervise(spec, job.runtime_seconds)
            log.info("job %s attempt %d: training process ended: %s", self.job_id, self.attempt, outcome.kind)
            if outcome.kind == "ok":
                try:
                    return self.finish(spec)
                except StorageError as exc:
                    return self.retry_or_fail(
                        JobErrorCode.storage_error, f"could not store the result: {exc}"
                    )
            if outcome.kind == "failed":
                failure = json.loads(outcome.detail)
                return self.fail(JobErrorCode(failure["code"]), failure["message"])
            if outcome.kind == "cancelled":
                self.move(JobStatus.cancelled, "training stopped; job cancelled")
                return JobStatus.cancelled
            if outcome.kind == "lost":
                log.warning(
                    "job %s attempt %d lost its lease; stopped without writing", self.job_id, self.attempt
                )
                return None
            if outcome.kind == "timeout":
                return self.fail(
                    JobErrorCode.timeout,
                    f"the job ran longer than its limit of {outcome.detail}; raise resources.max_runtime_minutes "
                    "or train fewer steps",
                )
            if outcome.kind == "stopped":
                return self.requeue(
                    f"attempt {self.attempt} checkpointed and stopped ({outcome.detail or 'shutdown'})"
                )
            if outcome.kind == "oom":
                smaller = self.halve_micro_batch(spec)
                if smaller is None and spec.hyperparameters is None:
                    return self.fail(
                        JobErrorCode.out_of_memory,
                        f"out of memory while running {spec.method.value}; it needs a worker with more memory",
                    )
                if smaller is None:
                    return self.fail(
                        JobErrorCode.out_of_memory,
                        "out of GPU memory even at micro-batch 1; lower max_seq_length, use qlora, more GPUs or "
                        "a ZeRO stage",
                    )
                spec = smaller
                # The inputs are fetched already; only the spec and the checkpoint to resume from change.
                try:
                    resume_from = self.latest_checkpoint()
                except StorageError as exc:
                    return self.retry_or_fail(JobErrorCode.storage_error, f"object storage failed: {exc}")
                launch = replace(launch, spec=spec.model_dump(mode="json"), resume_from=resume_from)
                continue
            return self.retry_or_fail(
                JobErrorCode.internal_error,
                f"the training process crashed (exit code {outcome.code}): {outcome.detail[-1500:]}",
            )

    def close(self) -> None:
        """Adds this attempt's run time to the job's total."""
        elapsed = time.monotonic() - self.started
        try:
            with session_scope(self.settings.database_url) as session:
                job = session.get(Job, self.job_id)
                if job is not None and job.attempt == self.attempt:
                    job.runtime_seconds = (job.runtime_seconds or 0.0) + elapsed
        except Exception:
            log.exception("could not record the run time of job %s", self.job_id)


def run_job(settings: Settings, job_id: str) -> JobStatus | None:
    """Claims and runs a queued job; returns its status after this attempt, or None if it was not this
    worker's to run (or the attempt lost it)."""
    with session_scope(settings.database_url) as session:
        attempt = job_service.claim_job(
            session=session,
            job_id=job_id,
            worker_id=settings.worker_id,
            lease_timeout=settings.lease_timeout_seconds,
            settings=settings,
        )
    if attempt is None:
        log.info(
            "job %s is not claimable (running elsewhere, waiting for a retry, finished or cancelled)", job_id
        )
        return None
    work_dir = Path(tempfile.mkdtemp(prefix=f"tuneforge-{job_id}-"))
    runner = None
    try:
        with job_context(job_id, attempt), Lease(settings, job_id, attempt) as lease:
            log.info("job %s attempt %d started", job_id, attempt)
            runner = Attempt(settings, job_id, attempt, lease, work_dir)
            return runner.run()
    except Exception as exc:
        log.exception("job %s attempt %d broke", job_id, attempt)
        if runner is not None:
            return runner.retry_or_fail(
                JobErrorCode.internal_error, f"the worker failed: {type(exc).__name__}: {exc}"
            )
        raise
    finally:
        if runner is not None:
            runner.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        _never_left_running(settings, job_id, attempt)


def _never_left_running(settings: Settings, job_id: str, attempt: int) -> None:
    """Fails the attempt if it is still marked running once this worker is done with it."""
    try:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            if (
                job is not None
                and job.attempt == attempt
                and job.status in (JobStatus.running, JobStatus.cancelling)
            ):
                to = JobStatus.cancelled if job.status == JobStatus.cancelling else JobStatus.failed
                job_service.transition(
                    session=session,
                    job_id=job_id,
                    to=to,
                    attempt=attempt,
                    from_=frozenset({JobStatus(job.status)}),
                    message="the worker stopped without finishing the job",
                    error_code=None if to is JobStatus.cancelled else JobErrorCode.internal_error.value,
                    error_message=None
                    if to is JobStatus.cancelled
                    else "the worker stopped unexpectedly; resubmit",
                )
    except Exception:
        log.exception("could not settle job %s after attempt %d", job_id, attempt)
