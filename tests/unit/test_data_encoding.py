"""Loss masks: only the tokens the format says the model should learn carry labels."""

import pytest

from shared.datasets import DatasetFormat
from worker.training.data import IGNORE, assistant_spans, encode_dataset, encode_preferences
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


# Preference pairs: the prompt's tokens once, then each answer's tokens (what the DPO loss compares).

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the sky?"},
]


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        (DatasetFormat.preference, {"messages": CONVERSATION, "chosen": "blue", "rejected": "green"}),
        (
            DatasetFormat.openai_preference,
            {
                "input": {"messages": CONVERSATION},
                "preferred_output": [{"role": "assistant", "content": "blue"}],
                "non_preferred_output": [{"role": "assistant", "content": "green"}],
            },
        ),
    ],
)
def test_a_chat_pair_splits_into_the_rendered_prompt_and_each_answer_turn(tokenizer, fmt, record):
    encoded = encode_preferences([record], fmt, tokenizer, max_seq_length=512)
    pair = encoded.pairs[0]
    full = tokenizer.apply_chat_template(
        [*CONVERSATION, {"role": "assistant", "content": "blue"}], tokenize=False
    )
    prompt = tokenizer.decode(pair.prompt_ids)
    # The prompt is the conversation up to the assistant's header; each answer is its turn as the chat template
    # renders it, end-of-turn marker included (as assistant turns are trained in messages datasets).
    assert full.startswith(prompt) and prompt.endswith("assistant\n") and "Be brief." in prompt
    assert full == prompt + tokenizer.decode(pair.chosen_ids)
    assert tokenizer.decode(pair.chosen_ids).startswith("blue<|im_end|>")
    assert tokenizer.decode(pair.rejected_ids).startswith("green<|im_end|>")
    assert encoded.truncated == 0
    assert encoded.total_tokens == len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    chosen = pair.sequence("chosen")
    assert chosen.input_ids == pair.prompt_ids + pair.chosen_ids
    assert labelled_text(tokenizer, chosen) == tokenizer.decode(pair.chosen_ids)


def test_a_text_pair_ends_each_answer_with_eos_and_is_cut_to_max_seq_length(tokenizer):
    record = {"prompt": "What color is the sky? ", "chosen": "blue", "rejected": "green red green"}
    encoded = encode_preferences([record], DatasetFormat.preference, tokenizer, max_seq_length=512)
    pair = encoded.pairs[0]
    assert tokenizer.decode(pair.prompt_ids).strip() == "What color is the sky?"
    assert tokenizer.decode(pair.chosen_ids).endswith("blue<|im_end|>")
    assert tokenizer.decode(pair.rejected_ids).endswith("green red green<|im_end|>")

    room = len(pair.prompt_ids) + 2
    short = encode_preferences([record], DatasetFormat.preference, tokenizer, max_seq_length=room)
    assert short.truncated == 1
    columns = short.columns(room)
    assert columns["prompt_ids"] == [pair.prompt_ids]
    assert columns["rejected_ids"] == [pair.rejected_ids[:2]] and columns["chosen_ids"] == [
        pair.chosen_ids[:2]
    ]
    # A prompt that fills max_seq_length leaves no answer to compare: the pair is left out.
    assert short.columns(len(pair.prompt_ids))["prompt_ids"] == []


def test_sft_and_preference_encoders_refuse_each_others_formats(tokenizer):
    with pytest.raises(ValueError, match="encode_preferences"):
        encode_dataset(
            [{"prompt": "p", "chosen": "a", "rejected": "b"}], DatasetFormat.preference, tokenizer, 64
        )
    with pytest.raises(ValueError, match="no preference pairs"):
        encode_preferences([{"text": "a"}], DatasetFormat.text, tokenizer, 64)
