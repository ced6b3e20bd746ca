"""Shapes of the API's answers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.answers import encode
from shared.models import Artifact, Attempt, Checkpoint, Job, JobEvent, JobMetric, Plan, UploadedFile
from shared.schemas import (
    AdapterSpec,
    DpoSpec,
    ExportSpec,
    FusionSpec,
    Hyperparameters,
    InitFrom,
    Integration,
    JobSpec,
    MergeSpec,
    Metadata,
    Priority,
    QuantizationSpec,
    Resources,
)
from shared.services.fine_tuning import ResultsFile


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class Placement(BaseModel):
    """Where the job's latest attempt runs (or ran)."""

    worker_id: str | None
    host: str
    gpu_indices: list[int] = Field(description="the node's GPUs the attempt holds (CUDA_VISIBLE_DEVICES)")
    launcher: str = Field(description="process, torchrun, or ray (a job spanning nodes)")


class QueuePlace(BaseModel):
    """Where a queued job stands."""

    position: int = Field(description="1 + the queued jobs ahead of it by priority, then age")
    gpus: int = Field(description="the GPUs it waits for, in all")
    nodes: int


class Progress(BaseModel):
    """How far a training job is, from its latest logged step."""

    step: int = Field(description="the latest logged training step")
    total_steps: int | None = Field(
        None, description="max_steps, or the steps its epochs take (from the latest step's epoch)"
    )
    fraction: float | None = Field(None, description="step / total_steps, in [0, 1]")
    estimated_finish: datetime | None = Field(
        None, description="when training should end at the current attempt's pace so far"
    )
    updated_at: datetime = Field(description="when the latest step was logged")


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: str
    method: str
    base_model: str
    dataset: str | None
    validation_dataset: str | None
    adapter: AdapterSpec | None = None
    quantization: QuantizationSpec | None = None
    dpo: DpoSpec | None = None
    merge: MergeSpec | None = None
    fusion: FusionSpec | None = None
    export: ExportSpec | None = None
    hyperparameters: Hyperparameters | None = None
    init_from: InitFrom | None = Field(None, description="the job (and checkpoint) this job continued from")
    suffix: str | None = Field(
        None, description="names the fine-tuned model ft:<base>:<team>:<suffix>:<job id>"
    )
    resources: Resources
    priority: str
    metadata: dict[str, str]
    integrations: list[Integration] = Field(
        default_factory=list, description="experiment trackers it logs to"
    )
    eval_prompts: list[str] | None = None
    eval_samples: int | None = None
    eval_max_new_tokens: int | None = None
    attempt: int = Field(description="how many times a worker has started this job")
    error: ErrorBody | None = Field(None, description="why the job failed, when it did")
    trainable_params: int | None = None
    total_params: int | None = None
    trained_tokens: int | None = None
    result: dict[str, Any] = Field(default_factory=dict, description="final metrics of a finished job")
    plan: dict[str, Any] | None = Field(
        None,
        description="what the checks before queueing found: datasets, parameters, memory estimate, notes",
    )
    dataset_sha256: dict[str, str] | None = Field(
        None,
        description="sha256 of each dataset as validation read it (by parameter); every attempt trains on "
        "exactly this content and fails the job if the source changed",
        examples=[{"dataset": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}],
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    placement: Placement | None = Field(None, description="where the latest attempt runs or ran")
    queue: QueuePlace | None = Field(
        None, description="while it waits: its place in the queue and the GPUs it waits for (GET of one job)"
    )
    progress: Progress | None = Field(None, description="while it trains: its step, total steps and finish")

    @classmethod
    def of(cls, job: Job) -> JobOut:
        spec = JobSpec.model_validate(job.spec)
        return cls(
            id=job.id,
            status=job.status,
            method=job.method,
            base_model=job.base_model,
            dataset=job.dataset_uri,
            validation_dataset=job.validation_uri,
            adapter=spec.adapter,
            quantization=spec.quantization,
            dpo=spec.dpo,
            merge=spec.merge,
            fusion=spec.fusion,
            export=spec.export,
            hyperparameters=spec.hyperparameters,
            init_from=spec.init_from,
            suffix=spec.suffix,
            resources=spec.resources,
            priority=job.priority,
            metadata=job.user_metadata or {},
            integrations=spec.integrations,
            eval_prompts=spec.eval_prompts,
            eval_samples=spec.eval_samples,
            eval_max_new_tokens=spec.eval_max_new_tokens,
            attempt=job.attempt,
            error=ErrorBody(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            trainable_params=job.trainable_params,
            total_params=job.total_params,
            trained_tokens=job.trained_tokens,
            result=job.result or {},
            plan=job.plan,
            dataset_sha256=job.input_digests,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


def job_answer(job: Any) -> dict[str, Any]:
    """JobOut of a job (an ORM Job or a row of shared.services.job_reads.JOB_COLUMNS) as plain data, built
    without validating again: the stored spec is the JobSpec validated when the job was created, dumped. Equal
    to `JobOut.of(job).model_dump()` (tests/unit/test_answers.py), at a fraction of its cost."""
    spec = job.spec
    return {
        "object": "job",
        "id": job.id,
        "status": job.status,
        "method": job.method,
        "base_model": job.base_model,
        "dataset": job.dataset_uri,
        "validation_dataset": job.validation_uri,
        "adapter": spec.get("adapter"),
        "quantization": spec.get("quantization"),
        "dpo": spec.get("dpo"),
        "merge": spec.get("merge"),
        "fusion": spec.get("fusion"),
        "export": spec.get("export"),
        "hyperparameters": spec.get("hyperparameters"),
        "init_from": spec.get("init_from"),
        "suffix": spec.get("suffix"),
        "resources": spec["resources"],
        "priority": job.priority,
        "metadata": job.user_metadata or {},
        "integrations": spec.get("integrations") or [],
        "eval_prompts": spec.get("eval_prompts"),
        "eval_samples": spec.get("eval_samples"),
        "eval_max_new_tokens": spec.get("eval_max_new_tokens"),
        "attempt": job.attempt,
        "error": {"code": job.error_code, "message": job.error_message or "", "param": None}
        if job.error_code
        else None,
        "trainable_params": job.trainable_params,
        "total_params": job.total_params,
        "trained_tokens": job.trained_tokens,
        "result": job.result or {},
        "plan": job.plan,
        "dataset_sha256": job.input_digests,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "placement": _placement(job),
        "queue": _queue_place(job),
        "progress": _progress(job),
    }


def _placement(job: Any) -> dict[str, Any] | None:
    host = getattr(job, "placement_host", None)
    if host is None:
        return None
    return {
        "worker_id": job.worker_id,
        "host": host,
        "gpu_indices": list(job.placement_gpu_indices or []),
        "launcher": job.placement_launcher,
    }


def _progress(job: Any, hyperparameters: dict[str, Any] | None = None) -> dict[str, Any] | None:
    step = getattr(job, "progress_step", None)
    if step is None:
        return None
    hp = (job.spec.get("hyperparameters") if hyperparameters is None else hyperparameters) or {}
    epoch = job.progress_epoch
    total = hp.get("max_steps")
    if not total and hp.get("epochs") and epoch:
        # The trainer logs the epoch as steps so far over steps per epoch.
        total = max(round(step * hp["epochs"] / epoch), step)
    finish = None
    first_step, first_at = job.progress_first_step, job.progress_first_at
    if total and first_step is not None and step > first_step:
        per_step = (job.progress_at - first_at).total_seconds() / (step - first_step)
        finish = job.progress_at + timedelta(seconds=max(total - step, 0) * per_step)
    return {
        "step": step,
        "total_steps": total,
        "fraction": round(min(step / total, 1.0), 4) if total else None,
        "estimated_finish": finish,
        "updated_at": job.progress_at,
    }


def job_json(row: Any) -> str:
    """A job's answer as JSON text, from a row of shared.services.job_reads.read_job or read_job_page: on
    PostgreSQL the database wrote it but for `progress` (added here while the job trains), elsewhere it is
    job_answer's. Equal to job_answer once parsed (tests/integration/test_api_reads.py)."""
    answer = getattr(row, "answer", None)
    if answer is None:
        return encode(job_answer(row)).decode()
    progress = _progress(row, row.hyperparameters or {})
    return f"{answer[:-1]}, {_PROGRESS}{'null' if progress is None else encode(progress).decode()}}}"


_PROGRESS = '"progress" : '


def job_page_json(rows: Sequence[Any], next_cursor: str | None) -> bytes:
    """JobPage of read_job_page's rows as JSON."""
    tail = encode({"has_more": next_cursor is not None, "next_cursor": next_cursor}).decode()
    return f'{{"object":"list","data":[{",".join(map(job_json, rows))}],{tail[1:]}'.encode()


def _queue_place(job: Any) -> dict[str, Any] | None:
    position = getattr(job, "queue_position", None)
    if position is None or job.status != "queued":
        return None
    return {"position": position, "gpus": job.gpus, "nodes": job.nodes}


class AttemptOut(BaseModel):
    """One run of a job: where, on which GPUs, with which launcher, and how it ended."""

    number: int
    worker_id: str
    host: str
    gpu_indices: list[int]
    gpus: int
    launcher: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None = Field(description="the job's status when the attempt ended; null while it runs")
    gpu_seconds: float = Field(description="GPU-seconds charged to the team for it so far")

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptOut:
        return cls(
            number=attempt.number,
            worker_id=attempt.worker_id,
            host=attempt.host,
            gpu_indices=list(attempt.gpu_indices),
            gpus=attempt.gpus,
            launcher=attempt.launcher,
            started_at=attempt.started_at,
            ended_at=attempt.ended_at,
            outcome=attempt.outcome,
            gpu_seconds=round(attempt.charged_gpu_seconds, 3),
        )


class LogPage(BaseModel):
    """A page of whole lines of one attempt's training output (every rank and the launcher)."""

    job_id: str
    attempt: int | None = Field(description="the attempt read; null before the job's first attempt")
    attempts: list[int] = Field(description="the job's attempts, each with a log of its own")
    offset: int = Field(description="the byte offset of the first line")
    next_offset: int = Field(description="where the next page starts (offset=...); while it runs, new output")
    size: int = Field(description="bytes of the log so far")
    lines: list[str]
    has_more: bool = Field(description="more bytes are there already: read on from next_offset")
    complete: bool = Field(description="the attempt has ended and this page reaches the end of its log")
    truncated: bool = Field(description="the output went past TUNEFORGE_LOG_MAX_BYTES; the rest was dropped")
    stored: bool = Field(description="the whole log is in object storage (the attempt ended)")
    sha256: str | None = Field(description="the stored log's sha256")


class AttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AttemptOut]


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = Field(None, description="pass as `cursor` to get the next (older) page")


class EventOut(BaseModel):
    id: int
    created_at: datetime
    level: str
    type: str
    message: str
    attempt: int
    data: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(
            id=event.id,
            created_at=event.created_at,
            level=event.level,
            type=event.type,
            message=event.message,
            attempt=event.attempt,
            data=event.data or {},
        )


class EventPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool
    next_after: int | None = Field(None, description="pass as `after` to get the next page")


class MetricPoint(BaseModel):
    step: int
    epoch: float | None
    loss: float | None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    num_tokens: int | None = None
    attempt: int = Field(
        description="the attempt that wrote this point (a resumed one rewrites what it repeats)"
    )
    recorded_at: datetime = Field(description="when that attempt wrote it")

    @classmethod
    def of(cls, row: JobMetric) -> MetricPoint:
        return cls(
            attempt=row.attempt,
            recorded_at=row.created_at,
            step=row.step,
            epoch=row.epoch,
            loss=row.loss,
            learning_rate=row.learning_rate,
            grad_norm=row.grad_norm,
            tokens_per_second=row.tokens_per_second,
            num_tokens=row.num_tokens,
        )


def metric_curves(rows: Iterable[Sequence[Any]]) -> dict[str, list[dict[str, Any]]]:
    """MetricPoints by split, as plain data, from tuples of shared.services.job_reads.METRIC_COLUMNS' values
    (tests/unit/test_answers.py checks each equals MetricPoint)."""
    curves: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for split, step, epoch, loss, lr, grad_norm, tps, tokens, attempt, created_at in rows:
        point = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tps,
            "num_tokens": tokens,
            "attempt": attempt,
            "recorded_at": created_at,
        }
        curves.setdefault(split, []).append(point)
    return curves


class MetricsOut(BaseModel):
    job_id: str
    train: list[MetricPoint]
    eval: list[MetricPoint]


class ArtifactOut(BaseModel):
    kind: str
    name: str
    size_bytes: int
    sha256: str
    created_at: datetime
    download_url: str

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactOut:
        return cls(
            kind=artifact.kind,
            name=artifact.name,
            size_bytes=artifact.size_bytes,
            sha256=artifact.sha256,
            created_at=artifact.created_at,
            download_url=f"/v1/jobs/{artifact.job_id}/artifacts/{artifact.kind}/{artifact.name}",
        )


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    archive_url: str | None = Field(None, description="the job's result (adapter or merged model) as one tar")
    archive_urls: dict[str, str] = Field(
        default_factory=dict, description="one tar archive per artifact kind"
    )


class EvaluationSample(BaseModel):
    source: Literal["eval_prompts", "validation"] = Field(description="where the prompt came from")
    prompt: str
    reference: str | None = Field(None, description="the validation set's own answer")
    base: str = Field(description="the base model's answer")
    adapter: str = Field(description="the answer with the trained adapter")


class Perplexity(BaseModel):
    before: float | None = Field(description="the base model's, on the validation samples")
    after: float | None = Field(description="with the adapter, on the same samples")
    samples: int


class EvaluationOut(BaseModel):
    """The base model's and the adapter's answers side by side, and the validation perplexity before and after
    training (greedy answers of at most max_new_tokens tokens)."""

    object: Literal["evaluation"] = "evaluation"
    job_id: str
    status: str
    base_model: str | None
    max_new_tokens: int | None
    perplexity: Perplexity | None
    samples: list[EvaluationSample]
    note: str | None = None
    sha256: str = Field(description="of the stored evaluation artifact (samples.json)")


class CheckpointOut(BaseModel):
    step: int
    attempt: int
    num_files: int
    size_bytes: int
    metrics: dict[str, Any]
    created_at: datetime
    download_url: str

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> CheckpointOut:
        return cls(
            step=checkpoint.step,
            attempt=checkpoint.attempt,
            num_files=checkpoint.num_files,
            size_bytes=checkpoint.size_bytes,
            metrics=checkpoint.metrics or {},
            created_at=checkpoint.created_at,
            download_url=f"/v1/jobs/{checkpoint.job_id}/checkpoints/{checkpoint.step}.tar",
        )


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointOut]


class PlanOut(BaseModel):
    object: Literal["plan"] = "plan"
    id: str
    status: str = Field(description="pending, ready, refused or failed")
    spec: dict[str, Any]
    result: dict[str, Any] | None = Field(
        None,
        description="datasets (samples, tokens, truncation, the first sample with its loss mask), params, "
        "memory (per GPU, with and without gradient checkpointing), refusals and notes",
    )
    error: ErrorBody | None = None
    created_at: datetime
    finished_at: datetime | None = None

    @classmethod
    def of(cls, plan: Plan) -> PlanOut:
        return cls(
            id=plan.id,
            status=plan.status,
            spec=plan.spec,
            result=plan.result,
            error=ErrorBody(code=plan.error_code, message=plan.error_message or "")
            if plan.error_code
            else None,
            created_at=plan.created_at,
            finished_at=plan.finished_at,
        )


class ExportRequest(BaseModel):
    """Options for merging a finished adapter into its base model."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = Field("2GB", pattern=r"^[0-9]+(KB|MB|GB)$")
    priority: Priority = Priority.normal
    # The export job's metadata: the same limits as a job's (checked here, so a bad key is a 422, not a 500).
    metadata: Metadata = Field(default_factory=dict)


class FileOut(BaseModel):
    """OpenAI's file object (so the `openai` client reads it), with Tuneforge's checks of the dataset."""

    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int = Field(description="unix seconds")
    filename: str
    purpose: str = Field(description="fine-tune (uploads) or fine-tune-results (a job's metrics CSV)")
    status: Literal["processed"] = Field(
        "processed", description="always processed: every line is checked before the upload answers"
    )
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    format: str = Field(description="messages, prompt_completion or text (csv for results files)")
    num_samples: int

    @classmethod
    def of(cls, record: UploadedFile | ResultsFile) -> FileOut:
        if isinstance(record, ResultsFile):
            return cls(
                id=record.id,
                bytes=len(record.content),
                created_at=int(record.created_at.timestamp()),
                filename=record.filename,
                purpose="fine-tune-results",
                sha256=record.sha256,
                format="csv",
                num_samples=record.num_rows,
            )
        return cls(
            id=record.id,
            bytes=record.size_bytes,
            created_at=int(record.created_at.timestamp()),
            filename=record.filename,
            purpose=record.purpose,
            sha256=record.sha256,
            format=record.format,
            num_samples=record.num_samples,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool = Field(False, description="pass the last id as `after` for the next page")
    first_id: str | None = None
    last_id: str | None = None


class ModelOut(BaseModel):
    object: Literal["model"] = "model"
    id: str
    owned_by: str = "tuneforge"
    description: str
    location: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
