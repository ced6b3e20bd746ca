"""The plan of a job made on a worker before it is queued: exact parameter counts from a model built on the
meta device (no weights are read), dataset statistics from the real tokenizer, the memory estimate and the
refusals of shared.planning. Only the config and the tokenizer are loaded, never the weights."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM

from shared.datasets import PREFERENCE_FORMATS, DatasetFormat, DatasetSummary
from shared.errors import JobErrorCode, JobFailure
from shared.planning import (
    LinearLayer,
    ModelConfigError,
    ModelShape,
    Note,
    Refusal,
    build_plan,
    estimate_memory,
    static_checks,
)
from shared.schemas import LORA_METHODS, JobSpec
from worker.training.adapters import load_tokenizer
from worker.training.data import IGNORE, EncodedSample, encode_dataset, encode_preferences
from worker.training.lora_config import lora_config

# How the rendered first sample marks the tokens that carry the loss.
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def model_shape(model_dir: Path) -> ModelShape:
    """The model's shape from its config (transformers fills in the architecture's defaults)."""
    try:
        config = AutoConfig.from_pretrained(model_dir).to_dict()
    except (OSError, ValueError) as exc:
        raise JobFailure(
            JobErrorCode.invalid_model, f"cannot read the base model's config.json: {exc}"
        ) from exc
    try:
        return ModelShape.from_config(config)
    except ModelConfigError as exc:
        raise JobFailure(JobErrorCode.invalid_model, str(exc)) from exc


def meta_peft_model(spec: JobSpec, model_dir: Path) -> PeftModel:
    """The job's adapter on its base model, built from the config on the meta device: every shape is real,
    no memory is allocated and no weight is read. QLoRA's 4-bit layers are built as the plain linear layers
    they quantize: peft counts a 4-bit parameter as the elements it stands for, so the counts agree."""
    if spec.method not in LORA_METHODS or spec.adapter is None:
        raise ValueError(f"method {spec.method.value} trains no new adapter")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return get_peft_model(model, lora_config(spec, model))


def count_parameters(spec: JobSpec, model_dir: Path) -> tuple[int, int]:
    """(trainable, total) parameters of the job's model, as peft counts them, without loading weights."""
    trainable, total = meta_peft_model(spec, model_dir).get_nb_trainable_parameters()
    return int(trainable), int(total)


def wrapped_layers(model: PeftModel) -> list[LinearLayer]:
    """The linear layers of one block that carry the adapter (by leaf name, first occurrence), with their
    real dimensions."""
    found: dict[str, LinearLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            leaf = name.rsplit(".", 1)[-1]
            base = module.get_base_layer()
            if leaf not in found and hasattr(base, "in_features"):
                found[leaf] = LinearLayer(leaf, int(base.in_features), int(base.out_features))
    return list(found.values())


# ---------------------------------------------------------------------------------------------- datasets


def _percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return int(sorted_values[rank - 1])


def render_sample(sample: EncodedSample, tokenizer: Any, max_seq_length: int) -> dict[str, Any]:
    """A sample as text with the tokens that carry the loss inside [[ ]], and as (text, trained) segments.
    Tokens past max_seq_length are cut off and counted."""
    ids, labels = sample.input_ids[:max_seq_length], sample.labels[:max_seq_length]
    segments: list[dict[str, Any]] = []
    run: list[int] = []
    trained_run = False
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE
        if run and trained != trained_run:
            segments.append(
                {"text": tokenizer.decode(run, clean_up_tokenization_spaces=False), "trained": trained_run}
            )
            run = []
        run.append(token)
        trained_run = trained
    if run:
        segments.append(
            {"text": tokenizer.decode(run, clean_up_tokenization_spaces=False), "trained": trained_run}
        )
    text = "".join(
        f"{TRAINED_OPEN}{seg['text']}{TRAINED_CLOSE}" if seg["trained"] else seg["text"] for seg in segments
    )
    cut = len(sample.input_ids) - len(ids)
    return {
        "text": text,
        "segments": segments,
        "tokens": len(ids),
        "trained_tokens": sum(1 for label in labels if label != IGNORE),
        "truncated_tokens": cut,
        "legend": f"text inside {TRAINED_OPEN} {TRAINED_CLOSE} carries the loss; the rest is context only",
    }


# The plan measures a dataset on at most this many samples, spread over it (a job's checks answer in a fraction
# of a second even for large datasets; every line's format is still checked): counts are then estimates.
PLAN_SAMPLES = 1000


def _spread(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first record (the plan renders it) and a random but repeatable choice of the others, in order
    (an even stride would follow any period in the data)."""
    if len(records) <= limit:
        return records
    chosen = sorted(random.Random(len(records)).sample(range(1, len(records)), limit - 1))
    return [records[0], *(records[i] for i in chosen)]


def dataset_report(
    records: list[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: Any,
    max_seq_length: int,
    sample_limit: int = PLAN_SAMPLES,
) -> dict[str, Any]:
    """Token statistics of a dataset as the recipe encodes it: lengths (total, mean, max, p95), how many
    samples max_seq_length cuts and how many lose every trained token to it, how many tokens carry the loss,
    and the first sample rendered with its loss mask. A dataset larger than `sample_limit` is measured on
    that many samples spread over it, and its counts scaled (`measured_samples` says so). Raises JobFailure
    where encoding would fail."""
    if fmt in PREFERENCE_FORMATS:
        return preference_report(records, fmt, tokenizer, max_seq_length, sample_limit)
    measured = _spread(records, sample_limit)
    scale = len(records) / len(measured) if measured else 1.0
    encoded = encode_dataset(measured, fmt, tokenizer, max_seq_length)
    lengths = sorted(len(s.input_ids) for s in encoded.samples)
    kept_lengths = [min(n, max_seq_length) for n in lengths]
    trained_within = [
        sum(1 for label in s.labels[:max_seq_length] if label != IGNORE) for s in encoded.samples
    ]
    trained_total = sum(s.trained_tokens for s in encoded.samples)
    count = len(encoded.samples)

    def scaled(value: int) -> int:
        return round(value * scale)

    return {
        "format": fmt.value,
        "samples": len(records),
        "measured_samples": count,
        "tokens": {
            "total": scaled(encoded.total_tokens),
            "mean": round(encoded.total_tokens / count, 2) if count else 0,
            "max": lengths[-1] if lengths else 0,
            "p95": _percentile(lengths, 0.95),
            "after_truncation": scaled(sum(kept_lengths)),
        },
        "max_seq_length": max_seq_length,
        "truncated_samples": scaled(encoded.truncated),
        "trained_tokens": scaled(sum(trained_within)),
        "trained_tokens_before_truncation": scaled(trained_total),
        "trained_token_share": round(sum(trained_within) / sum(kept_lengths), 4) if kept_lengths else 0,
        "samples_without_trained_tokens": scaled(sum(1 for n in trained_within if n == 0)),
        "longest_kept_sequence": max(kept_lengths, default=0),
        "first_sample": render_sample(encoded.samples[0], tokenizer, max_seq_length) if count else None,
    }


def preference_report(
    records: list[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: Any,
    max_seq_length: int,
    sample_limit: int = PLAN_SAMPLES,
) -> dict[str, Any]:
    """dataset_report for preference pairs: a sample is a pair, which the model sees as two sequences (prompt +
    chosen, prompt + rejected); lengths are those sequences', trained tokens the answers', and the first pair is
    rendered twice (`first_sample` with the chosen answer, `first_sample_rejected`)."""
    measured = _spread(records, sample_limit)
    scale = len(records) / len(measured) if measured else 1.0
    encoded = encode_preferences(measured, fmt, tokenizer, max_seq_length)
    sequences = [pair.sequence(answer) for pair in encoded.pairs for answer in ("chosen", "rejected")]
    lengths = sorted(len(seq.input_ids) for seq in sequences)
    kept = [pair.cut(max_seq_length) for pair in encoded.pairs]
    kept_lengths = [
        len(seq.input_ids)
        for pair in kept
        if pair
        for seq in (pair.sequence("chosen"), pair.sequence("rejected"))
    ]
    answers = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in encoded.pairs)
    answers_within = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in kept if pair)
    count = len(encoded.pairs)

    def scaled(value: int) -> int:
        return round(value * scale)

    first = encoded.pairs[0] if count else None
    return {
        "format": fmt.value,
        "samples": len(records),
        "measured_samples": count,
        "sequences_per_sample": 2,
        "tokens": {
            "total": scaled(encoded.total_tokens),
            "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0,
            "max": lengths[-1] if lengths else 0,
            "p95": _percentile(lengths, 0.95),
            "after_truncation": scaled(sum(kept_lengths)),
        },
        "max_seq_length": max_seq_length,
        "truncated_samples": scaled(encoded.truncated),
        "trained_tokens": scaled(answers_within),
        "trained_tokens_before_truncation": scaled(answers),
        "trained_token_share": round(answers_within / sum(kept_lengths), 4) if kept_lengths else 0,
        "samples_without_trained_tokens": scaled(sum(1 for pair in kept if pair is None)),
        "longest_kept_sequence": max(kept_lengths, default=0),
        "first_sample": render_sample(first.sequence("chosen"), tokenizer, max_seq_length) if first else None,
        "first_sample_rejected": (
            render_sample(first.sequence("rejected"), tokenizer, max_seq_length) if first else None
        ),
    }


def _dataset_checks(param: str, report: dict[str, Any], spec: JobSpec) -> tuple[list[Refusal], list[Note]]:
    hp = spec.hyperparameters
    assert hp is not None
    refusals: list[Refusal] = []
    notes: list[Note] = []
    lost = report["samples_without_trained_tokens"]
    if param == "dataset" and report["samples"] and lost == report["samples"]:
        # LoraRecipe.setup fails the job the same way.
        refusals.append(
            Refusal(
                "no_trained_tokens",
                "hyperparameters.max_seq_length",
                f"no sample of {param} has a token to learn within max_seq_length {hp.seq_length} (the "
                "trained part of every sample lies beyond it); raise max_seq_length",
            )
        )
    elif lost:
        notes.append(
            Note(
                "samples_dropped",
                f"{lost} of {report['samples']} samples of {param} have no trained token within max_seq_length "
                f"{hp.seq_length} and are left out",
                "hyperparameters.max_seq_length",
            )
        )
    if report["truncated_samples"]:
        notes.append(
            Note(
                "samples_truncated",
                f"{report['truncated_samples']} of {report['samples']} samples of {param} are longer than "
                f"max_seq_length {hp.seq_length} (longest {report['tokens']['max']} tokens) and are cut",
                "hyperparameters.max_seq_length",
            )
        )
    return refusals, notes


def _schedule(spec: JobSpec, train: dict[str, Any]) -> dict[str, Any]:
    """Optimizer steps the job will take, from the samples that keep a trained token (packing: from the
    tokens, as full rows of max_seq_length; an approximation of trl's best-fit packing)."""
    hp = spec.hyperparameters
    assert hp is not None
    gpus = spec.resources.gpus
    kept = train["samples"] - train["samples_without_trained_tokens"]
    rows = math.ceil(train["tokens"]["after_truncation"] / hp.seq_length) if hp.packing else kept
    micro_batches = math.ceil(rows / (hp.batch_size * gpus)) if rows else 0
    steps_per_epoch = math.ceil(micro_batches / hp.gradient_accumulation_steps) if micro_batches else 0
    total = hp.max_steps if hp.max_steps is not None else steps_per_epoch * (hp.epochs or 1)
    return {
        "sequences_per_epoch": rows,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "effective_batch_size": hp.batch_size * hp.gradient_accumulation_steps * gpus,
    }


def make_plan(
    spec: JobSpec,
    model_dir: Path,
    train_data: DatasetSummary | None,
    eval_data: DatasetSummary | None = None,
    *,
    gpu_memory_bytes: int | None = None,
) -> dict[str, Any]:
    """The plan of a job: model shape, parameter counts, dataset statistics with the first sample rendered,
    the per-GPU memory estimate, refusals and notes (see shared.planning.build_plan). Reads the config and the
    tokenizer, never the weights. Raises JobFailure when the model itself cannot be read."""
    shape = model_shape(model_dir)
    refusals: list[Refusal] = []
    notes: list[Note] = []
    params: dict[str, int] | None = None
    layers: list[LinearLayer] | None = None
    if spec.method in LORA_METHODS and spec.adapter is not None:
        try:
            model = meta_peft_model(spec, model_dir)
        except JobFailure as failure:  # target_modules the model lacks
            refusals.append(Refusal("unknown_target_modules", "adapter.target_modules", failure.message))
        else:
            trainable, total = model.get_nb_trainable_parameters()
            params = {"trainable": int(trainable), "total": int(total)}
            layers = wrapped_layers(model)
            del model
    spec_refusals, spec_notes = static_checks(spec, shape, layers)
    refusals += spec_refusals
    notes += spec_notes

    datasets: dict[str, dict[str, Any]] = {}
    hp = spec.hyperparameters
    if hp is not None:
        tokenizer = load_tokenizer(model_dir, spec.chat_template)
        for param, data in (("dataset", train_data), ("validation_dataset", eval_data)):
            if data is None:
                continue
            try:
                report = dataset_report(data.records, data.format, tokenizer, hp.seq_length)
            except JobFailure as failure:
                refusals.append(Refusal("dataset_unusable", param, failure.message))
                continue
            datasets[param] = report
            more_refusals, more_notes = _dataset_checks(param, report, spec)
            refusals += more_refusals
            notes += more_notes

    memory = None
    if params is not None:
        train = datasets.get("dataset")
        longest = train["longest_kept_sequence"] if train else None
        memory = estimate_memory(
            spec, shape, params["trainable"], params["total"], seq_length=longest or None
        )
    plan = build_plan(
        spec,
        shape,
        params=params,
        datasets=datasets,
        memory=memory,
        refusals=refusals,
        notes=notes,
        gpu_memory_bytes=gpu_memory_bytes,
    )
    if "dataset" in datasets and hp is not None:
        plan["schedule"] = _schedule(spec, datasets["dataset"])
    # Everything above is plain data; this fails loudly if that ever stops being true.
    json.dumps(plan)
    return plan
