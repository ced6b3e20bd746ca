"""The interface every training recipe implements, and what a recipe is given to work with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from shared.datasets import DatasetSummary
from shared.schemas import JobSpec, Method


class Reporter(Protocol):
    """Where a recipe sends what it observes; the runner writes it to the database."""

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None: ...

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None: ...


class CheckpointSink(Protocol):
    """Where a recipe sends each saved training state (stored and recorded beside training)."""

    def save(self, step: int, folder: Path, metrics: dict[str, Any]) -> None: ...

    def wait(self) -> None:
        """Returns once every checkpoint handed over is stored and recorded."""


class JobStopped(Exception):
    """Training stopped early because the job was cancelled or the attempt lost its lease."""


@dataclass
class TrainingContext:
    """What a recipe works with; the runner fills it from the job."""

    job_id: str
    spec: JobSpec
    model_dir: Path  # the base model, a local Hugging Face folder
    work_dir: Path  # scratch space, removed after the attempt
    reporter: Reporter
    should_stop: Callable[[], bool]
    train_data: DatasetSummary | None = None  # methods that read a dataset
    eval_data: DatasetSummary | None = None
    # Finished adapters the job combines (merge, fusion) or merges into the base (export): local folders
    # holding adapter_config.json and adapter_model.safetensors, in the order the spec lists them.
    sources: list[Path] = field(default_factory=list)
    # Resumable training: where to store checkpoints and how often, and the checkpoint to resume from.
    checkpoints: CheckpointSink | None = None
    checkpoint_steps: int | None = None
    resume_from: Path | None = None
    # The adapter a training job starts from (init_from): a folder holding adapter_model.safetensors.
    init_from: Path | None = None
    # The worker's cache (tokenized datasets, the device's measured peak) and the datasets' sha256 by
    # parameter (dataset, validation_dataset), which key their tokenized copies.
    cache_dir: Path | None = None
    dataset_sha256: dict[str, str] = field(default_factory=dict)
    # The deployment's figure for the device's peak TFLOP/s (measured when unset).
    device_peak_tflops: float | None = None
    # Whether the deployment says its workers offer bf16 (TUNEFORGE_WORKER_FEATURES): a CPU worker turns bf16
    # autocast on by default only then (and only where it measured faster).
    bf16_offered: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check_stop(self) -> None:
        """Raises JobStopped if the job should stop now."""
        if self.should_stop():
            raise JobStopped()


@dataclass
class TrainingResult:
    output_dir: Path  # the artifact directory to upload
    trainable_params: int
    total_params: int
    trained_tokens: int
    metrics: dict[str, Any]
    stopped: bool = False
    # Other folders to store as artifacts of their own kind (e.g. "evaluation": the base model's and the
    # adapter's answers side by side).
    extras: dict[str, Path] = field(default_factory=dict)


class Recipe(ABC):
    """One training method: set up, train, save, clean up."""

    method: ClassVar[Method]
    # What save() writes: "adapter" (a PEFT adapter folder) or "merged" (a full model folder).
    artifact_kind: ClassVar[str] = "adapter"

    def __init__(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def setup(self) -> None:
        """Loads the model and data and prepares training."""

    @abstractmethod
    def train(self) -> None:
        """Runs training (returns early if the job is told to stop)."""

    @abstractmethod
    def save(self, output_dir: Path) -> TrainingResult:
        """Writes the artifact directory and returns what was trained."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Frees what setup took."""

    def run(self) -> TrainingResult:
        """Runs the recipe from setup to saved artifact."""
        try:
            self.setup()
            self.ctx.check_stop()
            self.train()
            self.ctx.check_stop()
            return self.save(self.ctx.work_dir / "artifact")
        finally:
            self.cleanup()
