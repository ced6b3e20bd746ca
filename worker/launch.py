"""The process that runs one attempt of a job's recipe; the worker starts it (under torchrun, one per GPU,
for multi-GPU jobs) and watches it. `python -m worker.launch WORK_DIR`.

It talks back through files in WORK_DIR: launch.json (what to run), outcome-rank<N>.json from every rank
(how it ended: ok, failed with a code, out of memory, stopped), result.json (rank 0, on success) or
failure.json (rank 0, on a job failure), and STOP (created by the worker: checkpoint and stop).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_FAILED = 10  # failure.json says why; not worth retrying
EXIT_OUT_OF_MEMORY = 11
EXIT_STOPPED = 12  # stopped on request after a checkpoint
# Files in the work folder through which the training process and the worker talk.
RESULT_FILE = "result.json"
FAILURE_FILE = "failure.json"
STOP_FILE = "STOP"
OUTCOME_PREFIX = "outcome-rank"

log = logging.getLogger("worker.launch")


@dataclass
class LaunchSpec:
    """What the worker hands to the training process."""

    job_id: str
    attempt: int
    team_id: str
    spec: dict[str, Any]
    model_dir: str
    train_path: str | None = None
    eval_path: str | None = None
    sources: list[str] = field(default_factory=list)
    resume_from: str | None = None
    # The adapter a training job starts from (init_from): a folder with adapter_config.json and weights.
    init_from: str | None = None
    # The datasets' sha256 as validation pinned them (dataset, validation_dataset): they key the tokenized cache.
    dataset_sha256: dict[str, str] = field(default_factory=dict)

    def write(self, work_dir: Path) -> None:
        (work_dir / "launch.json").write_text(json.dumps(self.__dict__))

    @classmethod
    def read(cls, work_dir: Path) -> LaunchSpec:
        return cls(**json.loads((work_dir / "launch.json").read_text()))


class QuietReporter:
    """The reporter of ranks other than 0."""

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        pass

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        pass


def dataset_digests(launch: LaunchSpec) -> dict[str, str]:
    """The sha256 of each dataset: as validation pinned it, or read from the file (a launch.json without them)."""
    from shared.datasets import dataset_digest

    digests = dict(launch.dataset_sha256)
    for param, path in (("dataset", launch.train_path), ("validation_dataset", launch.eval_path)):
        if path and param not in digests:
            digests[param] = dataset_digest(Path(path))
    return digests


def _die_with_parent() -> None:
    # Linux: if the worker is killed (even with SIGKILL), the kernel sends this process SIGKILL too, so no
    # orphaned training keeps a GPU busy while another attempt starts.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass
class Ending:
    """How one rank's run of a recipe ended: ok (rank 0 carries the result), failed (a job failure's code and
    message), oom, or stopped (after a checkpoint, on request)."""

    kind: str
    code: str | None = None
    message: str = ""
    result: dict[str, Any] | None = None


def train_attempt(
    launch: LaunchSpec, work_dir: Path, rank: int, should_stop: Callable[[], bool] | None = None
) -> Ending:
    """Runs the job's recipe on this rank, whatever started it (a plain process, torchrun or a Ray Train
    worker), and says how it ended; unexpected errors propagate (a crash). It stops after a checkpoint when
    `should_stop` says so (by default: when the worker creates the STOP file)."""
    import torch

    from shared.datasets import DatasetInvalid, read_dataset
    from shared.errors import JobErrorCode, JobFailure
    from shared.schemas import JobSpec
    from shared.settings import get_settings
    from shared.storage import StorageError
    from worker.assets import storage_code
    from worker.checkpoints import CheckpointUploader
    from worker.reporting import AttemptWriter, patient_store
    from worker.training.recipes import recipe_for
    from worker.training.recipes.base import JobStopped, TrainingContext
    from worker.training.trackers import job_trackers

    # What exists now (the training stack's modules) lives as long as the process: collections need not walk it
    # again. The Trainer runs a full collection as training starts, 0.2-0.4 s over these objects otherwise.
    gc.freeze()
    settings = get_settings()
    spec = JobSpec.model_validate(launch.spec)
    writer = AttemptWriter(settings, launch.job_id, launch.attempt)
    # Events and metric points leave through the writer's thread: the training loop never waits for the database.
    writer.start_background()
    # Rank 0 speaks for the job; the others would only repeat it.
    reporter = writer if rank == 0 else QuietReporter()
    # Rank 0 also logs to TensorBoard and the job's experiment trackers, each from a thread of its own.
    trackers = job_trackers(settings, spec, launch.job_id, work_dir) if rank == 0 else None
    if trackers is not None:
        reporter = trackers.reporting_to(writer)
    stop_file = work_dir / STOP_FILE
    try:
        try:
            train = read_dataset(Path(launch.train_path), split="train") if launch.train_path else None
            evaluation = (
                read_dataset(Path(launch.eval_path), split="validation") if launch.eval_path else None
            )
        except DatasetInvalid as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, str(exc)) from exc
        if settings.test_job_failure_on_rank == rank:
            raise JobFailure(JobErrorCode.invalid_config, f"simulated job failure on rank {rank} (test hook)")
        hp = spec.hyperparameters
        limit = settings.test_oom_above_micro_batch
        if limit is not None and hp is not None and hp.batch_size > limit:
            raise torch.OutOfMemoryError(
                f"simulated: micro-batch {hp.batch_size} is above {limit} (test hook)"
            )
        ctx = TrainingContext(
            job_id=launch.job_id,
            spec=spec,
            model_dir=Path(launch.model_dir),
            work_dir=work_dir,
            reporter=reporter,
            should_stop=should_stop or stop_file.exists,
            train_data=train,
            eval_data=evaluation,
            sources=[Path(s) for s in launch.sources],
            checkpoints=CheckpointUploader(
                patient_store(settings, writer),
                writer,
                launch.team_id,
                staging=work_dir / "checkpoint-uploads",
            ),
            checkpoint_steps=settings.checkpoint_steps,
            resume_from=Path(launch.resume_from) if launch.resume_from else None,
            init_from=Path(launch.init_from) if launch.init_from else None,
            cache_dir=settings.cache_dir,
            dataset_sha256=dataset_digests(launch),
            device_peak_tflops=settings.device_peak_tflops,
            bf16_offered="bf16" in settings.worker_features,
        )
        log.info(
            "rank %d: %s of %s, attempt %d%s",
            rank,
            spec.method.value,
            spec.base_model,
            launch.attempt,
            f", resuming from {Path(launch.resume_from).name}" if launch.resume_from else "",
        )
        recipe = recipe_for(spec.method)(ctx)
        result = recipe.run()
        log.info("rank %d: %s", rank, "stopped at a checkpoint" if result.stopped else "finished")
        extras = {kind: str(folder) for kind, folder in result.extras.items()}
        if trackers is not None:
            trackers.close(
                writer,
                timeout=settings.tracker_timeout_seconds,
                succeeded=True,
                metrics=result.metrics,
                adapter_dir=result.output_dir if recipe.artifact_kind == "adapter" else None,
            )
            if trackers.tensorboard_dir is not None and trackers.tensorboard_dir.is_dir():
                extras["tensorboard"] = str(trackers.tensorboard_dir)
        writer.flush()
        return Ending(
            "ok",
            result={
                "output_dir": str(result.output_dir),
                "kind": recipe.artifact_kind,
                "trainable_params": result.trainable_params,
                "total_params": result.total_params,
                "trained_tokens": result.trained_tokens,
                "metrics": result.metrics,
                # Folders stored as artifacts of their own kind (evaluation answers, TensorBoard event files).
                "extras": extras,
            },
        )
    except JobStopped:
        writer.flush()
        return Ending("stopped")
    except JobFailure as failure:
        writer.flush()
        return Ending("failed", failure.code.value, failure.message)
    except torch.OutOfMemoryError as exc:
        log.warning("out of memory: %s", exc)
        writer.flush()
        return Ending("oom", message=str(exc))
    except StorageError as exc:  # a checkpoint could not be stored; another attempt resumes from the last one
        log.warning("object storage failed: %s", exc)
        writer.flush()
        return Ending("failed", storage_code(exc).value, f"a checkpoint could not be stored: {exc}")
    finally:
        if trackers is not None and not trackers.closed:
            # The run ended without a result (stopped, failed, crashed): the trackers mark it so, briefly.
            trackers.close(writer, timeout=min(settings.tracker_timeout_seconds, 5.0), succeeded=False)
            with contextlib.suppress(Exception):
                writer.flush(timeout=10.0)


EXIT_CODES = {"ok": EXIT_OK, "failed": EXIT_FAILED, "oom": EXIT_OUT_OF_MEMORY, "stopped": EXIT_STOPPED}


def report(work_dir: Path, rank: int, ending: Ending) -> int:
    """Writes how this rank ended where the worker reads it (outcome-rank<N>.json; rank 0 also writes
    result.json or failure.json), and returns the matching exit code. The worker decides from these files,
    not from the launcher's exit code: torchrun answers 1 whatever a rank said."""
    outcome = {"kind": ending.kind, "code": ending.code, "message": ending.message}
    (work_dir / f"{OUTCOME_PREFIX}{rank}.json").write_text(json.dumps(outcome))
    if rank == 0 and ending.result is not None:
        (work_dir / RESULT_FILE).write_text(json.dumps(ending.result))
    if rank == 0 and ending.kind == "failed":
        (work_dir / FAILURE_FILE).write_text(json.dumps({"code": ending.code, "message": ending.message}))
    return EXIT_CODES[ending.kind]


def run(work_dir: Path) -> int:
    """Runs the recipe on this rank; returns the exit code."""
    rank = _rank()
    return report(work_dir, rank, train_attempt(LaunchSpec.read(work_dir), work_dir, rank))


def main() -> None:
    from shared.logs import configure_logging

    _die_with_parent()
    configure_logging(os.environ.get("TUNEFORGE_LOG_LEVEL", "INFO"))
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
