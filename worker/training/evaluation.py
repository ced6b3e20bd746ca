"""Evaluation beyond loss, when an adapter's training ends: the validation perplexity of the base model and of
the adapter (on the same validation samples), and both models' answers to the job's `eval_prompts` and to
prompts taken from its validation set, side by side. Bounded: at most MAX_PERPLEXITY_SAMPLES validation
samples, at most 16 prompts of at most `eval_max_new_tokens` greedy tokens each.

The answers are written to a folder the worker stores as the job's `evaluation` artifact (samples.json, read
back by GET /v1/jobs/{id}/evaluation); the perplexities go into the job's result."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shared.datasets import DatasetFormat, DatasetSummary
from shared.schemas import LORA_METHODS, JobSpec
from worker.training import distributed
from worker.training.recipes.base import TrainingContext

# Validation samples the perplexities are measured on (the first ones of the validation dataset).
MAX_PERPLEXITY_SAMPLES = 256
SAMPLES_FILE = "samples.json"


@dataclass
class EvalPrompt:
    """One prompt both models answer: shown as `prompt`, given to the model as a chat (`messages`) or as raw
    text, the way the job's training data was written; `reference` is the validation set's own answer."""

    source: str  # eval_prompts | validation
    prompt: str
    messages: list[dict[str, str]] | None
    reference: str | None = None


def eval_prompts(
    spec: JobSpec, train_format: DatasetFormat | None, validation: DatasetSummary | None
) -> list[EvalPrompt]:
    """The prompts of a job's evaluation: its eval_prompts, then the first eval_samples of its validation set
    (messages: the conversation up to its last assistant turn; prompt/completion: the prompt). Text datasets
    have no prompts to take."""
    chat = train_format is DatasetFormat.messages
    prompts = [
        EvalPrompt("eval_prompts", text, [{"role": "user", "content": text}] if chat else None)
        for text in spec.eval_prompts or []
    ]
    wanted = spec.eval_samples or 0
    if validation is None or not wanted:
        return prompts
    for record in validation.records:
        if wanted <= 0:
            break
        if validation.format is DatasetFormat.messages:
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if not last:
                continue
            shown = "\n".join(m["content"] for m in messages[:last] if m["role"] != "system")
            prompts.append(EvalPrompt("validation", shown, messages[:last], messages[last]["content"]))
        elif validation.format is DatasetFormat.prompt_completion:
            prompts.append(EvalPrompt("validation", record["prompt"], None, record["completion"]))
        else:
            break
        wanted -= 1
    return prompts


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: EvalPrompt, max_new_tokens: int) -> str:
    """The model's greedy answer to one prompt."""
    if prompt.messages is not None:
        inputs = tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt.prompt, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _perplexity(trainer: Any, dataset: Any, prefix: str) -> float | None:
    loss = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix).get(f"{prefix}_loss")
    return round(math.exp(loss), 4) if loss is not None and loss < 50 else None


@dataclass
class Evaluation:
    """What the evaluation found: the result's metrics and the folder to store (None: nothing to store)."""

    metrics: dict[str, Any]
    folder: Path | None


def evaluate_adapter(
    ctx: TrainingContext, model: Any, tokenizer: Any, trainer: Any, eval_dataset: Any
) -> Evaluation:
    """Measures the validation perplexity before and after (every rank takes part) and, on rank 0, answers
    the evaluation prompts with the base model (the adapter switched off) and with the adapter."""
    spec = ctx.spec
    if spec.method not in LORA_METHODS:
        return Evaluation({}, None)
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    perplexity = None
    if eval_dataset is not None and len(eval_dataset):
        subset = eval_dataset.select(range(min(len(eval_dataset), MAX_PERPLEXITY_SAMPLES)))
        with model.disable_adapter():
            before = _perplexity(trainer, subset, "base")
        after = _perplexity(trainer, subset, "adapter")
        perplexity = {"before": before, "after": after, "samples": len(subset)}
        metrics |= {"validation_perplexity_before": before, "validation_perplexity_after": after}
    prompts = eval_prompts(spec, ctx.train_data.format if ctx.train_data else None, ctx.eval_data)
    samples: list[dict[str, Any]] = []
    skipped = None
    if prompts and spec.resources.zero_stage == 3 and distributed.world_size() > 1:
        # Each rank holds a shard of every weight: generating on rank 0 alone would wait for the others forever.
        skipped = "answers are not generated under ZeRO-3"
    elif prompts and distributed.is_main_process():
        tokens = spec.eval_max_new_tokens or 64
        was_training = model.training
        model.eval()
        with model.disable_adapter():
            base = [answer(model, tokenizer, p, tokens) for p in prompts]
        tuned = [answer(model, tokenizer, p, tokens) for p in prompts]
        model.train(was_training)
        samples = [
            {**{k: v for k, v in asdict(p).items() if k != "messages"}, "base": b, "adapter": a}
            for p, b, a in zip(prompts, base, tuned, strict=True)
        ]
    distributed.barrier()
    if not distributed.is_main_process() or (perplexity is None and not samples):
        return Evaluation(metrics, None)
    seconds = round(time.perf_counter() - started, 3)
    folder = ctx.work_dir / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "job_id": ctx.job_id,
        "base_model": spec.base_model,
        "max_new_tokens": spec.eval_max_new_tokens,
        "perplexity": perplexity,
        "samples": samples,
        "note": skipped,
        "seconds": seconds,
    }
    (folder / SAMPLES_FILE).write_text(json.dumps(document, indent=1, ensure_ascii=False))
    parts = []
    if perplexity is not None:
        parts.append(
            f"validation perplexity {perplexity['before']} before, {perplexity['after']} after "
            f"({perplexity['samples']} samples)"
        )
    if samples:
        parts.append(f"{len(samples)} prompts answered by the base model and by the adapter")
    if skipped:
        parts.append(skipped)
    ctx.reporter.event(
        "evaluation",
        "; ".join(parts) + f" in {seconds:.1f}s",
        data={"perplexity": perplexity, "samples": len(samples), "seconds": seconds},
    )
    metrics["evaluation_seconds"] = seconds
    return Evaluation(metrics, folder)
