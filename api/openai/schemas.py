"""Request and response shapes of the OpenAI-compatible fine-tuning surface (/v1/fine_tuning).

The objects follow OpenAI's `fine_tuning.job`, `fine_tuning.job.event` and `fine_tuning.job.checkpoint`, so
the official `openai` client parses them. Tuneforge's own settings travel in one extra body field,
`tuneforge` (the client's `extra_body`), and come back in an extra `tuneforge` field of the job object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import Checkpoint, Job, JobEvent
from shared.schemas import (
    AdapterSpec,
    DpoSpec,
    Hyperparameters,
    InitFrom,
    JobSpec,
    Method,
    Priority,
    QuantizationSpec,
    Resources,
    Suffix,
)
from shared.services.fine_tuning import CHECKPOINT_PREFIX, EVENT_PREFIX, results_file_id
from shared.states import JobStatus

# learning_rate_multiplier 1 (or "auto") is this learning rate, JobSpec's default for adapter training.
BASE_LEARNING_RATE = 2e-4
# The largest multiplier: JobSpec caps the learning rate at 1.
MAX_LEARNING_RATE_MULTIPLIER = 1 / BASE_LEARNING_RATE
# Jobs made before JobSpec had a `suffix` kept it in their metadata under this key: the OpenAI surface hides
# the key from `metadata` and shows it as `user_provided_suffix`; new requests may not use it.
SUFFIX_KEY = "tuneforge.suffix"

OpenAIStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
# `cancelling` is shown as `running`: the job still holds its GPU until the worker stops it (seconds), and
# it can still end `failed`; a client polling for a terminal status must not see one that later changes.
# `pausing` likewise: it trains until its checkpoint is stored, and may still finish first.
STATUS: dict[JobStatus, OpenAIStatus] = {
    JobStatus.validating: "validating_files",
    JobStatus.queued: "queued",
    JobStatus.running: "running",
    JobStatus.cancelling: "running",
    JobStatus.pausing: "running",
    JobStatus.paused: "paused",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


# ---------------------------------------------------------------------------------------------- requests


class OpenAIHyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; "auto" (or leaving one out) takes Tuneforge's default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="passes over the training file; auto = 3 (or tuneforge.hyperparameters.max_steps)"
    )
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="micro-batch size per device; auto = 4"
    )
    learning_rate_multiplier: (
        Literal["auto"] | Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE_MULTIPLIER)] | None
    ) = Field(
        None,
        description=f"learning rate = {BASE_LEARNING_RATE} x multiplier; auto = 1 (learning rate "
        f"{BASE_LEARNING_RATE})",
    )


class SupervisedMethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class OpenAIDpoHyperparameters(OpenAIHyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and beta; "auto" takes Tuneforge's default."""

    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] | None = Field(
        None, description="how far the model may move from the reference; auto = 0.1"
    )


class DpoMethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIDpoHyperparameters | None = None


class MethodIn(BaseModel):
    """OpenAI's `method` object: `supervised` and `dpo` are trained here."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="supervised or dpo (reinforcement is refused)")
    supervised: SupervisedMethodIn | None = None
    dpo: DpoMethodIn | None = None
    reinforcement: dict[str, Any] | None = None


class TuneforgeOptions(BaseModel):
    """Tuneforge's settings for a job made through the OpenAI surface (send as `extra_body={"tuneforge":
    {...}}`). Each maps onto the JobSpec field of the same name (see POST /v1/jobs)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "method": "dora",
                    "adapter": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
                    "hyperparameters": {"max_steps": 200, "max_seq_length": 2048, "warmup_ratio": 0.03},
                    "resources": {"gpus": 1},
                    "priority": "high",
                }
            ]
        },
    )

    method: Literal["lora", "dora", "rslora", "qlora"] = Field(
        "lora",
        description="the PEFT method; with OpenAI's method type dpo, the adapter DPO trains (dora and rslora "
        "set adapter.use_dora / use_rslora, qlora a 4-bit base)",
    )
    adapter: AdapterSpec | None = Field(None, description="LoRA rank, alpha, dropout, target_modules, ...")
    quantization: QuantizationSpec | None = Field(None, description="4-bit base storage (method qlora)")
    dpo: DpoSpec | None = Field(
        None,
        description="DPO's loss_type and label_smoothing (method type dpo); beta may be given here instead",
    )
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="any JobSpec hyperparameter (max_steps, max_seq_length, packing, warmup_ratio, "
        "lr_scheduler, weight_decay, gradient_accumulation_steps, eval_steps, checkpoint_steps, ...); "
        "epochs, batch_size, learning_rate and seed may also be given here instead of through the OpenAI "
        "fields, not both",
    )
    resources: Resources | None = None
    priority: Priority = Priority.normal


class FineTuningJobCreate(BaseModel):
    """OpenAI's create-job body, plus `tuneforge` for the PEFT settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        max_length=255,
        description="a base model from GET /v1/models, or a fine-tuned model this API named "
        "(ft:<base>:<team>:<suffix>:<job id>[:ckpt-step-<n>]) to continue from its adapter or checkpoint",
    )
    training_file: str = Field(
        min_length=1, max_length=2048, description="an uploaded file id (or any dataset URI /v1/jobs takes)"
    )
    validation_file: str | None = Field(None, min_length=1, max_length=2048)
    hyperparameters: OpenAIHyperparameters | None = Field(
        None, description="deprecated by OpenAI in favour of method.supervised.hyperparameters; either works"
    )
    method: MethodIn | None = None
    suffix: Suffix = Field(
        None,
        description="names the fine-tuned model ft:<base>:<team>:<suffix>:<job id>: 1 to 64 letters, digits, "
        "'_', '.' or '-'",
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="default 42 (retries stay idempotent)")
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = Field(
        None,
        description='experiment trackers: [{"type": "wandb", "wandb": {"project", "name", "entity", "tags"}}] '
        'and Tuneforge\'s [{"type": "mlflow", "mlflow": {"experiment", "run_name"}}]',
    )
    tuneforge: TuneforgeOptions | None = None


# --------------------------------------------------------------------------------------------- responses


class OpenAIErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ResolvedHyperparameters(BaseModel):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]

    @classmethod
    def of(cls, hp: Hyperparameters | None) -> ResolvedHyperparameters:
        if hp is None:
            return cls(n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto")
        multiplier = (
            float(f"{hp.learning_rate / BASE_LEARNING_RATE:.6g}") if hp.learning_rate is not None else "auto"
        )
        # A job bounded by max_steps has no epoch count: "auto" (tuneforge.hyperparameters has max_steps).
        return cls(
            n_epochs=hp.epochs if hp.epochs is not None else "auto",
            batch_size=hp.batch_size,
            learning_rate_multiplier=multiplier,
        )


class SupervisedMethodOut(BaseModel):
    hyperparameters: ResolvedHyperparameters


class ResolvedDpoHyperparameters(ResolvedHyperparameters):
    beta: float


class DpoMethodOut(BaseModel):
    hyperparameters: ResolvedDpoHyperparameters


class MethodOut(BaseModel):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethodOut | None = None
    dpo: DpoMethodOut | None = None

    @classmethod
    def of(cls, spec: JobSpec, resolved: ResolvedHyperparameters) -> MethodOut:
        if spec.method is Method.dpo and spec.dpo is not None:
            hyperparameters = ResolvedDpoHyperparameters(**resolved.model_dump(), beta=spec.dpo.beta)
            return cls(type="dpo", dpo=DpoMethodOut(hyperparameters=hyperparameters))
        return cls(supervised=SupervisedMethodOut(hyperparameters=resolved))


class TuneforgeJobInfo(BaseModel):
    """Tuneforge's view of the job: the native status and the full, resolved training settings."""

    status: str = Field(
        description="the native status (shows `cancelling` and `pausing`, which the OpenAI view calls running)"
    )
    method: str
    adapter: AdapterSpec | None = None
    quantization: QuantizationSpec | None = None
    dpo: DpoSpec | None = None
    hyperparameters: Hyperparameters | None = None
    init_from: InitFrom | None = Field(None, description="the job (and checkpoint) this job continued from")
    resources: Resources
    priority: str
    attempt: int
    trainable_params: int | None = None
    total_params: int | None = None
    result: dict[str, Any] = Field(default_factory=dict)
    started_at: int | None = None
    updated_at: int


class FineTuningJobOut(BaseModel):
    """OpenAI's `fine_tuning.job`, with Tuneforge's details under `tuneforge`."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: OpenAIErrorBody | None = None
    fine_tuned_model: str | None = Field(
        None, description="ft:<base>:<team>:<suffix>:<job id> once the job succeeded"
    )
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str = Field(description="the team")
    result_files: list[str] = Field(description="a succeeded job's metrics CSV, readable through /v1/files")
    seed: int
    status: OpenAIStatus
    trained_tokens: int | None = None
    training_file: str | None
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    method: MethodOut
    user_provided_suffix: str | None = None
    tuneforge: TuneforgeJobInfo

    @classmethod
    def of(cls, job: Job, team_label: str) -> FineTuningJobOut:
        spec = JobSpec.model_validate(job.spec)
        status = JobStatus(job.status)
        metadata = dict(job.user_metadata or {})
        suffix = spec.suffix or metadata.pop(SUFFIX_KEY, None)
        metadata.pop(SUFFIX_KEY, None)
        resolved = ResolvedHyperparameters.of(spec.hyperparameters)
        succeeded = status is JobStatus.succeeded
        return cls(
            id=job.id,
            created_at=unix(job.created_at),
            error=(
                OpenAIErrorBody(code=job.error_code, message=job.error_message or "", param=None)
                if job.error_code
                else None
            ),
            fine_tuned_model=(
                f"ft:{job.base_model}:{team_label}:{suffix or ''}:{job.id}" if succeeded else None
            ),
            finished_at=unix(job.finished_at) if status is not JobStatus.cancelling else None,
            hyperparameters=resolved,
            model=job.base_model,
            organization_id=job.team_id,
            result_files=[results_file_id(job.id)] if succeeded else [],
            seed=spec.hyperparameters.seed if spec.hyperparameters else 42,
            status=STATUS[status],
            trained_tokens=job.trained_tokens,
            training_file=job.dataset_uri,
            validation_file=job.validation_uri,
            metadata=metadata,
            integrations=[i.model_dump(exclude_none=True) for i in spec.integrations],
            method=MethodOut.of(spec, resolved),
            user_provided_suffix=suffix,
            tuneforge=TuneforgeJobInfo(
                status=job.status,
                method=job.method,
                adapter=spec.adapter,
                quantization=spec.quantization,
                dpo=spec.dpo,
                hyperparameters=spec.hyperparameters,
                init_from=spec.init_from,
                resources=spec.resources,
                priority=job.priority,
                attempt=job.attempt,
                trainable_params=job.trainable_params,
                total_params=job.total_params,
                result=job.result or {},
                started_at=unix(job.started_at),
                updated_at=unix(job.updated_at),
            ),
        )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobOut]
    has_more: bool


class FineTuningJobEventOut(BaseModel):
    """OpenAI's `fine_tuning.job.event`; `tuneforge_type` is the native event type (status, dataset, ...)."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]
    tuneforge_type: str

    @classmethod
    def of(cls, event: JobEvent) -> FineTuningJobEventOut:
        level = {"warning": "warn", "error": "error"}.get(event.level, "info")
        return cls(
            id=f"{EVENT_PREFIX}{event.id}",
            created_at=unix(event.created_at),
            level=level,
            message=event.message,
            data=event.data or {},
            type="metrics" if event.type == "metrics" else "message",
            tuneforge_type=event.type,
        )


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEventOut]
    has_more: bool


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int
    train_loss: float | None = None
    valid_loss: float | None = None


class FineTuningJobCheckpointOut(BaseModel):
    """OpenAI's `fine_tuning.job.checkpoint`; download it at `download_url` (a tar of the training state)."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="ft:<base>:<team>:<suffix>:<job id>:ckpt-step-<n>")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
    download_url: str

    @classmethod
    def of(
        cls, checkpoint: Checkpoint, job: Job, team_label: str, valid_loss: float | None
    ) -> FineTuningJobCheckpointOut:
        suffix = (job.spec or {}).get("suffix") or (job.user_metadata or {}).get(SUFFIX_KEY) or ""
        stored = {k: v for k, v in (checkpoint.metrics or {}).items() if k not in ("step", "valid_loss")}
        return cls(
            id=f"{CHECKPOINT_PREFIX}{checkpoint.id}",
            created_at=unix(checkpoint.created_at),
            fine_tuned_model_checkpoint=(
                f"ft:{job.base_model}:{team_label}:{suffix}:{job.id}:ckpt-step-{checkpoint.step}"
            ),
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(step=checkpoint.step, valid_loss=valid_loss, **stored),
            step_number=checkpoint.step,
            download_url=f"/v1/jobs/{job.id}/checkpoints/{checkpoint.step}.tar",
        )


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpointOut]
    has_more: bool


class FileDeleted(BaseModel):
    """OpenAI's answer to a file deletion."""

    object: Literal["file"] = "file"
    id: str
    deleted: bool = True
