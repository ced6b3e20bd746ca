"""Turns dataset records into token ids and labels, with the loss only where the format says it belongs:
assistant turns of `messages`, the `completion` of prompt/completion, every token of `text`; and preference
pairs into the prompt's tokens and the tokens of each answer (the chosen and the rejected one)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.datasets import PREFERENCE_FORMATS, DatasetFormat, PreferencePair, preference_pair
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


def _check_chat(tokenizer: Any, alternative: str) -> None:
    """Refuses chat data for a tokenizer that cannot render and mask it."""
    if not getattr(tokenizer, "chat_template", None):
        raise JobFailure(
            JobErrorCode.invalid_config,
            "the base model has no chat template, so `messages` datasets cannot be rendered; set the job's "
            f"chat_template (a name such as chatml or llama3, or your own Jinja), or use {alternative}",
        )
    if not getattr(tokenizer, "is_fast", False):
        raise JobFailure(
            JobErrorCode.invalid_model, "masking chat turns needs a fast tokenizer (tokenizer.json)"
        )


def encode_dataset(
    records: list[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any, max_seq_length: int
) -> EncodedDataset:
    """Encodes every record; counts the ones longer than `max_seq_length`."""
    if fmt in PREFERENCE_FORMATS:
        raise ValueError(f"{fmt.value} datasets hold preference pairs: encode them with encode_preferences")
    if fmt is DatasetFormat.messages:
        _check_chat(tokenizer, "the prompt/completion or text format")
    encode = ENCODERS[fmt]
    samples = [encode(record, tokenizer) for record in records]
    return EncodedDataset(
        samples=samples,
        truncated=sum(1 for s in samples if len(s.input_ids) > max_seq_length),
        total_tokens=sum(len(s.input_ids) for s in samples),
    )


# ---------------------------------------------------------------------------------------- preference pairs


@dataclass
class EncodedPair:
    """A preference pair as token ids: the prompt, then each answer (its end-of-turn or end-of-sequence token
    included). The trainer scores prompt + chosen against prompt + rejected."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def longest(self) -> int:
        """Tokens of the longer of the two sequences, prompt included."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def sequence(self, answer: str) -> EncodedSample:
        """prompt + chosen (answer "chosen") or prompt + rejected, with the answer's tokens as labels."""
        ids = self.chosen_ids if answer == "chosen" else self.rejected_ids
        return EncodedSample(self.prompt_ids + ids, [IGNORE] * len(self.prompt_ids) + ids)

    def cut(self, max_length: int) -> EncodedPair | None:
        """The pair with each sequence cut to `max_length` tokens (from the end, as trl's keep_start); None when
        the prompt alone fills them, leaving no answer token to compare."""
        room = max_length - len(self.prompt_ids)
        if room <= 0:
            return None
        return EncodedPair(self.prompt_ids, self.chosen_ids[:room], self.rejected_ids[:room])


@dataclass
class EncodedPreferences:
    pairs: list[EncodedPair]
    truncated: int  # pairs with a sequence longer than max_seq_length
    total_tokens: int  # prompt + chosen + rejected, before cutting

    def columns(self, max_length: int) -> dict[str, list[list[int]]]:
        """prompt_ids/chosen_ids/rejected_ids columns (trl's DPOTrainer takes them as they are), each pair cut to
        `max_length`, without the pairs whose prompt leaves no room for an answer."""
        kept = [cut for cut in (pair.cut(max_length) for pair in self.pairs) if cut is not None]
        return {
            "prompt_ids": [pair.prompt_ids for pair in kept],
            "chosen_ids": [pair.chosen_ids for pair in kept],
            "rejected_ids": [pair.rejected_ids for pair in kept],
        }


def _answer_span(tokenizer: Any, pair: PreferencePair, answer: str) -> tuple[list[int], int, int]:
    """The token ids of the context followed by `answer`, and where the answer's tokens start and end."""
    if pair.messages is not None:
        text, spans = assistant_spans(tokenizer, [*pair.messages, {"role": "assistant", "content": answer}])
        span_start, span_end = spans[-1]
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        inside = [
            index
            for index, (start, end) in enumerate(encoded["offset_mapping"])
            if start < span_end and end > span_start
        ]
        if not inside:
            return ids, len(ids), len(ids)
        return ids, inside[0], inside[-1] + 1
    assert pair.prompt is not None
    prompt_ids = list(tokenizer(pair.prompt)["input_ids"])
    ids = list(tokenizer(pair.prompt + answer)["input_ids"])
    if not ids or ids[-1] != _eos_id(tokenizer):
        ids.append(_eos_id(tokenizer))
    # Tokens can merge across the prompt/answer boundary; the answer starts where the two diverge.
    return ids, _common_prefix(prompt_ids, ids), len(ids)


def _encode_pair(record: dict[str, Any], fmt: DatasetFormat, tokenizer: Any) -> EncodedPair:
    pair = preference_pair(record, fmt)
    chosen, chosen_start, chosen_end = _answer_span(tokenizer, pair, pair.chosen)
    rejected, rejected_start, rejected_end = _answer_span(tokenizer, pair, pair.rejected)
    # One prompt for both sequences: up to where either answer starts (or the two first differ).
    prompt = min(chosen_start, rejected_start, _common_prefix(chosen, rejected))
    return EncodedPair(chosen[:prompt], chosen[prompt:chosen_end], rejected[prompt:rejected_end])


def encode_preferences(
    records: list[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any, max_seq_length: int
) -> EncodedPreferences:
    """Encodes every preference pair; counts those with a sequence longer than `max_seq_length`."""
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"{fmt.value} datasets hold no preference pairs")
    if any("messages" in record or "input" in record for record in records):
        _check_chat(tokenizer, "a text 'prompt' with 'chosen' and 'rejected'")
    pairs = [_encode_pair(record, fmt, tokenizer) for record in records]
    return EncodedPreferences(
        pairs=pairs,
        truncated=sum(1 for pair in pairs if pair.longest > max_seq_length),
        total_tokens=sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
    )
