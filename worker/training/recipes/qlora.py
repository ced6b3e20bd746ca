"""QLoRA: LoRA (optionally DoRA / rsLoRA) on a frozen base model stored in 4 bits by bitsandbytes."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import Method, QuantizationSpec
from worker.training.quantization import (
    bnb_4bit_config,
    compute_dtype,
    disable_cpu_inference_repacking,
    linear4bit_modules,
)
from worker.training.recipes.lora import LoraRecipe


class QLoraRecipe(LoraRecipe):
    """The base loads in 4 bits (nf4 or fp4, optionally double-quantized) and is dequantized to the compute
    dtype for each matmul; the adapter trains in float32 on top of it, as in LoRA."""

    method = Method.qlora

    @property
    def quantization(self) -> QuantizationSpec:
        return self.ctx.spec.quantization or QuantizationSpec()

    def load_base_model(self) -> torch.nn.Module:
        quant = self.quantization
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:  # an optional dependency of the worker
            raise JobFailure(
                JobErrorCode.invalid_config, "this worker cannot run qlora: bitsandbytes is not installed"
            ) from exc
        dtype = compute_dtype(quant)
        # The modules that stay unquantized (embeddings, norms, output head) load in the compute dtype, as the
        # 4-bit storage does (what ZeRO-3 needs); prepare_base_model then upcasts them to float32.
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            # bitsandbytes places a 4-bit model on one device when it loads; under torchrun each process
            # takes its own GPU (transformers would otherwise pick the current device, GPU 0 on every rank).
            kwargs["device_map"] = {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
        model = AutoModelForCausalLM.from_pretrained(
            self.ctx.model_dir,
            quantization_config=bnb_4bit_config(quant),
            dtype=dtype,
            attn_implementation=self.kernels.attn_implementation,
            **kwargs,
        )
        layers = linear4bit_modules(model)
        if not layers:
            raise JobFailure(JobErrorCode.invalid_config, "bitsandbytes quantized no layer of this model")
        repacking_off = disable_cpu_inference_repacking(model)
        self.ctx.reporter.event(
            "quantization",
            f"base model loaded in 4 bits: {len(layers)} linear layers as {quant.quant_type}"
            f"{' with double quantization' if quant.double_quant else ''}, computing in {quant.compute_dtype}",
            data={
                "quant_type": quant.quant_type,
                "double_quant": quant.double_quant,
                "compute_dtype": quant.compute_dtype,
                "quant_storage": quant.compute_dtype,
                "quantized_layers": len(layers),
                "cpu_inference_repacking_disabled": repacking_off,
                "adapter_dtype": "float32",
            },
        )
        return model

    def prepare_base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        hp = self.ctx.spec.hyperparameters
        assert hp is not None
        # Freezes the base, upcasts its unquantized parameters to float32 and, when asked, turns on
        # non-reentrant gradient checkpointing (which needs no input-gradient hook). The trainer re-enables
        # checkpointing with the same non-reentrant default when training starts.
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(hp.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def setup(self) -> None:
        super().setup()
        assert self.model is not None
        keep_adapter_in_float32(self.model)


def keep_adapter_in_float32(model: torch.nn.Module) -> None:
    """Undoes trl's cast of a quantized model's adapter to bfloat16. trl's trainers (SFT and DPO) cast the
    trainable adapter weights of a quantized model to bfloat16 (following the QLoRA paper), whatever compute
    dtype was asked for. The optimizer then updates bfloat16 weights with no float32 master copy, so updates
    smaller than bfloat16's resolution are lost. Keep them in float32 like every other LoRA job here (on GPU the
    trainer's bf16 autocast still computes the adapter matmuls in bfloat16). Call it before training starts:
    the optimizer does not exist yet, so it is built on the float32 weights."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
