"""The README.md model card that travels with every adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from shared.schemas import JobSpec


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def write_model_card(
    output_dir: Path,
    *,
    job_id: str,
    spec: JobSpec,
    trainable_params: int,
    total_params: int,
    trained_tokens: int,
    metrics: dict[str, Any],
) -> Path:
    """Writes README.md: front matter for model hubs, then the job's settings, parameters and results."""
    front = {
        "base_model": spec.base_model,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["tuneforge", "peft", spec.method.value],
    }
    adapter = spec.adapter.model_dump()
    hp = spec.hyperparameters.model_dump(exclude_none=True)
    settings_rows = [("method", spec.method.value)] + [(f"adapter.{k}", v) for k, v in adapter.items()]
    settings_rows += [(f"hyperparameters.{k}", v) for k, v in hp.items()]
    share = 100 * trainable_params / total_params if total_params else 0.0
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {spec.method.value.upper()} adapter for `{spec.base_model}`",
        "",
        f"Trained by Tuneforge job `{job_id}` on `{spec.dataset}`.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in settings_rows],
        "",
        "## Parameters",
        "",
        f"- trainable: {trainable_params:,} ({share:.4f}% of {total_params:,})",
        f"- tokens seen in training: {trained_tokens:,}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in metrics.items()],
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("<path to {spec.base_model}>")',
        'model = PeftModel.from_pretrained(base, "<path to this folder>")',
        "```",
        "",
        "vLLM: `vllm serve <base> --enable-lora --lora-modules "
        f"{job_id}=<path to this folder> --max-lora-rank {spec.adapter.rank}`",
        "",
        "<!-- tuneforge-job",
        json.dumps({"job_id": job_id, "spec": spec.model_dump(mode="json"), "metrics": metrics}, indent=1),
        "-->",
        "",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
