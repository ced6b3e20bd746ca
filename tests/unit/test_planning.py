"""The pure planner: Llama-2-7B's shape and parameter counts, the memory formulas against numbers worked out
by hand, ZeRO sharding, QLoRA's 4-bit storage, and each refusal naming its field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared.planning import (
    CUDA_CONTEXT_BYTES,
    GIB,
    ModelConfigError,
    ModelShape,
    adapter_parameters,
    build_plan,
    estimate_memory,
    format_bytes,
    gib,
    quantized_tensor_bytes,
    static_checks,
    static_refusals,
)
from shared.schemas import Hyperparameters, JobSpec, QuantizationSpec, Resources

# meta-llama/Llama-2-7b-hf config.json (the fields the planner reads).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
}
# meta-llama/Meta-Llama-3-8B: grouped-query attention (8 kv heads of 128).
LLAMA3_8B = {
    **LLAMA2_7B,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}
# The tiny Llama of the tests (worker.training.toy_models.build_llama): k/v projections 64 -> 32.
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

H, FF, L, V = 4096, 11008, 32, 32000
LLAMA2_7B_PARAMS = 6_738_415_616  # the published count


def spec(method: str = "lora", adapter: dict | None = None, resources: dict | None = None, **hp) -> JobSpec:
    return JobSpec(
        base_model="llama-2-7b",
        dataset="file:///d.jsonl",
        method=method,
        adapter={"rank": 16, "target_modules": "all-linear", **(adapter or {})},
        hyperparameters={"batch_size": 1, "max_seq_length": 4096, **hp},
        resources=resources or {},
    )


def shape7b() -> ModelShape:
    return ModelShape.from_config(LLAMA2_7B)


def counts(job: JobSpec, shape: ModelShape) -> tuple[int, int]:
    trainable = adapter_parameters(job, shape)
    return trainable, shape.base_parameters() + trainable


def estimate(job: JobSpec, shape: ModelShape | None = None):
    shape = shape or shape7b()
    return estimate_memory(job, shape, *counts(job, shape))


# a. Reading config.json


def test_shape_of_llama2_7b():
    shape = shape7b()
    assert (shape.head_dim, shape.q_dim, shape.kv_dim) == (128, 4096, 4096)
    assert shape.context_length == 4096
    assert shape.base_parameters() == LLAMA2_7B_PARAMS
    assert ModelShape.from_config(LLAMA3_8B).kv_dim == 1024


def test_shape_reads_nested_text_config_and_rope_scaling():
    nested = {"model_type": "llava", "text_config": dict(LLAMA2_7B), "vision_config": {}}
    assert ModelShape.from_config(nested).hidden_size == 4096
    yarn = {**LLAMA2_7B, "max_position_embeddings": 32768}
    yarn["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert ModelShape.from_config(yarn).context_length == 131072
    # Llama 3.1 states its stretched window as max_position_embeddings already.
    llama31 = {**LLAMA3_8B, "max_position_embeddings": 131072}
    llama31["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert ModelShape.from_config(llama31).context_length == 131072


def test_unreadable_configs_say_what_is_missing():
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    with pytest.raises(ModelConfigError, match=r"gpt2.*hidden_size, intermediate_size, num_hidden_layers"):
        ModelShape.from_config(gpt2)
    with pytest.raises(ModelConfigError, match="num_key_value_heads 5 does not divide"):
        ModelShape.from_config({**LLAMA2_7B, "num_key_value_heads": 5})
    with pytest.raises(ModelConfigError, match="JSON object"):
        ModelShape.from_config([LLAMA2_7B])  # type: ignore[arg-type]


def test_adapter_parameter_counts():
    shape = shape7b()
    # all-linear, r=16: q,k,v,o 16 x (4096+4096), gate/up 16 x (4096+11008), down 16 x (11008+4096).
    assert adapter_parameters(spec(), shape) == 32 * (4 * 16 * 8192 + 3 * 16 * 15104) == 39_976_960
    assert adapter_parameters(spec(adapter={"rank": 8, "target_modules": "attention"}), shape) == 8_388_608
    # DoRA adds one magnitude per output feature of each wrapped layer.
    dora = spec("dora", adapter={"rank": 8, "target_modules": ["q_proj", "v_proj"]})
    assert adapter_parameters(dora, shape) == 32 * (2 * 8 * 8192 + 2 * 4096)


# b. Memory, component by component


def test_static_components_for_lora():
    job = spec()
    trainable, _ = counts(job, shape7b())
    est = estimate(job).components
    assert est["weights"] == 2 * LLAMA2_7B_PARAMS  # bf16
    assert est["adapter_weights"] == (4 + 2) * trainable  # fp32 + autocast's bf16 copies
    assert est["gradients"] == 4 * trainable
    assert est["optimizer_states"] == 8 * trainable  # AdamW: two fp32 moments
    assert est["zero3_gathered_weights"] == 0


def test_activations_of_a_llama_block_by_hand():
    b, s = 1, 4096
    t = b * s
    job = spec(adapter={"dropout": 0.05}, batch_size=b, max_seq_length=s, gradient_checkpointing=False)
    est = estimate(job)
    layer = est.per_layer_activations
    assert layer["norms"] == 2 * (4 * t * H + 4 * t)  # fp32 input + rsqrt, two norms
    # q and output (T x 4096 each), k and v repeated to 32 heads since a mask is passed, fp32 logsumexp.
    assert layer["attention"] == 2 * 2 * t * 4096 + 2 * 2 * t * 4096 + 4 * t * 32
    assert layer["mlp"] == 3 * 2 * t * FF  # gate, up, silu(gate)
    # Seven LoRA layers: a bf16 input copy and a one-byte dropout mask each, plus lora_A's T x r output.
    inputs = 6 * H + FF  # q, k, v, gate, up read hidden-size inputs, o reads q_dim = 4096, down reads 11008
    assert layer["lora"] == t * inputs * (2 + 1) + 7 * 2 * t * 16
    assert layer["dora"] == 0
    per_layer = sum(layer.values())
    final_norm = 4 * t * H + 4 * t
    assert est.activations["without_checkpointing"] == L * per_layer + final_norm
    # Checkpointing keeps each block's bf16 input plus one block recomputed in its backward pass.
    assert est.activations["with_checkpointing"] == L * 2 * t * H + per_layer + final_norm
    assert est.components["activations"] == est.activations["without_checkpointing"]
    assert est.components["attention_mask"] == b * s * s
    # Fused head: final hidden states, fp32 per-token stats, the 4096 x 32768 bf16 tile, fp32 grad + copy.
    assert est.components["lm_head_and_loss"] == 2 * t * H + 40 * t + 4096 * 32768 * 2 + 6 * t * H
    assert est.details["logits_unfused"] == 4 * t * V


def test_totals_for_both_checkpointing_settings():
    off = estimate(spec(gradient_checkpointing=False))
    on = estimate(spec(gradient_checkpointing=True))
    assert off.total == sum(off.components.values())
    assert (off.total_without_checkpointing, off.total_with_checkpointing) == (off.total, on.total)
    assert (on.total_other_setting, off.total_other_setting) == (off.total, on.total)
    assert on.total < off.total
    data = off.to_dict()
    assert data["other_setting"] == {
        "gradient_checkpointing": True,
        "total": on.total,
        "total_gib": gib(on.total),
    }
    # Llama-2-7B, LoRA r=16 (dropout 0.05) on all linear layers, one 4096-token sequence: about 46 GiB without
    # checkpointing (29 GiB of it activations, peft's per-layer input copies and dropout masks included), about
    # 18 GiB with it; the bf16 weights alone are 12.55 GiB.
    assert 40 * GIB < off.total < 55 * GIB
    assert 15 * GIB < on.total < 20 * GIB
    assert gib(off.components["weights"]) == 12.55


def test_overhead_is_context_plus_slack():
    est = estimate(spec())
    parts = {k: v for k, v in est.components.items() if k != "overhead"}
    assert est.components["overhead"] == CUDA_CONTEXT_BYTES + -(-5 * sum(parts.values()) // 100)


def test_shorter_batches_and_packing():
    job = spec(max_seq_length=2048, batch_size=4)
    assert estimate_memory(job, shape7b(), *counts(job, shape7b()), seq_length=300).seq_length == 300
    packed = spec(max_seq_length=2048, batch_size=4, packing=True)
    est = estimate_memory(packed, shape7b(), *counts(packed, shape7b()), seq_length=300)
    # Packing fills every row; the micro-batch is one row of b x s tokens with a (b*s)^2 mask.
    assert est.seq_length == 2048
    assert est.components["attention_mask"] == (4 * 2048) ** 2


def test_zero_stages_shard_the_right_terms():
    plain = estimate(spec(resources={"gpus": 4, "zero_stage": 0})).components
    zero2 = estimate(spec(resources={"gpus": 4, "zero_stage": 2})).components
    zero3 = estimate(spec(resources={"gpus": 4, "zero_stage": 3})).components
    trainable = adapter_parameters(spec(), shape7b())
    assert zero2["gradients"] == plain["gradients"] // 4 == trainable
    assert zero2["optimizer_states"] == plain["optimizer_states"] // 4 == 2 * trainable
    assert zero2["weights"] == plain["weights"]
    assert zero2["activations"] == plain["activations"]
    assert zero3["weights"] == plain["weights"] // 4
    assert zero3["gradients"] == zero2["gradients"]
    # fp32 master copies are sharded, autocast's bf16 copies are made from gathered weights and are not.
    assert zero3["adapter_weights"] == trainable + 2 * trainable
    # Two gathered blocks (the one computing and the one prefetched), bf16.
    block = 4 * H * H + 3 * H * FF + 2 * H
    assert zero3["zero3_gathered_weights"] == 2 * 2 * block
    assert zero3["activations"] == plain["activations"]
    one_gpu = estimate(spec(resources={"gpus": 1, "zero_stage": 3})).components
    assert one_gpu["weights"] == plain["weights"] and one_gpu["zero3_gathered_weights"] == 0


# c. QLoRA's 4-bit storage


def test_nf4_tensor_bytes_by_hand():
    n = 4096 * 4096
    blocks = n // 64
    double = quantized_tensor_bytes(n, QuantizationSpec(double_quant=True))
    # 4 bits a weight; 8-bit absmax per 64-block; fp32 absmax per 256 absmax; 8-bit code table, offset, nf4 code.
    assert double == n // 2 + blocks + 4 * (blocks // 256) + 256 * 4 + 4 + 16 * 4
    single = quantized_tensor_bytes(n, QuantizationSpec(double_quant=False))
    assert single == n // 2 + 4 * blocks + 16 * 4  # fp32 absmax per 64-block
    assert double / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)  # ~4.127 bits
    assert single / n == pytest.approx(0.5 + 4 / 64, rel=1e-3)  # 4.5 bits


def test_qlora_weights_are_a_quarter_of_bf16_plus_constants():
    job = spec("qlora")
    est = estimate(job)
    split = est.details["qlora_weights"]
    linear = 32 * (4 * H * H + 3 * H * FF)
    assert split["quantized_params"] == linear
    per_block = 4 * quantized_tensor_bytes(H * H, job.quantization) + 3 * quantized_tensor_bytes(
        H * FF, job.quantization
    )
    assert split["quantized"] == 32 * per_block
    ratio = split["quantized"] / (2 * linear)
    assert 0.25 < ratio < 0.26  # 4 bits of 16, plus ~0.127 bits of constants
    # Embeddings, output head and norms stay unquantized and are upcast to fp32.
    assert split["unquantized"] == 4 * (LLAMA2_7B_PARAMS - linear) == 4 * (2 * V * H + 65 * H)
    assert est.components["weights"] == split["quantized"] + split["unquantized"]
    assert est.components["weights"] < 0.4 * estimate(spec()).components["weights"]
    # The residual stream is fp32 in qlora, so checkpointing keeps fp32 block inputs.
    t = 4096
    layer = sum(est.per_layer_activations.values())
    assert est.activations["with_checkpointing"] == L * 4 * t * H + layer + 4 * t * H + 4 * t


# d. Refusals and notes


def codes(found) -> dict[str, str]:
    return {item.code: item.param for item in found}


def test_sequence_longer_than_the_positions_is_refused():
    refused = static_refusals(spec(max_seq_length=8192), shape7b())
    assert codes(refused) == {"max_seq_length_exceeds_positions": "hyperparameters.max_seq_length"}
    assert "at most 4096" in refused[0].message
    assert static_refusals(spec(max_seq_length=4096), shape7b()) == []
    yarn = ModelShape.from_config(
        {**LLAMA2_7B, "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}}
    )
    assert static_refusals(spec(max_seq_length=16384), yarn) == []


def test_rank_above_a_targeted_dimension_is_refused():
    tiny = ModelShape.from_config(TINY)
    refused = static_refusals(spec(adapter={"rank": 64}, max_seq_length=512), tiny)
    assert codes(refused) == {"rank_exceeds_layer": "adapter.rank"}
    assert "k_proj (64->32)" in refused[0].message and "at most 32" in refused[0].message
    # Only the layers the adapter wraps count: q_proj and o_proj are 64 x 64.
    assert (
        static_refusals(
            spec(adapter={"rank": 64, "target_modules": ["q_proj", "o_proj"]}, max_seq_length=512), tiny
        )
        == []
    )
    assert static_refusals(spec(adapter={"rank": 32}, max_seq_length=512), tiny) == []
    # GQA: Llama-3-8B's k/v projections are 4096 -> 1024, and the schema allows rank up to 1024.
    assert (
        static_refusals(spec(adapter={"rank": 1024}, max_seq_length=4096), ModelShape.from_config(LLAMA3_8B))
        == []
    )


def test_empty_batch_is_refused():
    # The schema forbids it; a spec built without validation must still not get through.
    job = spec()
    broken = job.model_copy(
        update={
            "hyperparameters": Hyperparameters.model_construct(
                **{**dict(job.hyperparameters), "batch_size": 0}
            )
        }
    )
    assert codes(static_refusals(broken, shape7b())) == {"empty_batch": "hyperparameters.batch_size"}
    no_gpus = job.model_copy(update={"resources": Resources.model_construct(gpus=0, zero_stage=0)})
    assert codes(static_refusals(no_gpus, shape7b())) == {"empty_batch": "resources.gpus"}


def test_notes_are_not_refusals():
    refused, notes = static_checks(
        spec("qlora", resources={"gpus": 1, "zero_stage": 3}, packing=True), shape7b()
    )
    assert refused == []
    assert codes(notes) == {
        "zero_on_one_gpu": "resources.zero_stage",
        "qlora_zero3_quant_storage": "resources.zero_stage",
        "packing_attention": "hyperparameters.packing",
    }
    _, notes = static_checks(spec(resources={"gpus": 4, "zero_stage": 0}), shape7b())
    assert codes(notes) == {"data_parallel_replicates": "resources.zero_stage"}


# e. The plan


def test_build_plan_is_json_with_status():
    job = spec(max_seq_length=8192)
    shape = shape7b()
    trainable, total = counts(job, shape)
    memory = estimate_memory(job, shape, trainable, total)
    refused, notes = static_checks(job, shape)
    plan = build_plan(
        job,
        shape,
        params={"trainable": trainable, "total": total},
        datasets={"dataset": {"samples": 3}},
        memory=memory,
        refusals=refused,
        notes=notes,
        gpu_memory_bytes=24 * GIB,
    )
    assert json.loads(json.dumps(plan)) == plan
    assert plan["status"] == "refused"
    assert plan["refusals"][0]["param"] == "hyperparameters.max_seq_length"
    assert plan["params"]["trainable_percent"] == round(100 * trainable / total, 4)
    assert plan["memory"]["total"] == memory.total
    # Over a 24 GiB card: the note says so and what to change.
    over = [n for n in plan["notes"] if n["code"] == "memory_over_capacity"]
    assert len(over) == 1 and over[0]["param"]
    ready = build_plan(spec(), shape)
    assert ready["status"] == "ready" and ready["memory"] is None and ready["effective_batch_size"] == 1


def test_byte_helpers():
    assert gib(13_476_831_232) == 12.55
    assert format_bytes(3 * GIB // 2) == "1.50 GiB"
    assert format_bytes(512 * 1024**2) == "512.0 MiB"
    assert format_bytes(2048) == "2.0 KiB"
    assert format_bytes(12) == "12 B"


def test_the_pure_planner_imports_no_torch():
    code = "import sys, shared.planning; assert not {'torch', 'transformers', 'peft'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("quantization", [None, {}])
def test_a_dpo_estimate_is_sft_on_both_sequences_plus_the_reference_pass(quantization):
    """A dpo micro-batch of b pairs runs 2b sequences; the reference adds a no-grad pass over them, and no
    weights (it is the same base with the adapter switched off)."""
    shape = ModelShape.from_config(LLAMA2_7B)
    adapter = {"rank": 16, "target_modules": "all-linear"}
    hp = {"batch_size": 2, "max_seq_length": 1024, "gradient_checkpointing": True}
    dpo = JobSpec(
        base_model="m",
        dataset="d",
        method="dpo",
        adapter=adapter,
        quantization=quantization,
        hyperparameters=hp,
    )
    sft = JobSpec(
        base_model="m",
        dataset="d",
        method="qlora" if quantization is not None else "lora",
        adapter=adapter,
        hyperparameters={**hp, "batch_size": 4},
    )
    trainable = adapter_parameters(dpo, shape)
    total = shape.base_parameters() + trainable
    pairs = estimate_memory(dpo, shape, trainable, total, seq_length=512)
    sequences = estimate_memory(sft, shape, trainable, total, seq_length=512)
    assert pairs.micro_batch_size == 2 and pairs.tokens_per_micro_batch == 2 * 2 * 512
    assert pairs.details["preference"]["sequences_per_micro_batch"] == 4
    reference = pairs.components.pop("reference_pass")
    assert "reference_pass" not in sequences.components
    for part in (
        "weights",
        "adapter_weights",
        "optimizer_states",
        "activations",
        "attention_mask",
        "lm_head_and_loss",
    ):
        assert pairs.components[part] == sequences.components[part], part
    # The reference's working set: a block's tensors at once (no autograd) and the fused head's tile; far less
    # than what the policy's pass keeps, and no second copy of the weights.
    assert 0 < reference < pairs.components["activations"]
    assert reference == pairs.details["preference"]["reference_pass"]
    assert pairs.total > sequences.total
    notes = static_checks(dpo, shape)[1]
    assert any(note.code == "preference_pairs" and "4 sequences" in note.message for note in notes)
