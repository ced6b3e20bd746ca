"""peft's LoraConfig for a job on a model: rank, scaling, dropout, the DoRA and rsLoRA variants, and the
target modules resolved against the model's own layers. The recipes train with it; the planner builds the
same one on the meta device to count parameters."""

from __future__ import annotations

import torch
from peft import LoraConfig

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import JobSpec

ATTENTION_HINTS = ("attn", "attention")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Returns the full names of the model's linear layers, the output head excluded."""
    output_head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_head
    ]


def resolve_target_modules(model: torch.nn.Module, target: str | list[str]) -> str | list[str]:
    """Turns a preset or an explicit list into what peft takes, refusing names the model lacks."""
    if target == "all-linear":
        return "all-linear"
    linear = linear_module_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if target == "attention":
        found = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name in linear
                if any(hint in name.rsplit(".", 1)[0].lower() for hint in ATTENTION_HINTS)
            }
        )
        if not found:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"found no attention projections in this model; name target_modules from: {leaves}",
            )
        return found
    missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"target_modules {missing} are not linear layers of this model; choose from {leaves}",
        )
    return list(target)


def lora_config(spec: JobSpec, model: torch.nn.Module) -> LoraConfig:
    """peft's LoraConfig for the job on this model."""
    adapter = spec.adapter
    assert adapter is not None
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=resolve_target_modules(model, adapter.target_modules),
        task_type="CAUSAL_LM",
        use_dora=bool(adapter.use_dora),
        use_rslora=bool(adapter.use_rslora),
    )
