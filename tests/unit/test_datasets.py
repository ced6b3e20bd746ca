import json

import pytest

from shared.datasets import DatasetFormat, DatasetInvalid, scan_jsonl


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
        (TEXT, {"other": 1}, "no 'messages', 'prompt'/'completion' or 'text' key"),
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
