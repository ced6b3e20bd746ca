"""bitsandbytes 4-bit loading for QLoRA: the quantization config a job spec asks for, and the CPU fix-ups."""

from __future__ import annotations

import torch

from shared.schemas import QuantizationSpec

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def compute_dtype(spec: QuantizationSpec) -> torch.dtype:
    """The dtype the 4-bit weights are dequantized to for each matmul, as the spec asks."""
    return COMPUTE_DTYPES[spec.compute_dtype]


def bnb_4bit_config(spec: QuantizationSpec) -> object:
    """transformers' BitsAndBytesConfig for a QLoRA base model stored as `spec` says."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(spec)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # The packed 4-bit weights are stored in a tensor of the compute dtype rather than uint8, so that every
        # parameter of the model is a floating-point tensor of one dtype: DeepSpeed ZeRO-3 (and FSDP) can then
        # shard the quantized layers like any other, and the same loading code serves one GPU and ZeRO-3 alike.
        # The values are unchanged: bitsandbytes only reinterprets the bytes (two 4-bit values per byte).
        bnb_4bit_quant_storage=dtype,
    )


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's bitsandbytes 4-bit linear layers (wrapped by peft or not), by full name."""
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, `bnb.nn.Linear4bit.forward` in eval mode (and with an input that needs no
    gradient) rewrites the layer's weight in place into a layout for its fused inference kernel, once and for
    good: the packing survives `model.train()`. From then on every forward, in training too, goes through that
    kernel, which (bitsandbytes 0.50) has no autograd formula and computes in bfloat16 whatever the compute
    dtype. After the first evaluation pass the loss still looks right, but no gradient flows back through the
    frozen base layers any more, so the LoRA weights of every layer but the last get wrong gradients; the
    per-block scales are also rounded to bfloat16, and saving re-quantizes them, so the in-memory model no
    longer matches the checkpoint. Training evaluates between steps, so the repacking is switched off.
    """
    changed = 0
    for _, module in linear4bit_modules(model):
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"{type(module).__name__} weight already repacked for CPU inference")
    return changed


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision weight a 4-bit linear layer computes with: its 4-bit data and scales dequantized."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
