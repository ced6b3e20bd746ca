"""The job spec: what a user asks for, validated once and shared by the API and the worker."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator


class Method(StrEnum):
    lora = "lora"
    dora = "dora"
    rslora = "rslora"
    qlora = "qlora"
    merge = "merge"
    fusion = "fusion"


# Methods this release trains; the others are part of the API already and answer a clear 422.
AVAILABLE_METHODS: frozenset[Method] = frozenset({Method.lora})


class Priority(StrEnum):
    low = "low"
    normal = "normal"
    high = "high"


TargetModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]
TargetModulePreset = Literal["attention", "all-linear"]


class AdapterSpec(BaseModel):
    """The adapter to train: its rank, scaling, dropout and the modules it wraps."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch, in [0, 1)")
    target_modules: (
        TargetModulePreset | Annotated[list[TargetModuleName], Field(min_length=1, max_length=64)]
    ) = Field(
        "all-linear",
        description="`attention` (q/k/v/o projections), `all-linear` (every linear layer but the output "
        "head), "
        "or an explicit list of module names",
    )

    @model_validator(mode="after")
    def _default_alpha(self) -> AdapterSpec:
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        return self


class Hyperparameters(BaseModel):
    """How to train: length (epochs or max_steps), optimiser settings, batching and sequence length."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, le=100, description="passes over the dataset; default 3")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="optimizer steps; replaces epochs")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=1024, description="micro-batch size per device")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int = Field(1024, ge=16, le=131072, description="longer samples are truncated")
    packing: bool = Field(False, description="pack several samples into each sequence")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, about 20-30% slower"
    )
    seed: int = Field(42, ge=0, le=2**31 - 1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0, le=1)
    logging_steps: int = Field(1, ge=1, le=10_000)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default: once per epoch")

    @model_validator(mode="after")
    def _length(self) -> Hyperparameters:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give either epochs or max_steps, not both")
        if self.epochs is None and self.max_steps is None:
            self.epochs = 3
        return self


class Resources(BaseModel):
    """Hardware a job asks for."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(1, ge=1, le=64, description="GPUs for this job")
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0 = plain data parallel)")


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobSpec(BaseModel):
    """A fine-tuning job as submitted, with every default filled in."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "base_model": "smollm2-135m-instruct",
                    "dataset": "file-0123456789abcdef01234567",
                    "method": "lora",
                    "adapter": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                    "hyperparameters": {"epochs": 3, "learning_rate": 0.0002, "batch_size": 4},
                    "metadata": {"project": "support-bot"},
                }
            ]
        },
    )

    base_model: str = Field(min_length=1, max_length=255, description="a name from GET /v1/models")
    dataset: str = Field(
        min_length=1, max_length=2048, description="an uploaded file id, s3://bucket/key or file:///path"
    )
    validation_dataset: str | None = Field(None, min_length=1, max_length=2048)
    method: Method = Method.lora
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    priority: Priority = Priority.normal
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] = Field(default_factory=dict)
