"""Loss masks: only the tokens the format says the model should learn carry labels."""

import pytest

from shared.datasets import DatasetFormat
from worker.training.data import IGNORE, assistant_spans, encode_dataset
from worker.training.toy_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), ["What color is the sky? blue green red"] * 3)


def labelled_text(tokenizer, sample) -> str:
    pairs = zip(sample.input_ids, sample.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE])


def test_messages_train_only_on_assistant_turns(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "And grass?"},
            {"role": "assistant", "content": "green"},
        ]
    }
    encoded = encode_dataset([record], DatasetFormat.messages, tokenizer, max_seq_length=512)
    sample = encoded.samples[0]
    learned = labelled_text(tokenizer, sample)
    # Both answers, each with its end-of-turn marker (so the model learns to stop); no user or system text.
    assert learned.count("<|im_end|>") == 2
    assert "blue" in learned and "green" in learned
    assert "sky" not in learned and "Be brief" not in learned and "grass" not in learned
    # The labels are the input ids themselves where they are set.
    assert all(label in (IGNORE, token) for token, label in zip(sample.input_ids, sample.labels, strict=True))


def test_prompt_completion_trains_on_the_completion_and_eos(tokenizer):
    encoded = encode_dataset(
        [{"prompt": "What color is the sky? ", "completion": "blue"}],
        DatasetFormat.prompt_completion,
        tokenizer,
        max_seq_length=512,
    )
    sample = encoded.samples[0]
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    learned = labelled_text(tokenizer, sample)
    assert "blue" in learned and "sky" not in learned
    assert learned.endswith(tokenizer.eos_token)


def test_text_trains_on_everything(tokenizer):
    sample = encode_dataset([{"text": "red green"}], DatasetFormat.text, tokenizer, 512).samples[0]
    assert sample.labels == sample.input_ids
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_is_counted_and_fully_masked_samples_dropped(tokenizer):
    records = [
        {"prompt": "What color is the sky? " * 20, "completion": "blue"},
        {"prompt": "a ", "completion": "red"},
    ]
    encoded = encode_dataset(records, DatasetFormat.prompt_completion, tokenizer, max_seq_length=16)
    assert encoded.truncated == 1
    columns = encoded.columns(16)
    # The long sample's completion fell past the cut: nothing left to learn, so it is dropped.
    assert len(columns["input_ids"]) == 1
    assert all(len(ids) <= 16 for ids in columns["input_ids"])


def test_spans_cover_exactly_the_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text, spans = assistant_spans(tokenizer, messages)
    assert [text[a:b] for a, b in spans] == ["hello<|im_end|>\n"]
