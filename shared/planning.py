"""Plans a training job before it is queued: the model's shape read from its config.json, the spec
combinations known to fail, and a per-GPU peak memory estimate. Pure Python (the API imports it); the worker
adds exact parameter counts and dataset statistics (worker/planning.py). The formulas are explained in
docs/PLANNING.md."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.schemas import DEFAULT_MAX_SEQ_LENGTH, LORA_METHODS, PREFERENCE_METHODS, JobSpec, QuantizationSpec

PLAN_VERSION = 1
GIB = 1024**3
MIB = 1024**2

# Bytes of one activation element: training runs under bf16 autocast on GPUs that support it.
ACTIVATION_BYTES = 2
# Bytes per element of a dropout mask: on CUDA, torch's native dropout keeps a bool mask (CPU keeps a float one).
DROPOUT_MASK_BYTES = 1
# Memory outside PyTorch's allocator: the CUDA context, cuBLAS/cuDNN workspaces and loaded kernels.
CUDA_CONTEXT_BYTES = 1 * GIB
# The caching allocator's fragmentation, as a share of everything else.
ALLOCATOR_SLACK = 0.05
# bitsandbytes 4-bit: one absmax per block of 64 weights; with double quantization the absmax values are
# themselves quantized to 8 bits in blocks of 256, each block with an fp32 absmax.
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# Per quantized tensor: the 16-entry fp32 4-bit code; with double quantization also the 256-entry fp32 8-bit
# code of the nested state and its fp32 offset.
NF4_CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4 + 4
# QLoRA: peft's prepare_model_for_kbit_training casts every parameter that is not 4-bit (embeddings, norms,
# the output head) to fp32.
QLORA_UNQUANTIZED_BYTES = 4
# trl's SFTTrainer (1.16) computes the loss with a fused LM head: logits are built in a tile buffer of
# 4096 tokens (fewer if the batch has fewer) x 32768 vocabulary entries in the compute dtype, never for the
# whole batch.
FUSED_HEAD_TOKEN_TILE = 4096
FUSED_HEAD_VOCAB_TILE = 32768
# fp32 per-token statistics the fused head keeps (running max, sums, target logit, log_z, entropy, ...).
FUSED_HEAD_STATS_PER_TOKEN = 10 * 4

# Architectures whose attention keeps packed samples apart: their transformers code builds the attention mask
# from position ids that restart per sample (and FlashAttention-2 reads the same boundaries), so samples
# concatenated without padding do not attend to each other. tests/integration/test_packing.py checks each.
PADDING_FREE_MODEL_TYPES = frozenset(
    {
        "cohere",
        "gemma",
        "gemma3_text",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "olmo",
        "olmo2",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)
# Llama-style architectures Liger (0.8) patches with its RMSNorm, SwiGLU and RoPE kernels.
LIGER_MODEL_TYPES = frozenset(
    {
        "gemma",
        "gemma2",
        "gemma3_text",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "smollm3",
    }
)

REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Architectures whose q/k/v projections carry a bias although their config says nothing about it.
QKV_BIAS_MODEL_TYPES = frozenset({"qwen2"})


class ModelConfigError(ValueError):
    """A config.json the planner cannot read (not a Llama-style decoder, or missing its dimensions)."""


def gib(n_bytes: float) -> float:
    """Bytes as GiB, rounded to two decimals."""
    return round(n_bytes / GIB, 2)


def format_bytes(n_bytes: float) -> str:
    """Bytes in the largest fitting binary unit, e.g. '13.48 GiB' or '512.0 MiB'."""
    if abs(n_bytes) >= GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    if abs(n_bytes) >= MIB:
        return f"{n_bytes / MIB:.1f} MiB"
    if abs(n_bytes) >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{int(n_bytes)} B"


@dataclass(frozen=True)
class LinearLayer:
    """A linear layer of one decoder block (in_features -> out_features, as nn.Linear)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _context_length(config: dict[str, Any], max_positions: int | None) -> int | None:
    """The positions the model handles: max_position_embeddings, or more when the config's RoPE scaling
    stretches an original window (yarn, linear and dynamic scaling with original_max_position_embeddings)."""
    if max_positions is None:
        return None
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(scaling, dict):
        return max_positions
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = scaling.get("factor")
    if kind in (None, "default") or not isinstance(factor, (int, float)) or factor <= 1:
        return max_positions
    original = scaling.get("original_max_position_embeddings") or config.get(
        "original_max_position_embeddings"
    )
    if _positive_int(original):
        return max(max_positions, int(factor * original))
    if kind == "linear":
        return int(factor * max_positions)
    return max_positions


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm), from its config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    head_dim: int
    model_type: str | None = None
    context_length: int | None = None  # max_position_embeddings, stretched by RoPE scaling if configured
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Reads a Hugging Face config.json dict (or a multimodal one's text_config); raises ModelConfigError
        naming what is missing or inconsistent."""
        if not isinstance(config, dict):
            raise ModelConfigError(f"config.json must be a JSON object, not {type(config).__name__}")
        source = config
        text_config = config.get("text_config")
        if any(k not in config for k in REQUIRED_KEYS) and isinstance(text_config, dict):
            source = text_config
        model_type = source.get("model_type") or config.get("model_type")
        missing = [k for k in REQUIRED_KEYS if not _positive_int(source.get(k))]
        if missing:
            kind = f" (model_type {model_type!r})" if model_type else ""
            raise ModelConfigError(
                f"cannot plan for this model: its config.json{kind} has no positive integer "
                f"{', '.join(missing)}; planning reads Llama-style decoder configs "
                f"({', '.join(REQUIRED_KEYS)}, num_key_value_heads, max_position_embeddings)"
            )
        heads = source["num_attention_heads"]
        kv_heads = source.get("num_key_value_heads")
        if kv_heads is None:
            kv_heads = heads
        if not _positive_int(kv_heads) or heads % kv_heads:
            raise ModelConfigError(
                f"cannot plan for this model: num_key_value_heads {kv_heads!r} does not divide "
                f"num_attention_heads {heads}"
            )
        head_dim = source.get("head_dim")
        if head_dim is None:
            if source["hidden_size"] % heads:
                raise ModelConfigError(
                    f"cannot plan for this model: hidden_size {source['hidden_size']} is not a multiple of "
                    f"num_attention_heads {heads} and the config gives no head_dim"
                )
            head_dim = source["hidden_size"] // heads
        if not _positive_int(head_dim):
            raise ModelConfigError(
                f"cannot plan for this model: head_dim {head_dim!r} is not a positive integer"
            )
        max_positions = source.get("max_position_embeddings")
        if max_positions is not None and not _positive_int(max_positions):
            raise ModelConfigError(
                f"cannot plan for this model: max_position_embeddings {max_positions!r} is not a positive integer"
            )
        tie = source.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        attention_bias = source.get("attention_bias")
        if attention_bias is None:
            attention_bias = model_type in QKV_BIAS_MODEL_TYPES
        return cls(
            hidden_size=source["hidden_size"],
            intermediate_size=source["intermediate_size"],
            num_hidden_layers=source["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=source["vocab_size"],
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(tie),
            head_dim=head_dim,
            model_type=model_type,
            context_length=_context_length(source, max_positions),
            attention_bias=bool(attention_bias),
            mlp_bias=bool(source.get("mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_layers(self) -> dict[str, LinearLayer]:
        """The linear layers of one decoder block, by leaf name (in_features, out_features as in nn.Linear)."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        attn, mlp = self.attention_bias, self.mlp_bias
        # Qwen2 puts a bias on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = attn and self.model_type not in QKV_BIAS_MODEL_TYPES
        layers = [
            LinearLayer("q_proj", h, q, attn),
            LinearLayer("k_proj", h, kv, attn),
            LinearLayer("v_proj", h, kv, attn),
            LinearLayer("o_proj", q, h, o_bias),
            LinearLayer("gate_proj", h, i, mlp),
            LinearLayer("up_proj", h, i, mlp),
            LinearLayer("down_proj", i, h, mlp),
        ]
        return {layer.name: layer for layer in layers}

    def embedding_parameters(self) -> int:
        """Input embeddings plus the output head (once if they are tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def norm_parameters(self) -> int:
        """Two RMSNorm weights per block and the final norm."""
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    def linear_parameters(self) -> int:
        """Parameters of the blocks' linear layers (the ones QLoRA stores in 4 bits)."""
        return self.num_hidden_layers * sum(layer.params for layer in self.linear_layers().values())

    def base_parameters(self) -> int:
        """All parameters of the base model, for a Llama-style layout."""
        return self.embedding_parameters() + self.norm_parameters() + self.linear_parameters()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def targeted_layers(spec: JobSpec, shape: ModelShape) -> list[LinearLayer]:
    """The layers of one block the adapter wraps: presets expand like LoraRecipe resolves them on a Llama-style
    model; explicit names are matched by leaf name (names this layout lacks are left to the worker's check)."""
    assert spec.adapter is not None
    layers = shape.linear_layers()
    target = spec.adapter.target_modules
    if target == "all-linear":
        return list(layers.values())
    if target == "attention":
        return [layers[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    leaves = {name.rsplit(".", 1)[-1] for name in target}
    return [layer for name, layer in layers.items() if name in leaves]


def adapter_parameters(spec: JobSpec, shape: ModelShape) -> int:
    """Trainable adapter parameters: r x (in + out) per wrapped layer, plus DoRA's magnitude vector (out)."""
    assert spec.adapter is not None
    rank, dora = spec.adapter.rank, bool(spec.adapter.use_dora)
    per_block = sum(
        rank * (layer.in_features + layer.out_features) + (layer.out_features if dora else 0)
        for layer in targeted_layers(spec, shape)
    )
    return shape.num_hidden_layers * per_block


# ---------------------------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    """A spec that is known to fail: `param` names the field to change, `message` what is wrong and what to do."""

    code: str
    param: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Note:
    """Something worth knowing about a spec that will run."""

    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_to_model(spec: JobSpec, shape: ModelShape) -> JobSpec:
    """Fills the defaults that depend on the base model: an unset max_seq_length becomes the model's
    context length, at most 1024."""
    hp = spec.hyperparameters
    if hp is None or hp.max_seq_length is not None:
        return spec
    length = min(DEFAULT_MAX_SEQ_LENGTH, shape.context_length or DEFAULT_MAX_SEQ_LENGTH)
    return spec.model_copy(update={"hyperparameters": hp.model_copy(update={"max_seq_length": length})})


def static_checks(
    spec: JobSpec, shape: ModelShape, layers: list[LinearLayer] | None = None
) -> tuple[list[Refusal], list[Note]]:
    """Checks a spec against the model's shape alone. `layers` are the block's targeted layers when the worker
    resolved them on the real model; otherwise they follow the Llama-style layout."""
    refusals: list[Refusal] = []
    notes: list[Note] = []
    hp, adapter, resources = spec.hyperparameters, spec.adapter, spec.resources

    if hp is not None:
        positions = shape.context_length
        if positions is not None and hp.seq_length > positions:
            stretched = (
                f" ({shape.max_position_embeddings} stretched by the config's RoPE scaling)"
                if shape.max_position_embeddings != positions
                else ""
            )
            refusals.append(
                Refusal(
                    "max_seq_length_exceeds_positions",
                    "hyperparameters.max_seq_length",
                    f"max_seq_length {hp.seq_length} is above the {positions} positions this model handles"
                    f"{stretched}: tokens past position {positions} would get position encodings the model never "
                    "saw in pretraining (a learned position table fails outright with an index error); "
                    f"set max_seq_length to at most {positions}",
                )
            )
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(hp, name) < 1:
                refusals.append(
                    Refusal(
                        "empty_batch",
                        f"hyperparameters.{name}",
                        f"{name} is {getattr(hp, name)}: batch_size x gradient_accumulation_steps x gpus "
                        "must be at least 1, or no optimizer step ever sees a sample",
                    )
                )
    if resources.gpus < 1:
        refusals.append(
            Refusal(
                "empty_batch",
                "resources.gpus",
                f"gpus is {resources.gpus}: batch_size x gradient_accumulation_steps x gpus must be at least 1",
            )
        )

    if adapter is not None:
        targets = layers if layers is not None else targeted_layers(spec, shape)
        too_small = [t for t in targets if adapter.rank > min(t.in_features, t.out_features)]
        if too_small:
            smallest = min(min(t.in_features, t.out_features) for t in too_small)
            names = ", ".join(sorted({f"{t.name} ({t.in_features}->{t.out_features})" for t in too_small}))
            refusals.append(
                Refusal(
                    "rank_exceeds_layer",
                    "adapter.rank",
                    f"rank {adapter.rank} is larger than the smallest dimension of {names}: the update B x A of "
                    f"such a layer has rank at most {smallest}, so the rank asked for cannot be trained and the "
                    "extra rows only add parameters and optimizer memory; set rank to at most "
                    f"{smallest} or leave these layers out of target_modules",
                )
            )

    if resources.zero_stage in (2, 3) and resources.gpus == 1:
        notes.append(
            Note(
                "zero_on_one_gpu",
                f"ZeRO stage {resources.zero_stage} on one GPU partitions over a single rank and saves no memory "
                "(it would only help with CPU offload, which this service does not configure); zero_stage 0 "
                "does the same with less overhead",
                "resources.zero_stage",
            )
        )
    if resources.gpus > 1 and resources.zero_stage == 0:
        notes.append(
            Note(
                "data_parallel_replicates",
                f"zero_stage 0 replicates the model, gradients and optimizer states on each of the "
                f"{resources.gpus} GPUs; the estimate is what each one needs",
                "resources.zero_stage",
            )
        )
    if resources.nodes > 1:
        traffic = {
            0: "every step all-reduces the adapter's gradients",
            2: "every step reduce-scatters the gradients and all-gathers the updated adapter",
            3: "every forward and backward pass also all-gathers each layer's weights",
        }[resources.zero_stage]
        notes.append(
            Note(
                "spans_nodes",
                f"runs as a Ray Train job on {resources.nodes} nodes x {resources.gpus_per_node} GPUs "
                f"({resources.gpus} ranks): {traffic} between nodes, so the network between them sets the pace; "
                "the memory estimate is per GPU, with ZeRO sharding over all ranks",
                "resources.nodes",
            )
        )
    if spec.quantized and resources.zero_stage == 3:
        notes.append(
            Note(
                "qlora_zero3_quant_storage",
                "ZeRO-3 can shard the 4-bit weights because the qlora recipe stores them with "
                "bnb_4bit_quant_storage equal to the compute dtype (flat floating-point tensors DeepSpeed can partition)",
                "resources.zero_stage",
            )
        )
    if (
        hp is not None
        and (hp.packing or hp.padding_free)
        and shape.model_type not in PADDING_FREE_MODEL_TYPES
    ):
        param = "hyperparameters.packing" if hp.packing else "hyperparameters.padding_free"
        refusals.append(
            Refusal(
                "padding_free_unsupported",
                param,
                f"{param.rsplit('.', 1)[1]} concatenates samples without padding, and the attention of model type "
                f"{shape.model_type!r} is not known to keep them apart (samples would attend to each other); "
                f"remove {param.rsplit('.', 1)[1]}",
            )
        )
    if hp is not None and hp.liger_kernel and shape.model_type not in LIGER_MODEL_TYPES:
        refusals.append(
            Refusal(
                "liger_unsupported",
                "hyperparameters.liger_kernel",
                f"Liger has no kernels for model type {shape.model_type!r} (it patches "
                f"{', '.join(sorted(LIGER_MODEL_TYPES))}); remove liger_kernel",
            )
        )
    if hp is not None and hp.packing:
        notes.append(
            Note(
                "packing_attention",
                "packing runs padding-free: each micro-batch becomes one row of batch_size x max_seq_length "
                "tokens, and without flash-attention the attention builds a (batch_size x max_seq_length)^2 "
                "boolean mask that keeps packed samples apart (counted in the estimate)",
                "hyperparameters.packing",
            )
        )
    if spec.method in PREFERENCE_METHODS:
        notes.append(
            Note(
                "preference_pairs",
                "each pair is two sequences (prompt + chosen, prompt + rejected): a micro-batch of batch_size pairs "
                f"runs {2 * (hp.batch_size if hp else 1)} sequences through the model with the adapter and again "
                "without it (the reference: the same weights, no second copy); the estimate counts both",
                "hyperparameters.batch_size",
            )
        )
    return refusals, notes


def feature_refusals(spec: JobSpec, features: Collection[str]) -> list[Refusal]:
    """The job options that need what this deployment's training workers do not offer (`features`, the
    TUNEFORGE_WORKER_FEATURES setting), each naming its field."""
    hp = spec.hyperparameters
    if hp is None:
        return []
    offered = ", ".join(sorted(features)) or "none"
    refusals = []

    def lacks(code: str, param: str, message: str) -> None:
        refusals.append(
            Refusal(
                code, f"hyperparameters.{param}", f"{message} (this deployment's workers offer: {offered})"
            )
        )

    if hp.bf16 and "bf16" not in features:
        lacks(
            "bf16_unavailable",
            "bf16",
            "bf16 needs workers with bfloat16 (a GPU since Ampere, AVX512-BF16 or AMX)",
        )
    if hp.attn_implementation == "flash_attention_2":
        if "cuda" not in features or "flash_attention_2" not in features:
            lacks(
                "flash_attention_unavailable",
                "attn_implementation",
                "flash_attention_2 needs GPU workers with flash-attn installed; choose sdpa",
            )
        elif hp.bf16 is None and "bf16" not in features:
            lacks(
                "flash_attention_unavailable",
                "attn_implementation",
                "flash_attention_2 computes in bfloat16, which these workers lack; choose sdpa",
            )
    if hp.liger_kernel and ("cuda" not in features or "liger_kernel" not in features):
        lacks(
            "liger_unavailable",
            "liger_kernel",
            "Liger's Triton kernels need GPU workers with the liger extra",
        )
    return refusals


def static_refusals(
    spec: JobSpec, shape: ModelShape, layers: list[LinearLayer] | None = None
) -> list[Refusal]:
    """The combinations of `spec` and this model that are known to fail, each naming its field."""
    return static_checks(spec, shape, layers)[0]


# ---------------------------------------------------------------------------------------------- memory


def quantized_tensor_bytes(numel: int, quantization: QuantizationSpec) -> int:
    """Bytes bitsandbytes keeps for one 4-bit weight of `numel` elements: the packed 4-bit values, one absmax
    per 64-block (fp32, or 8-bit plus an fp32 absmax per 256 absmax values with double quantization) and the
    per-tensor codes."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    packed = math.ceil(numel / 2)
    if quantization.double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES
    else:
        constants = 4 * blocks
    return packed + constants + NF4_CODE_BYTES


def qlora_weight_bytes(shape: ModelShape, quantization: QuantizationSpec, base_params: int) -> dict[str, int]:
    """QLoRA's frozen weights: the blocks' linear layers in 4 bits, every other parameter in fp32."""
    quantized = 0
    for layer in shape.linear_layers().values():
        quantized += quantized_tensor_bytes(layer.in_features * layer.out_features, quantization)
        if layer.bias:
            quantized += QLORA_UNQUANTIZED_BYTES * layer.out_features
    quantized *= shape.num_hidden_layers
    unquantized_params = max(base_params - shape.linear_parameters(), 0)
    return {
        "quantized": quantized,
        "unquantized": QLORA_UNQUANTIZED_BYTES * unquantized_params,
        "quantized_params": shape.linear_parameters(),
        "unquantized_params": unquantized_params,
    }


def layer_activation_bytes(
    shape: ModelShape,
    *,
    tokens: int,
    targets: list[LinearLayer],
    rank: int,
    dropout: float,
    dora: bool,
    attention_mask: bool,
    dropout_mask_bytes: int = DROPOUT_MASK_BYTES,
) -> dict[str, int]:
    """What autograd keeps for the backward pass of one decoder block, by part, at `tokens` T = b x s.

    norms: each of the two RMSNorms upcasts its input to fp32 and keeps it, plus an fp32 rsqrt per token.
    attention: q after RoPE and the attention output (T x q_dim each), k after RoPE and v (T x kv_dim each, or
    T x q_dim once a mask is passed: transformers then repeats the kv heads), the fp32 logsumexp (T x heads).
    Flash / memory-efficient attention keep no s x s scores; the frozen projections keep only their weights.
    mlp: the gate and up outputs and silu(gate) (T x intermediate each).
    lora: per wrapped layer, the bf16 copy of its input that lora_A keeps (peft casts the input to the fp32
    adapter's dtype and autocast casts it back for the matmul: one copy per layer, even for layers reading the
    same tensor), the dropout mask when dropout > 0, and lora_A's output (T x r).
    dora: the base and the LoRA outputs that DoRA's magnitude scaling multiplies (2 x T x out per layer)."""
    a = ACTIVATION_BYTES
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    t = tokens
    kv_kept = q if attention_mask else kv
    mask_bytes = dropout_mask_bytes if dropout > 0 else 0
    return {
        "norms": 2 * (4 * t * h + 4 * t),
        "attention": 2 * a * t * q + 2 * a * t * kv_kept + 4 * t * shape.num_attention_heads,
        "mlp": 3 * a * t * i,
        "lora": sum(t * layer.in_features * (a + mask_bytes) + a * t * rank for layer in targets),
        "dora": sum(2 * a * t * layer.out_features for layer in targets) if dora else 0,
    }


def reference_pass_bytes(shape: ModelShape, *, tokens: int, residual: int, quantized: bool) -> int:
    """The largest working set of DPO's reference pass (the base with the adapter off, without autograd) at
    `tokens` T: a block's input and output (residual stream), the larger of its attention and MLP tensors, and
    the fused head's logits tile and per-token statistics; plus, for a 4-bit base, one dequantized weight. It
    runs after the policy's forward pass, while that pass's activations are held."""
    a = ACTIVATION_BYTES
    h, q, i, t = shape.hidden_size, shape.q_dim, shape.intermediate_size, tokens
    attention = 2 * a * t * q + 2 * a * t * q + 4 * t * shape.num_attention_heads
    mlp = 3 * a * t * i
    head = (
        min(t, FUSED_HEAD_TOKEN_TILE) * FUSED_HEAD_VOCAB_TILE * ACTIVATION_BYTES
        + FUSED_HEAD_STATS_PER_TOKEN * t
    )
    dequantized = (
        a * max(ly.in_features * ly.out_features for ly in shape.linear_layers().values()) if quantized else 0
    )
    return 2 * residual * t * h + max(attention, mlp) + head + dequantized


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one GPU during training, in bytes, by component."""

    gpus: int
    zero_stage: int
    micro_batch_size: int
    seq_length: int
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    components: dict[str, int]  # for the job's gradient_checkpointing setting; they add up to `total`
    activations: dict[str, int]  # with_checkpointing / without_checkpointing
    per_layer_activations: dict[str, int]
    total: int
    total_with_checkpointing: int
    total_without_checkpointing: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_other_setting(self) -> int:
        return (
            self.total_without_checkpointing if self.gradient_checkpointing else self.total_with_checkpointing
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_gib"] = gib(self.total)
        data["components_gib"] = {k: gib(v) for k, v in self.components.items()}
        data["other_setting"] = {
            "gradient_checkpointing": not self.gradient_checkpointing,
            "total": self.total_other_setting,
            "total_gib": gib(self.total_other_setting),
        }
        return data


def estimate_memory(
    spec: JobSpec,
    shape: ModelShape,
    trainable_params: int,
    total_params: int,
    *,
    seq_length: int | None = None,
) -> MemoryEstimate:
    """Estimates the peak memory of each GPU for an adapter-training job (lora, dora, rslora, qlora, dpo).

    `trainable_params` and `total_params` are peft's counts (worker.planning.count_parameters) or, without the
    worker, adapter_parameters() and base_parameters() + adapter_parameters(). `seq_length` is the longest
    padded sequence a micro-batch will have (default max_seq_length; packing always fills max_seq_length).
    A dpo micro-batch holds each pair's chosen and rejected sequences (2 x batch_size rows) and also runs them
    through the reference (the base with the adapter switched off)."""
    if spec.method not in LORA_METHODS or spec.adapter is None or spec.hyperparameters is None:
        raise ValueError(
            f"memory estimates cover lora, dora, rslora, qlora and dpo jobs, not {spec.method.value}"
        )
    hp, adapter, resources = spec.hyperparameters, spec.adapter, spec.resources
    gpus, zero = max(resources.gpus, 1), resources.zero_stage
    preference = spec.method in PREFERENCE_METHODS
    # Rows of a micro-batch: a preference pair is two sequences, padded to the longer of the batch.
    b = hp.batch_size * (2 if preference else 1)
    s = hp.seq_length if hp.packing or seq_length is None else max(1, min(seq_length, hp.seq_length))
    t = b * s
    qlora = spec.quantized
    base_params = max(total_params - trainable_params, 0)
    targets = targeted_layers(spec, shape)
    h, i, n_layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    details: dict[str, Any] = {"base_params": base_params, "trainable_params": trainable_params}

    # Weights: bf16, or for qlora the blocks' linear layers in 4 bits and every other parameter in fp32.
    if qlora:
        assert spec.quantization is not None
        split = qlora_weight_bytes(shape, spec.quantization, base_params)
        weights = split["quantized"] + split["unquantized"]
        block_weights = split["quantized"] // n_layers
        details["qlora_weights"] = split
    else:
        weights = 2 * base_params
        block_weights = 2 * (shape.linear_parameters() // n_layers + 2 * h)
    # Adapters train in fp32 (peft upcasts them; the qlora recipe undoes trl's bf16 cast), plus the bf16 copies
    # autocast makes for the matmuls and keeps for the backward pass. Gradients and AdamW's two moments are
    # fp32 like the parameters.
    master = 4 * trainable_params
    casts = ACTIVATION_BYTES * trainable_params
    gradients = 4 * trainable_params
    optimizer = 8 * trainable_params
    gathered = 0
    if zero >= 2:
        gradients = math.ceil(gradients / gpus)
        optimizer = math.ceil(optimizer / gpus)
    if zero == 3:
        weights = math.ceil(weights / gpus)
        master = math.ceil(master / gpus)
        if gpus > 1:
            # Each block's weights are gathered before use, and the next block's are prefetched meanwhile.
            gathered = 2 * block_weights

    # Activations: what autograd keeps, for every block or (checkpointing) only each block's input plus one
    # block recomputed during its backward pass.
    per_layer = layer_activation_bytes(
        shape,
        tokens=t,
        targets=targets,
        rank=adapter.rank,
        dropout=adapter.dropout,
        dora=bool(adapter.use_dora),
        # Padded batches and packed rows pass a mask (a batch of equal lengths would not): counted as if.
        attention_mask=True,
    )
    layer_total = sum(per_layer.values())
    # The residual stream is bf16, or fp32 for qlora (its embeddings and norms are upcast to fp32).
    residual = 4 if qlora else ACTIVATION_BYTES
    final_norm = 4 * t * h + 4 * t
    without_ckpt = n_layers * layer_total + final_norm
    with_ckpt = n_layers * residual * t * h + layer_total + final_norm
    # The attention mask: (b, 1, s, s) booleans for padded batches, (1, 1, b*s, b*s) for a packed row.
    # padding_free=true flattens the micro-batch like a packed row; left to the worker, it is chosen only where
    # the flattened mask stays within the padded one.
    mask = t * t if hp.packing or hp.padding_free else b * s * s
    # Fused LM head and loss: the final hidden states it keeps, its fp32 per-token statistics, the logits tile
    # (allocated 32768 entries wide whatever the vocabulary), and in the backward pass the fp32 gradient of the
    # hidden states plus its copy in their dtype. qlora's fp32 head is cast to bf16 one tile at a time.
    tile = min(t, FUSED_HEAD_TOKEN_TILE) * FUSED_HEAD_VOCAB_TILE * ACTIVATION_BYTES
    lm_head = residual * t * h + FUSED_HEAD_STATS_PER_TOKEN * t + tile + (4 + residual) * t * h
    if qlora:
        lm_head += min(shape.vocab_size, FUSED_HEAD_VOCAB_TILE) * h * ACTIVATION_BYTES
    # For reference: what a plain cross-entropy over fp32 logits (b x s x vocab) would keep; trl does not.
    details["logits_unfused"] = 4 * t * shape.vocab_size
    # Backward through a block: gradients of the MLP's intermediate tensors and of the residual stream.
    backward = 3 * ACTIVATION_BYTES * t * i + 4 * ACTIVATION_BYTES * t * h
    if qlora:
        # bitsandbytes dequantizes each 4-bit weight to the compute dtype for its matmul.
        backward += ACTIVATION_BYTES * max(
            ly.in_features * ly.out_features for ly in shape.linear_layers().values()
        )
    if adapter.use_dora and targets:
        # DoRA rebuilds B x A through an (in x in) identity matrix, kept in fp32 and as autocast's bf16 copy,
        # and the weight norm from fp32 copies of the weight and of B x A.
        backward += max(6 * ly.in_features**2 + 14 * ly.in_features * ly.out_features for ly in targets)

    reference = 0
    if preference:
        reference = reference_pass_bytes(shape, tokens=t, residual=residual, quantized=qlora)
        details["preference"] = {
            "sequences_per_micro_batch": b,
            "reference_model": "the base model with the adapter switched off: no second copy of the weights",
            "reference_pass": reference,
        }

    def total_for(activations: int) -> tuple[dict[str, int], int]:
        parts = {
            "weights": weights,
            "adapter_weights": master + casts,
            "gradients": gradients,
            "optimizer_states": optimizer,
            "activations": activations,
            "attention_mask": mask,
            "lm_head_and_loss": lm_head,
            "backward_workspace": backward,
            "zero3_gathered_weights": gathered,
        }
        if preference:
            parts["reference_pass"] = reference
        subtotal = sum(parts.values())
        parts["overhead"] = CUDA_CONTEXT_BYTES + math.ceil(ALLOCATOR_SLACK * subtotal)
        return parts, subtotal + parts["overhead"]

    checkpointing = bool(hp.gradient_checkpointing)
    components, total = total_for(with_ckpt if checkpointing else without_ckpt)
    return MemoryEstimate(
        gpus=gpus,
        zero_stage=zero,
        micro_batch_size=hp.batch_size,
        seq_length=s,
        tokens_per_micro_batch=t,
        gradient_checkpointing=checkpointing,
        components=components,
        activations={"with_checkpointing": with_ckpt, "without_checkpointing": without_ckpt},
        per_layer_activations=per_layer,
        total=total,
        total_with_checkpointing=total_for(with_ckpt)[1],
        total_without_checkpointing=total_for(without_ckpt)[1],
        details=details,
    )


# ---------------------------------------------------------------------------------------------- the plan


def memory_notes(estimate: MemoryEstimate, gpu_memory_bytes: int | None) -> list[Note]:
    """Notes on whether the estimate fits a GPU of `gpu_memory_bytes`, and what would make it fit."""
    if gpu_memory_bytes is None:
        return []
    if estimate.total <= gpu_memory_bytes:
        return []
    message = (
        f"the estimated peak of {format_bytes(estimate.total)} per GPU is above the "
        f"{format_bytes(gpu_memory_bytes)} a GPU has here"
    )
    if not estimate.gradient_checkpointing and estimate.total_with_checkpointing <= gpu_memory_bytes:
        return [
            Note(
                "memory_over_capacity",
                message
                + f"; with gradient_checkpointing it would be {format_bytes(estimate.total_with_checkpointing)}",
                "hyperparameters.gradient_checkpointing",
            )
        ]
    return [
        Note(
            "memory_over_capacity",
            message + "; lower batch_size or max_seq_length (raise gradient_accumulation_steps to keep the "
            "effective batch)",
            "hyperparameters.batch_size",
        )
    ]


def build_plan(
    spec: JobSpec,
    shape: ModelShape,
    *,
    params: dict[str, int] | None = None,
    datasets: dict[str, dict[str, Any]] | None = None,
    memory: MemoryEstimate | None = None,
    refusals: list[Refusal] | None = None,
    notes: list[Note] | None = None,
    gpu_memory_bytes: int | None = None,
) -> dict[str, Any]:
    """Assembles the plan a job carries (jobs.plan, plans.result): JSON-serialisable, with `status` 'refused'
    when any refusal stands and 'ready' otherwise."""
    refusals = list(refusals or [])
    notes = list(notes or [])
    if memory is not None:
        notes.extend(memory_notes(memory, gpu_memory_bytes))
    hp = spec.hyperparameters
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "status": "refused" if refusals else "ready",
        "method": spec.method.value,
        "base_model": spec.base_model,
        "model": shape.to_dict(),
        "params": dict(params) if params is not None else None,
        "datasets": dict(datasets or {}),
        "memory": memory.to_dict() if memory is not None else None,
        "effective_batch_size": (
            hp.batch_size * hp.gradient_accumulation_steps * spec.resources.gpus if hp is not None else None
        ),
        "topology": {
            "nodes": spec.resources.nodes,
            "gpus_per_node": spec.resources.gpus_per_node,
            "world_size": spec.resources.gpus,
            "launcher": "ray"
            if spec.resources.nodes > 1
            else ("torchrun" if spec.resources.gpus > 1 else "process"),
        },
        "refusals": [r.to_dict() for r in refusals],
        "notes": [n.to_dict() for n in notes],
    }
    if params is not None and params.get("total"):
        plan["params"]["trainable_percent"] = round(100 * params["trainable"] / params["total"], 4)
    return plan
