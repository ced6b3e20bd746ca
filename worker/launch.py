"""The process that runs one attempt of a job's recipe; the worker starts it (under torchrun, one per GPU,
for multi-GPU jobs) and watches it. `python -m worker.launch WORK_DIR`.

It talks back through files in WORK_DIR: launch.json (what to run), result.json or failure.json (how it
ended), and STOP (created by the worker: checkpoint and stop). Its exit code says how it ended.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_FAILED = 10  # failure.json says why; not worth retrying
EXIT_OUT_OF_MEMORY = 11
EXIT_STOPPED = 12  # stopped on request after a checkpoint

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


def _die_with_parent() -> None:
    # Linux: if the worker is killed (even with SIGKILL), the kernel sends this process SIGKILL too, so no
    # orphaned training keeps a GPU busy while another attempt starts.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(work_dir: Path) -> int:
    """Runs the recipe; returns the exit code."""
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

    settings = get_settings()
    launch = LaunchSpec.read(work_dir)
    spec = JobSpec.model_validate(launch.spec)
    rank = _rank()
    writer = AttemptWriter(settings, launch.job_id, launch.attempt)
    # Under torchrun, rank 0 speaks for the job; the others would only repeat it.
    reporter = writer if rank == 0 else QuietReporter()
    stop_file = work_dir / "STOP"

    def fail(code: JobErrorCode, message: str) -> int:
        if rank == 0:
            (work_dir / "failure.json").write_text(json.dumps({"code": code.value, "message": message}))
        return EXIT_FAILED

    try:
        try:
            train = read_dataset(Path(launch.train_path)) if launch.train_path else None
            evaluation = read_dataset(Path(launch.eval_path)) if launch.eval_path else None
        except DatasetInvalid as exc:
            raise JobFailure(JobErrorCode.invalid_dataset, str(exc)) from exc
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
            should_stop=stop_file.exists,
            train_data=train,
            eval_data=evaluation,
            sources=[Path(s) for s in launch.sources],
            checkpoints=CheckpointUploader(patient_store(settings, writer), writer, launch.team_id),
            checkpoint_steps=settings.checkpoint_steps,
            resume_from=Path(launch.resume_from) if launch.resume_from else None,
        )
        recipe = recipe_for(spec.method)(ctx)
        result = recipe.run()
        writer.flush()
        if rank == 0:
            (work_dir / "result.json").write_text(
                json.dumps(
                    {
                        "output_dir": str(result.output_dir),
                        "kind": recipe.artifact_kind,
                        "trainable_params": result.trainable_params,
                        "total_params": result.total_params,
                        "trained_tokens": result.trained_tokens,
                        "metrics": result.metrics,
                    }
                )
            )
        return EXIT_OK
    except JobStopped:
        writer.flush()
        return EXIT_STOPPED
    except JobFailure as failure:
        writer.flush()
        return fail(failure.code, failure.message)
    except torch.OutOfMemoryError as exc:
        log.warning("out of memory: %s", exc)
        writer.flush()
        return EXIT_OUT_OF_MEMORY
    except StorageError as exc:  # a checkpoint could not be stored; another attempt resumes from the last one
        log.warning("object storage failed: %s", exc)
        writer.flush()
        return fail(storage_code(exc), f"a checkpoint could not be stored: {exc}")


def main() -> None:
    from shared.logs import configure_logging

    _die_with_parent()
    configure_logging(os.environ.get("TUNEFORGE_LOG_LEVEL", "INFO"))
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
