"""Turns dataset records into token ids and labels, with the loss only where the format says it belongs:
assistant turns of `messages`, the `completion` of prompt/completion, every token of `text`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.datasets import DatasetFormat
from shared.errors import JobErrorCode, JobFailure

IGNORE = -100


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class EncodedDataset:
    samples: list[EncodedSample]
    truncated: int  # samples longer than max_seq_length (cut, unless packing)
    total_tokens: int

    def columns(self, max_length: int | None) -> dict[str, list[list[int]]]:
        """Returns input_ids/labels columns, cut to `max_length` when given, without fully masked samples."""
        ids, labels = [], []
        for sample in self.samples:
            sample_ids, sample_labels = sample.input_ids, sample.labels
            if max_length is not None:
                sample_ids, sample_labels = sample_ids[:max_length], sample_labels[:max_length]
            if any(label != IGNORE for label in sample_labels):
                ids.append(sample_ids)
                labels.append(sample_labels)
        return {"input_ids": ids, "labels": labels}


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise JobFailure(
            JobErrorCode.invalid_model, "the base model's tokenizer has no end-of-sequence token"
        )
    return int(tokenizer.eos_token_id)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_text(record: dict[str, Any], tokenizer: Any) -> EncodedSample:
    ids = list(tokenizer(record["text"])["input_ids"])
    if not ids or ids[-1] != _eos_id(tokenizer):
        ids.append(_eos_id(tokenizer))
    return EncodedSample(ids, list(ids))


def _encode_prompt_completion(record: dict[str, Any], tokenizer: Any) -> EncodedSample:
    prompt_ids = list(tokenizer(record["prompt"])["input_ids"])
    ids = list(tokenizer(record["prompt"] + record["completion"])["input_ids"])
    if not ids or ids[-1] != _eos_id(tokenizer):
        ids.append(_eos_id(tokenizer))
    # Tokens can merge across the prompt/completion boundary; the completion starts where the two diverge.
    start = _common_prefix(prompt_ids, ids)
    return EncodedSample(ids, [IGNORE] * start + ids[start:])


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation with the model's chat template and returns the text with the character spans
    of each assistant turn (its end-of-turn marker included, so the model learns to stop)."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise JobFailure(
                JobErrorCode.invalid_config,
                "the base model's chat template renders earlier turns differently once later turns follow, "
                "so assistant turns cannot be masked; use the prompt/completion format instead",
            )
        spans.append((len(before), len(through)))
    return text, spans


def _encode_messages(record: dict[str, Any], tokenizer: Any) -> EncodedSample:
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[index] = ids[index]
    return EncodedSample(ids, labels)


ENCODERS = {
    DatasetFormat.text: _encode_text,
    DatasetFormat.prompt_completion: _encode_prompt_completion,
    DatasetFormat.messages: _encode_messages,
}


def encode_dataset(
    records: list[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any, max_seq_length: int
) -> EncodedDataset:
    """Encodes every record; counts the ones longer than `max_seq_length`."""
    if fmt is DatasetFormat.messages and not getattr(tokenizer, "chat_template", None):
        raise JobFailure(
            JobErrorCode.invalid_config,
            "the base model has no chat template, so `messages` datasets cannot be rendered; set the job's "
            "chat_template (a name such as chatml or llama3, or your own Jinja), or use the prompt/completion or "
            "text format",
        )
    if fmt is DatasetFormat.messages and not getattr(tokenizer, "is_fast", False):
        raise JobFailure(
            JobErrorCode.invalid_model, "masking chat turns needs a fast tokenizer (tokenizer.json)"
        )
    encode = ENCODERS[fmt]
    samples = [encode(record, tokenizer) for record in records]
    return EncodedDataset(
        samples=samples,
        truncated=sum(1 for s in samples if len(s.input_ids) > max_seq_length),
        total_tokens=sum(len(s.input_ids) for s in samples),
    )
