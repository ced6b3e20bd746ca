import json

import pytest

from shared.datasets import (
    DatasetFormat,
    DatasetInvalid,
    FileKind,
    PreferencePair,
    dataset_digest,
    file_kind,
    method_mismatch,
    preference_pair,
    read_dataset,
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


# Parquet, CSV and saved datasets: the same formats and checks, read through pyarrow and `datasets`.


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("rows", [[TEXT, TEXT], [PAIR, PAIR, PAIR], [CHAT, CHAT]])
def test_parquet_holds_each_format(tmp_path, rows):
    summary = read_dataset(write_parquet(tmp_path / "data.parquet", rows))
    assert summary.kind is FileKind.parquet
    assert summary.format is scan_jsonl(lines(*rows)).format
    assert summary.records == rows


def test_parquet_rows_are_checked_with_their_number_and_column(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", [PAIR, PAIR, {"prompt": "p", "completion": " "}, PAIR])
    with pytest.raises(DatasetInvalid) as info:
        read_dataset(path)
    assert str(info.value) == "row 3: 'completion' is empty: there would be nothing to learn"
    # A null cell is a missing column.
    path = write_parquet(tmp_path / "nulls.parquet", [PAIR, {"prompt": "p", "completion": None}])
    with pytest.raises(DatasetInvalid, match=r"^row 2: missing 'completion'"):
        read_dataset(path)


def test_csv_reads_every_cell_as_text_and_messages_as_json(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"What is 2+2?\n",4\n007,"a, b"\n')
    summary = read_dataset(path)
    assert summary.kind is FileKind.csv
    assert summary.records == [
        {"prompt": "What is 2+2?\n", "completion": "4"},
        {"prompt": "007", "completion": "a, b"},
    ]
    path.write_text(
        "messages\n" + "\n".join(['"' + json.dumps(CHAT["messages"]).replace('"', '""') + '"'] * 2)
    )
    assert read_dataset(path).records == [CHAT, CHAT]


def test_csv_rows_are_checked_with_their_number(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\na,b\n"two\nlines",c\nx,y,z\nd,\ne,f\n')
    with pytest.raises(DatasetInvalid) as info:
        read_dataset(path)
    assert [str(p) for p in info.value.problems] == [
        "row 3: 3 cells where the header has 2 columns",
        "row 4: 'completion' is empty: there would be nothing to learn",
    ]
    path.write_text('messages\n"[{""role"": ""user""}"\n')
    with pytest.raises(DatasetInvalid, match=r"^row 1: 'messages' is not a JSON array of messages"):
        read_dataset(path)


def test_a_file_that_is_not_what_its_name_says_is_refused(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b'{"text": "not parquet"}\n')
    with pytest.raises(DatasetInvalid, match="not a readable parquet file"):
        read_dataset(path)
    # Parquet is known by its bytes, whatever the name says.
    named_jsonl = write_parquet(tmp_path / "data.jsonl", [TEXT])
    assert file_kind(named_jsonl) is FileKind.parquet


def test_saved_datasets_and_their_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([PAIR, PAIR]).save_to_disk(tmp_path / "one")
    summary = read_dataset(tmp_path / "one")
    assert (summary.kind, summary.format, summary.num_samples) == (
        FileKind.saved,
        DatasetFormat.prompt_completion,
        2,
    )
    DatasetDict(
        {"train": Dataset.from_list([TEXT] * 3), "validation": Dataset.from_list([TEXT])}
    ).save_to_disk(tmp_path / "two")
    assert read_dataset(tmp_path / "two", split="train").num_samples == 3
    assert read_dataset(tmp_path / "two", split="validation").num_samples == 1
    with pytest.raises(DatasetInvalid, match="splits train, validation and none named 'test'"):
        read_dataset(tmp_path / "two", split="test")
    Dataset.from_list([TEXT, {"text": ""}]).save_to_disk(tmp_path / "bad")
    with pytest.raises(DatasetInvalid, match=r"^row 2: 'text' is empty"):
        read_dataset(tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetInvalid, match="the folder holds no dataset: neither what save_to_disk writes"):
        read_dataset(tmp_path / "plain")


def test_a_saved_dataset_digest_follows_its_files(tmp_path):
    from datasets import Dataset

    Dataset.from_list([TEXT]).save_to_disk(tmp_path / "saved")
    before = dataset_digest(tmp_path / "saved")
    assert dataset_digest(tmp_path / "saved") == before
    Dataset.from_list([TEXT, TEXT]).save_to_disk(tmp_path / "saved")
    assert dataset_digest(tmp_path / "saved") != before


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
