import json

import pytest

from shared.datasets import (
    DatasetFormat,
    DatasetInvalid,
    PreferencePair,
    method_mismatch,
    preference_pair,
    scan_jsonl,
)
from shared.schemas import Method


def lines(*rows):
    return [(json.dumps(r) if not isinstance(r, str) else r).encode() + b"\n" for r in rows]


def test_formats_are_detected():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert scan_jsonl(lines(chat, chat)).format is DatasetFormat.messages
    assert scan_jsonl(lines({"prompt": "a", "completion": "b"})).format is DatasetFormat.prompt_completion
    summary = scan_jsonl(lines({"text": "abc"}, "", {"text": "def"}))
    assert summary.format is DatasetFormat.text
    assert summary.num_samples == 2
    assert summary.num_lines == 3


TEXT = {"text": "fine"}
PAIR = {"prompt": "p", "completion": "c"}
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    ("good", "row", "message"),
    [
        (TEXT, "{not json", "invalid JSON"),
        (TEXT, [1, 2], "must be a JSON object, got array"),
        (PAIR, {"prompt": "only a prompt"}, "missing 'completion'"),
        (PAIR, {"prompt": "p", "completion": 5}, "'completion' must be a string, got number"),
        (PAIR, {"prompt": "p", "completion": "  "}, "'completion' is empty"),
        (TEXT, {"text": ""}, "'text' is empty"),
        (CHAT, {"messages": []}, "non-empty array"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "no non-empty assistant message"),
        (CHAT, {"messages": [{"role": "assistant", "content": None}]}, "content must be a string"),
        (TEXT, {"other": 1}, "no 'messages', 'prompt'/'completion', 'text', 'chosen'/'rejected' or"),
        (TEXT, {"text": "a", "messages": []}, "ambiguous"),
    ],
)
def test_bad_lines_are_reported_with_their_number(good, row, message):
    with pytest.raises(DatasetInvalid) as info:
        scan_jsonl(lines(good, good, row, good))
    problem = info.value.problems[0]
    assert problem.line == 3
    assert message in problem.message
    assert str(info.value).startswith("line 3:")


def test_mixed_formats_are_refused_at_the_odd_line():
    with pytest.raises(DatasetInvalid) as info:
        scan_jsonl(lines({"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}))
    assert info.value.problems[0].line == 3
    assert "differs from the text format" in info.value.problems[0].message


def test_problem_count_is_capped_but_total_reported():
    with pytest.raises(DatasetInvalid) as info:
        scan_jsonl([b"nope\n"] * 25)
    assert len(info.value.problems) == 10
    assert info.value.total == 25
    assert "(and 15 more)" in str(info.value)


def test_empty_dataset_is_refused():
    with pytest.raises(DatasetInvalid, match="no samples"):
        scan_jsonl([b"\n", b"  \n"])


# Preference pairs (method dpo): a prompt or messages with chosen/rejected, or OpenAI's preference format.

PREF = {"prompt": "What color is snow? ", "chosen": "white", "rejected": "green"}
PREF_CHAT = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Snow?"}],
    "chosen": [{"role": "assistant", "content": "white"}],
    "rejected": "green",
}
OPENAI_PREF = {
    "input": {"messages": [{"role": "user", "content": "Snow?"}], "tools": [], "parallel_tool_calls": True},
    "preferred_output": [{"role": "assistant", "content": "white"}],
    "non_preferred_output": [{"role": "assistant", "content": "green"}],
}


def test_preference_formats_are_detected_and_read_as_pairs():
    assert scan_jsonl(lines(PREF, PREF_CHAT)).format is DatasetFormat.preference
    assert scan_jsonl(lines(OPENAI_PREF, OPENAI_PREF)).format is DatasetFormat.openai_preference
    assert preference_pair(PREF, DatasetFormat.preference) == PreferencePair(
        prompt="What color is snow? ", messages=None, chosen="white", rejected="green"
    )
    chat = preference_pair(PREF_CHAT, DatasetFormat.preference)
    assert (chat.prompt, chat.messages[-1], chat.chosen, chat.rejected) == (
        None,
        {"role": "user", "content": "Snow?"},
        "white",
        "green",
    )
    ours = preference_pair(OPENAI_PREF, DatasetFormat.openai_preference)
    assert (ours.messages, ours.chosen, ours.rejected) == (
        [{"role": "user", "content": "Snow?"}],
        "white",
        "green",
    )


def answer(content):
    return [{"role": "assistant", "content": content}]


@pytest.mark.parametrize(
    ("good", "row", "message"),
    [
        (PREF, {"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
        (PREF, {"chosen": "a", "rejected": "b"}, "missing 'prompt' (or 'messages')"),
        (
            PREF,
            {"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"},
            "'completion' has no place",
        ),
        (PREF, {**PREF, "messages": PREF_CHAT["messages"]}, "not both"),
        (PREF, {"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string, got number"),
        (PREF, {"prompt": " ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        (PREF, {"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        (PREF, {"prompt": "p", "chosen": "a", "rejected": 7}, "'rejected' must be a string or an array"),
        (PREF, {"prompt": "p", "chosen": "same", "rejected": "same"}, "the same answer"),
        (PREF, {"prompt": "p", "chosen": answer("a") * 2, "rejected": "b"}, "exactly one assistant message"),
        (
            PREF_CHAT,
            {
                **PREF_CHAT,
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            },
            "'messages' must end with a user message",
        ),
        (PREF_CHAT, {**PREF_CHAT, "messages": [{"role": "robot", "content": "q"}]}, "messages[0].role"),
        (
            OPENAI_PREF,
            {"input": OPENAI_PREF["input"], "preferred_output": answer("a")},
            "missing 'non_preferred",
        ),
        (OPENAI_PREF, {**OPENAI_PREF, "input": "Snow?"}, "'input' must be an object"),
        (OPENAI_PREF, {**OPENAI_PREF, "input": {"tools": []}}, "'input' has no 'messages'"),
        (
            OPENAI_PREF,
            {**OPENAI_PREF, "input": {"messages": [{"role": "user", "content": 1}]}},
            "input.messages[0].content must be a string",
        ),
        (
            OPENAI_PREF,
            {**OPENAI_PREF, "input": {**OPENAI_PREF["input"], "tools": [{"type": "function"}]}},
            "'input.tools'",
        ),
        (OPENAI_PREF, {**OPENAI_PREF, "preferred_output": "white"}, "'preferred_output' must be an array"),
        (
            OPENAI_PREF,
            {**OPENAI_PREF, "non_preferred_output": [{"role": "user", "content": "x"}]},
            "'non_preferred_output' must hold exactly one assistant message",
        ),
        (OPENAI_PREF, {**OPENAI_PREF, "non_preferred_output": answer("white")}, "the same answer"),
        (OPENAI_PREF, {**OPENAI_PREF, "chosen": "a"}, "both preference formats"),
        (PREF, OPENAI_PREF, "differs from the preference format"),
        (PREF, {"prompt": "p", "completion": "c"}, "differs from the preference format"),
    ],
)
def test_bad_preference_lines_are_reported_with_their_number_and_field(good, row, message):
    with pytest.raises(DatasetInvalid) as info:
        scan_jsonl(lines(good, good, row, good))
    problem = info.value.problems[0]
    assert problem.line == 3
    assert message in problem.message, problem.message


def test_preference_datasets_train_only_preference_methods():
    assert method_mismatch(Method.dpo, DatasetFormat.preference) is None
    assert method_mismatch(Method.dpo, DatasetFormat.openai_preference) is None
    assert method_mismatch(Method.lora, DatasetFormat.messages) is None
    assert "learns from preference pairs" in method_mismatch(Method.dpo, DatasetFormat.messages)
    for method in (Method.lora, Method.qlora, Method.fusion):
        assert "use method dpo" in method_mismatch(method, DatasetFormat.preference)
