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


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for key, item in value.items():
            rows += _flatten(f"{prefix}.{key}" if prefix else key, item)
        return rows
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [row for i, item in enumerate(value) for row in _flatten(f"{prefix}[{i}]", item)]
    return [(prefix, value)]


SECTIONS = ("adapter", "quantization", "dpo", "merge", "fusion", "export", "hyperparameters")


def _lineage(spec: JobSpec) -> list[str]:
    """Which job's adapter this one continued from, if any."""
    init = spec.init_from
    if init is None:
        return []
    start = f"its checkpoint at step {init.checkpoint_step}" if init.checkpoint_step else "its final adapter"
    return [f"Continued from Tuneforge job `{init.job}` ({start}).", ""]


def write_model_card(
    output_dir: Path,
    *,
    job_id: str,
    spec: JobSpec,
    trainable_params: int,
    total_params: int,
    trained_tokens: int,
    metrics: dict[str, Any],
    full_model: bool = False,
) -> Path:
    """Writes README.md: front matter for model hubs, then the job's settings, parameters and results."""
    base = spec.base_model or "the base model"
    front = {
        "base_model": spec.base_model,
        "library_name": "transformers" if full_model else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["tuneforge", spec.method.value] + ([] if full_model else ["peft"]),
    }
    dumped = spec.model_dump(mode="json", exclude_none=True)
    settings_rows = [("method", spec.method.value)]
    for section in SECTIONS:
        if section in dumped:
            settings_rows += _flatten(section, dumped[section])
    share = 100 * trainable_params / total_params if total_params else 0.0
    config_path = output_dir / "adapter_config.json"
    rank = json.loads(config_path.read_text()).get("r") if config_path.exists() else None
    title = "Merged model" if full_model else f"{spec.method.value.upper()} adapter"
    source = f" on `{spec.dataset}`" if spec.dataset else ""
    if full_model:
        usage = [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("<path to this folder>")',
            'tokenizer = AutoTokenizer.from_pretrained("<path to this folder>")',
            "```",
            "",
            "vLLM: `vllm serve <path to this folder>`",
        ]
    else:
        usage = [
            "```python",
            "from transformers import AutoModelForCausalLM",
            "from peft import PeftModel",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("<path to {base}>")',
            'model = PeftModel.from_pretrained(base, "<path to this folder>")',
            "```",
            "",
            f"vLLM: `vllm serve <base> --enable-lora --lora-modules {job_id}=<path to this folder>"
            + (f" --max-lora-rank {rank}`" if rank else "`"),
        ]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {title} for `{base}`",
        "",
        f"Made by Tuneforge job `{job_id}`{source}.",
        "",
        *_lineage(spec),
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
        *usage,
        "",
        "<!-- tuneforge-job",
        json.dumps({"job_id": job_id, "spec": dumped, "metrics": metrics}, indent=1),
        "-->",
        "",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
