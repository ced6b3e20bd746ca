"""The job spec: what a user asks for, validated once and shared by the API and the worker."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.chat_templates import MAX_TEMPLATE_CHARS, check_chat_template


class Method(StrEnum):
    lora = "lora"
    dora = "dora"
    rslora = "rslora"
    qlora = "qlora"
    dpo = "dpo"
    merge = "merge"
    fusion = "fusion"
    export = "export"


# Methods this deployment runs (all of them; the check stays for deployments that switch one off).
AVAILABLE_METHODS: frozenset[Method] = frozenset(Method)
# Methods that train a LoRA adapter (and so take `adapter` and `hyperparameters`).
LORA_METHODS: frozenset[Method] = frozenset(
    {Method.lora, Method.dora, Method.rslora, Method.qlora, Method.dpo}
)
# Methods that learn from preference pairs (chosen over rejected) rather than from target text.
PREFERENCE_METHODS: frozenset[Method] = frozenset({Method.dpo})
# Methods whose base model may be stored in 4 bits (`quantization`): qlora always, dpo when asked.
QUANTIZABLE_METHODS: frozenset[Method] = frozenset({Method.qlora, Method.dpo})
# Methods that read a dataset.
DATASET_METHODS: frozenset[Method] = LORA_METHODS | {Method.fusion}


DEFAULT_MAX_SEQ_LENGTH = 1024


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

    use_dora: bool | None = Field(
        None, description="weight-decomposed LoRA; implied by method dora, optional with qlora and rslora"
    )
    use_rslora: bool | None = Field(
        None,
        description="rank-stabilised scaling alpha/sqrt(r); implied by method rslora, optional with qlora and dora",
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
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="default 2e-4 for adapter training, 2e-2 for fusion's mixing weights"
    )
    batch_size: int = Field(4, ge=1, le=1024, description="micro-batch size per device")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int | None = Field(
        None,
        ge=16,
        le=131072,
        description="longer samples are truncated; default: the base model's context length, at most 1024",
    )
    packing: bool = Field(
        False,
        description="pack samples into rows of max_seq_length tokens (best-fit, padding-free); batch_size then "
        "counts rows, not samples",
    )
    padding_free: bool | None = Field(
        None,
        description="concatenate each micro-batch's samples into one sequence without padding (position ids "
        "restart per sample, no attention across samples); default: on where the model supports it and the "
        "data's lengths make it cheaper than padding (decided when training starts)",
    )
    bf16: bool | None = Field(
        None,
        description="train under bfloat16 autocast; default: on GPUs that have it, and on CPUs with AVX512-BF16 "
        "or AMX where the deployment offers bf16 (TUNEFORGE_WORKER_FEATURES) and it measured faster",
    )
    fused_adamw: bool | None = Field(
        None,
        description="torch's fused AdamW kernel; default on (off with resources.cpu_offload, where DeepSpeed's "
        "CPU Adam updates the offloaded states)",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None,
        description="the attention kernel; default: flash_attention_2 on GPU workers that have it installed "
        "(bf16), sdpa otherwise",
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (GPU workers with the liger extra)",
    )
    torch_compile: bool = Field(
        False,
        description="compile the model with torch.compile (opt-in: the first steps pay the compilation)",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in the backward pass: less memory, about 20-30% slower; "
        "default on for qlora, off otherwise",
    )
    seed: int = Field(42, ge=0, le=2**31 - 1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0, le=1)
    logging_steps: int = Field(1, ge=1, le=10_000)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default: once per epoch")
    checkpoint_steps: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N steps; default: the deployment's setting"
    )

    @property
    def seq_length(self) -> int:
        """The sequence length in force (the default until the job is fitted to its model)."""
        return self.max_seq_length or DEFAULT_MAX_SEQ_LENGTH

    @model_validator(mode="after")
    def _length(self) -> Hyperparameters:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give either epochs or max_steps, not both")
        if self.epochs is None and self.max_steps is None:
            self.epochs = 3
        return self

    @model_validator(mode="after")
    def _kernels(self) -> Hyperparameters:
        if self.packing and self.padding_free is False:
            raise _field_error(
                "padding_free", "packed rows are always padding-free; remove padding_free or packing"
            )
        if self.attn_implementation == "flash_attention_2" and self.bf16 is False:
            raise _field_error(
                "attn_implementation",
                "FlashAttention-2 computes in bfloat16 or float16 only; leave bf16 on or choose sdpa",
            )
        return self


class Resources(BaseModel):
    """Hardware a job asks for."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(1, ge=1, le=512, description="GPUs for this job, in all (nodes x gpus_per_node)")
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="nodes the job spans; above 1 it runs as a Ray Train job on the deployment's Ray cluster",
    )
    gpus_per_node: int | None = Field(
        None, ge=1, le=64, description="GPUs on each node (default: gpus / nodes); gpus is then nodes x this"
    )
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0 = plain data parallel)")
    cpu_offload: bool = Field(
        False, description="DeepSpeed: keep optimizer states (and ZeRO-3 weights) in CPU memory"
    )
    max_runtime_minutes: int | None = Field(
        None,
        ge=1,
        le=60 * 24 * 14,
        description="fail the job (code timeout) after this much run time, all attempts",
    )

    @model_validator(mode="before")
    @classmethod
    def _spread_over_nodes(cls, values: Any) -> Any:
        # gpus is the total; gpus_per_node, when given, sets it (and must agree with a gpus also given).
        if not isinstance(values, dict):
            return values
        nodes, per_node, gpus = values.get("nodes", 1), values.get("gpus_per_node"), values.get("gpus")
        if not (isinstance(nodes, int) and nodes >= 1):
            return values
        if isinstance(per_node, int) and per_node >= 1:
            if gpus is not None and gpus != nodes * per_node:
                raise ValueError(
                    f"gpus {gpus} is not nodes {nodes} x gpus_per_node {per_node}; give one of them"
                )
            return {**values, "gpus": nodes * per_node}
        if nodes > 1:
            total = gpus if gpus is not None else nodes
            if not isinstance(total, int) or total % nodes:
                raise ValueError(
                    f"gpus {total} cannot be spread evenly over {nodes} nodes; set gpus_per_node"
                )
            return {**values, "gpus": total, "gpus_per_node": total // nodes}
        return values

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Resources:
        if self.cpu_offload and self.zero_stage == 0:
            raise ValueError("cpu_offload needs zero_stage 2 or 3")
        if self.gpus_per_node is None:
            self.gpus_per_node = self.gpus // self.nodes
        return self


class QuantizationSpec(BaseModel):
    """How QLoRA stores the frozen base weights."""

    model_config = ConfigDict(extra="forbid")

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights")
    double_quant: bool = Field(True, description="also quantize the quantization constants")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul"
    )


# trl's DPO losses that need nothing but the preference pairs (and beta; robust and exo_pair also take
# label_smoothing). trl's bco_pair (a running reward mean outside the checkpoint), the unpaired and the
# combined losses are left out.
DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]
LABEL_SMOOTHING_LOSSES = frozenset({"robust", "exo_pair"})


class DpoSpec(BaseModel):
    """Direct preference optimisation (method dpo): how strongly the policy is held to the reference (the base
    model with the adapter switched off) and which of trl's preference losses it minimises."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="how far the policy may move from the reference: higher keeps it closer (IPO's tau for "
        "loss_type ipo)",
    )
    loss_type: DpoLossType = Field(
        "sigmoid",
        description="trl's preference loss: sigmoid (the DPO paper), hinge (SLiC), ipo, robust, exo_pair, "
        "nca_pair, sppo_hard, aot, apo_zero, apo_down, discopop, sigmoid_norm",
    )
    label_smoothing: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="robust: the share of pairs assumed flipped (default 0); exo_pair: epsilon (default 1e-3)",
    )

    @model_validator(mode="after")
    def _smoothing(self) -> DpoSpec:
        if self.loss_type in LABEL_SMOOTHING_LOSSES:
            if self.label_smoothing is None:
                self.label_smoothing = 1e-3 if self.loss_type == "exo_pair" else 0.0
            if self.loss_type == "exo_pair" and self.label_smoothing == 0:
                raise _field_error(
                    "label_smoothing", "loss_type exo_pair needs label_smoothing above 0 (1e-3)"
                )
        elif self.label_smoothing is not None:
            raise _field_error(
                "label_smoothing",
                f"label_smoothing applies to loss_type robust or exo_pair, not {self.loss_type}",
            )
        return self


class AdapterSource(BaseModel):
    """A finished adapter: the job that produced it, or where its folder lies in object storage."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, min_length=1, max_length=40, description="a succeeded job of your team")
    uri: str | None = Field(
        None,
        min_length=6,
        max_length=2048,
        description="s3://bucket/prefix of an adapter folder (adapter_config.json)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterSource:
        if (self.job_id is None) == (self.uri is None):
            raise ValueError("give exactly one of job_id or uri")
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError("uri must be an s3:// prefix of an adapter folder")
        return self


CombinationType = Literal["linear", "cat", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune"]
DENSITY_TYPES = frozenset({"ties", "dare_ties", "dare_linear", "magnitude_prune"})


class MergeSpec(BaseModel):
    """Combine finished adapters of one base into a new adapter, without training."""

    model_config = ConfigDict(extra="forbid")

    sources: list[AdapterSource] = Field(min_length=2, max_length=16)
    weights: list[float] | None = Field(None, description="one weight per source; default 1/n each")
    combination_type: CombinationType = Field(
        "cat",
        description="cat (exact, rank = sum of ranks), svd (rank svd_rank), linear, ties, dare_ties, "
        "dare_linear, magnitude_prune (the last five need equal ranks)",
    )
    density: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of weights kept, for ties, dare_* and magnitude_prune; default 0.5",
    )
    svd_rank: int | None = Field(None, ge=1, le=1024, description="rank of an svd merge; default the largest")

    @model_validator(mode="after")
    def _consistent(self) -> MergeSpec:
        if self.weights is None:
            self.weights = [1.0 / len(self.sources)] * len(self.sources)
        elif len(self.weights) != len(self.sources):
            raise _field_error(
                "weights", f"{len(self.weights)} weights for {len(self.sources)} sources; give one per source"
            )
        if self.combination_type in DENSITY_TYPES:
            self.density = 0.5 if self.density is None else self.density
        elif self.density is not None:
            raise _field_error(
                "density", f"density does not apply to combination_type {self.combination_type}"
            )
        if self.svd_rank is not None and self.combination_type != "svd":
            raise _field_error("svd_rank", "svd_rank applies only to combination_type svd")
        return self


class FusionSpec(BaseModel):
    """Learn how much of each finished adapter to use, on a dataset; the adapters themselves stay frozen."""

    model_config = ConfigDict(extra="forbid")

    sources: list[AdapterSource] = Field(min_length=2, max_length=8, description="at least two adapters")
    per_layer: bool = Field(False, description="learn one weight per adapter and layer, not one per adapter")


class ExportSpec(BaseModel):
    """Merge an adapter into its base model and store the full model, for serving without peft."""

    model_config = ConfigDict(extra="forbid")

    source: AdapterSource
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = Field("2GB", pattern=r"^[0-9]+(KB|MB|GB)$")


def _field_error(field: str, message: str) -> ValidationError:
    """A validation error located at `field`, so the API's 422 names it."""
    return ValidationError.from_exception_data(
        "JobSpec",
        [InitErrorDetails(type=PydanticCustomError("invalid_field", message), loc=(field,), input=None)],
    )


# W&B names hold no slashes; MLflow experiments may (e.g. /Shared/team). No control characters in either.
WandbName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f/\\\\]+$")]
TrackerName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")]
TrackerTag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]


class WandbIntegration(BaseModel):
    """Where a job's run goes in Weights & Biases (OpenAI's `integrations[].wandb`). The deployment supplies the
    key (TUNEFORGE_WANDB_API_KEY)."""

    model_config = ConfigDict(extra="forbid")

    project: WandbName = Field(description="the W&B project")
    name: TrackerName | None = Field(None, description="the run's display name; default: the job id")
    entity: WandbName | None = Field(None, description="the W&B team or user; default: the key's")
    tags: list[TrackerTag] = Field(default_factory=list, max_length=16, description="at most 16 tags")


class MlflowIntegration(BaseModel):
    """Where a job's run goes in the deployment's MLflow tracking server (TUNEFORGE_MLFLOW_TRACKING_URI)."""

    model_config = ConfigDict(extra="forbid")

    experiment: TrackerName = Field("tuneforge", description="the MLflow experiment (created when missing)")
    run_name: TrackerName | None = Field(None, description="the run's name; default: the job id")


class Integration(BaseModel):
    """An experiment tracker a training job logs to: its parameters, every logged step's metrics, the final
    metrics and the adapter. A tracker that is down never fails or slows the job; the job gets an event
    saying what was not logged."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb", "mlflow"]
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None

    @model_validator(mode="after")
    def _settings_of_the_type(self) -> Integration:
        if self.type == "wandb" and self.wandb is None:
            raise ValueError("an integration of type wandb needs `wandb` with at least its project")
        if self.type == "mlflow" and self.mlflow is None:
            self.mlflow = MlflowIntegration()
        other = "mlflow" if self.type == "wandb" else "wandb"
        if getattr(self, other) is not None:
            raise ValueError(f"`{other}` does not apply to an integration of type {self.type}")
        return self


EvalPrompt = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
MAX_EVAL_PROMPTS = 16
# Prompts a job with a validation dataset (and no eval_prompts) takes from it by default.
DEFAULT_EVAL_SAMPLES = 4
DEFAULT_EVAL_MAX_NEW_TOKENS = 64


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
MAX_METADATA_KEYS = 16
# A job's metadata: at most 16 short keys with string values.
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


# A fine-tuned model's suffix, as OpenAI takes it (up to 64 characters): it becomes one `:`-separated part of
# the model's name, ft:<base>:<team>:<suffix>:<job id>, so it holds no `:` (nor spaces or slashes).
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_suffix(value: str | None) -> str | None:
    """Refuses a suffix that cannot be part of a fine-tuned model's name, saying what it may hold."""
    if value is not None and not SUFFIX_PATTERN.match(value):
        raise ValueError(
            f"suffix {value[:80]!r}: 1 to 64 letters, digits, '_', '.' or '-' (it names the fine-tuned model "
            "ft:<base>:<team>:<suffix>:<job id>)"
        )
    return value


Suffix = Annotated[str | None, AfterValidator(check_suffix)]


class InitFrom(BaseModel):
    """Where a training job's adapter starts: another job's finished adapter, or one of its checkpoints."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(min_length=1, max_length=40, description="a job of your team that trained an adapter")
    checkpoint_step: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="start from the job's checkpoint at this step; by default from its final adapter (the "
        "job must have succeeded)",
    )


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

    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="a name from GET /v1/models; for merge and export, the sources' base by default",
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="an uploaded file id, s3://bucket/key or file:///path (training and fusion jobs)",
    )
    validation_dataset: str | None = Field(None, min_length=1, max_length=2048)
    method: Method = Method.lora
    adapter: AdapterSpec | None = Field(None, description="LoRA settings (lora, dora, rslora, qlora)")
    quantization: QuantizationSpec | None = Field(
        None, description="base weight storage in 4 bits (qlora; dpo on a 4-bit base when given)"
    )
    dpo: DpoSpec | None = Field(None, description="beta and loss type (method dpo)")
    merge: MergeSpec | None = Field(None, description="what to merge (method merge)")
    fusion: FusionSpec | None = Field(None, description="what to fuse (method fusion)")
    export: ExportSpec | None = Field(None, description="what to merge into its base (method export)")
    hyperparameters: Hyperparameters | None = Field(
        None, description="training settings (training and fusion)"
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEMPLATE_CHARS,
        description="how `messages` are rendered: a template's name (chatml, llama3, qwen2_5, gemma, phi3, … as "
        "trl ships them) or Jinja of your own; saved with the adapter's tokenizer. Default: the base model's",
    )
    init_from: InitFrom | None = Field(
        None,
        description="continue from another job's adapter or checkpoint (lora, dora, rslora, qlora): same base "
        "model, rank, target modules and DoRA; base_model defaults to the source's",
    )
    suffix: Suffix = Field(
        None,
        description="names the fine-tuned model ft:<base>:<team>:<suffix>:<job id> (OpenAI's surface shows it): "
        "1 to 64 letters, digits, '_', '.' or '-'",
    )
    resources: Resources = Field(default_factory=Resources)
    priority: Priority = Priority.normal
    metadata: Metadata = Field(default_factory=dict)
    integrations: list[Integration] = Field(
        default_factory=list,
        max_length=4,
        description="experiment trackers the job logs to (training methods): "
        '[{"type": "wandb", "wandb": {"project", "name", "entity", "tags"}}] or '
        '[{"type": "mlflow", "mlflow": {"experiment", "run_name"}}]',
    )
    eval_prompts: Annotated[list[EvalPrompt], Field(min_length=1, max_length=MAX_EVAL_PROMPTS)] | None = (
        Field(
            None,
            description="prompts that the base model and the trained adapter both answer when training ends "
            "(adapter methods); their answers are stored side by side (GET /v1/jobs/{id}/evaluation)",
        )
    )
    eval_samples: int | None = Field(
        None,
        ge=0,
        le=MAX_EVAL_PROMPTS,
        description="prompts taken from the validation dataset for the same comparison; default "
        f"{DEFAULT_EVAL_SAMPLES} with a validation_dataset and no eval_prompts, else 0 (off)",
    )
    eval_max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=512,
        description=f"longest answer generated per prompt; default {DEFAULT_EVAL_MAX_NEW_TOKENS}",
    )

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> JobSpec:
        method = self.method
        if method in DATASET_METHODS and self.dataset is None:
            raise _field_error("dataset", f"method {method.value} needs a dataset")
        if method not in DATASET_METHODS:
            for name in ("dataset", "validation_dataset", "hyperparameters"):
                if getattr(self, name) is not None:
                    raise _field_error(name, f"method {method.value} does not train; remove {name}")
        if method in LORA_METHODS and self.base_model is None and self.init_from is None:
            raise _field_error("base_model", f"method {method.value} needs a base_model")
        if method not in LORA_METHODS and self.init_from is not None:
            raise _field_error("init_from", f"method {method.value} trains no adapter to start from another")
        if method in PREFERENCE_METHODS and self.init_from is not None:
            # DPO's reference is the base with the adapter switched off: started from another adapter, the
            # reference would not be the policy it starts from.
            raise _field_error(
                "init_from",
                f"method {method.value} starts from the base model (its reference is the base with the adapter "
                "switched off); remove init_from",
            )
        if method is Method.fusion and self.base_model is None:
            raise _field_error("base_model", "method fusion needs the base_model its sources share")
        owners = (("merge", Method.merge), ("fusion", Method.fusion), ("export", Method.export))
        for name, owner in owners:
            value = getattr(self, name)
            if method is owner and value is None:
                raise _field_error(name, f"method {method.value} needs `{name}`")
            if method is not owner and value is not None:
                raise _field_error(name, f"`{name}` applies only to method {owner.value}")
        self._check_trackers_and_evaluation()
        if method in LORA_METHODS:
            self.adapter = self.adapter or AdapterSpec()
            self._resolve_adapter_flags()
        elif self.adapter is not None:
            raise _field_error("adapter", f"method {method.value} trains no new LoRA; remove adapter")
        if method is Method.qlora:
            self.quantization = self.quantization or QuantizationSpec()
        elif self.quantization is not None and method not in QUANTIZABLE_METHODS:
            raise _field_error("quantization", "quantization applies only to methods qlora and dpo")
        if method is Method.dpo:
            self.dpo = self.dpo or DpoSpec()
        elif self.dpo is not None:
            raise _field_error("dpo", "`dpo` applies only to method dpo")
        if self.chat_template is not None:
            if method not in DATASET_METHODS:
                raise _field_error(
                    "chat_template", f"method {method.value} reads no dataset; remove chat_template"
                )
            try:
                check_chat_template(self.chat_template)
            except ValueError as exc:
                raise _field_error("chat_template", str(exc)) from None
        if method in DATASET_METHODS:
            self.hyperparameters = self.hyperparameters or Hyperparameters()
            if self.hyperparameters.gradient_checkpointing is None:
                self.hyperparameters.gradient_checkpointing = self.quantized
            offload = self.resources.cpu_offload
            if self.hyperparameters.fused_adamw and offload:
                raise _field_error(
                    "hyperparameters.fused_adamw",
                    "with resources.cpu_offload DeepSpeed updates the offloaded optimizer states with its own CPU "
                    "Adam; remove fused_adamw",
                )
            if self.hyperparameters.fused_adamw is None:
                self.hyperparameters.fused_adamw = not offload
            if self.hyperparameters.learning_rate is None:
                # A handful of mixing weights need far larger steps than millions of adapter weights; preference
                # tuning starts from a model that already answers and moves it less.
                self.hyperparameters.learning_rate = {Method.fusion: 2e-2, Method.dpo: 5e-5}.get(method, 2e-4)
        if method in PREFERENCE_METHODS:
            self._check_preference_batches()
        return self

    def _check_trackers_and_evaluation(self) -> None:
        method = self.method
        if self.integrations and method not in DATASET_METHODS:
            raise _field_error("integrations", f"method {method.value} does not train; remove integrations")
        seen: set[str] = set()
        for index, integration in enumerate(self.integrations):
            if integration.type in seen:
                raise _field_error(
                    f"integrations.{index}.type", f"give at most one {integration.type} integration"
                )
            seen.add(integration.type)
        if method not in LORA_METHODS or method in PREFERENCE_METHODS:
            why = (
                "reports its reward margins on the validation pairs instead"
                if method in PREFERENCE_METHODS
                else "trains no new adapter to evaluate"
            )
            for name in ("eval_prompts", "eval_samples", "eval_max_new_tokens"):
                if getattr(self, name) is not None:
                    raise _field_error(name, f"method {method.value} {why}; remove {name}")
            return
        if self.eval_samples and self.validation_dataset is None:
            raise _field_error(
                "eval_samples", "eval_samples takes prompts from a validation_dataset; give one"
            )
        if self.eval_samples is None:
            default = self.validation_dataset is not None and self.eval_prompts is None
            self.eval_samples = DEFAULT_EVAL_SAMPLES if default else 0
        if self.eval_max_new_tokens is None:
            self.eval_max_new_tokens = DEFAULT_EVAL_MAX_NEW_TOKENS

    @property
    def quantized(self) -> bool:
        """Whether the frozen base model is stored in 4 bits (qlora, or dpo with `quantization`)."""
        return self.quantization is not None

    def _check_preference_batches(self) -> None:
        hp = self.hyperparameters
        assert hp is not None
        # trl's DPOTrainer pads each chosen and rejected sequence (its padding-free path is switched off).
        if hp.packing:
            raise _field_error(
                "hyperparameters.packing",
                f"method {self.method.value} compares whole chosen and rejected answers and cannot pack them; "
                "remove packing",
            )
        if hp.padding_free:
            raise _field_error(
                "hyperparameters.padding_free",
                f"method {self.method.value} trains on padded batches (trl's DPOTrainer has no padding-free "
                "path); remove padding_free",
            )

    def _resolve_adapter_flags(self) -> None:
        adapter = self.adapter
        assert adapter is not None
        implied = {"use_dora": self.method is Method.dora, "use_rslora": self.method is Method.rslora}
        for flag, on in implied.items():
            given = getattr(adapter, flag)
            if on and given is False:
                raise _field_error(f"adapter.{flag}", f"method {self.method.value} implies {flag}=true")
            if self.method is Method.lora and given:
                variant = "dora" if flag == "use_dora" else "rslora"
                raise _field_error(
                    f"adapter.{flag}",
                    f"method lora trains plain LoRA; use method {variant} (or qlora with {flag})",
                )
            setattr(adapter, flag, bool(on or given))


def job_sources(spec: JobSpec) -> list[AdapterSource]:
    """Returns the finished adapters a job reads (merge and fusion sources, the export source), in order."""
    if spec.merge is not None:
        return list(spec.merge.sources)
    if spec.fusion is not None:
        return list(spec.fusion.sources)
    if spec.export is not None:
        return [spec.export.source]
    return []
