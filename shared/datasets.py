"""Dataset files and their row-by-row check: JSONL (read line by line), Parquet and CSV (read through pyarrow;
the API runs these checks on uploads), and Hugging Face datasets saved to disk (read through `datasets`, on
workers only). Every file kind holds the same three sample formats."""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared.schemas import PREFERENCE_METHODS, Method
from shared.storage import sha256_file
from shared.text import find_unstorable

MAX_PROBLEMS_REPORTED = 10
ROLES = ("system", "user", "assistant")


class DatasetFormat(StrEnum):
    messages = "messages"  # chat; loss on assistant turns
    prompt_completion = "prompt_completion"  # loss on the completion
    text = "text"  # plain language modelling
    preference = "preference"  # a prompt (or messages) with a chosen and a rejected answer
    openai_preference = "openai_preference"  # OpenAI's: input, preferred_output, non_preferred_output


# The formats that hold preference pairs, which only preference methods (dpo) train on, and only on them.
PREFERENCE_FORMATS = frozenset({DatasetFormat.preference, DatasetFormat.openai_preference})
OPENAI_PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


class FileKind(StrEnum):
    """How a dataset file is written."""

    jsonl = "jsonl"
    parquet = "parquet"
    csv = "csv"
    saved = "saved"  # a Hugging Face dataset saved to disk (save_to_disk): a folder of Arrow files
    repo = "repo"  # a dataset repository's folder (from the Hub): data files, split by their names


# File name endings of each kind that can be uploaded (anything else is read as JSONL).
SUFFIXES = {".parquet": FileKind.parquet, ".pq": FileKind.parquet, ".csv": FileKind.csv}
PARQUET_MAGIC = b"PAR1"
# What save_to_disk writes: a Dataset (state.json) or a DatasetDict (dataset_dict.json) folder.
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# The data files a dataset repository's folder is read from.
REPO_DATA = (".parquet", ".jsonl", ".csv", ".json", ".arrow")
ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class DatasetProblem:
    line: int
    message: str
    unit: str = "line"  # "row" in Parquet, CSV and saved datasets

    def __str__(self) -> str:
        # Line 0: the file as a whole.
        return f"{self.unit} {self.line}: {self.message}" if self.line else self.message


class DatasetInvalid(Exception):
    """A dataset with lines that cannot be trained on; carries the first problems with their line numbers."""

    def __init__(self, problems: list[DatasetProblem], total: int | None = None) -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        shown = "; ".join(str(p) for p in problems)
        more = f" (and {self.total - len(problems)} more)" if self.total > len(problems) else ""
        super().__init__(f"{shown}{more}")


@dataclass
class DatasetSummary:
    format: DatasetFormat
    num_samples: int
    num_lines: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    kind: FileKind = FileKind.jsonl


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


@dataclass(frozen=True)
class PreferencePair:
    """A preference sample in one shape, whatever format it was written in: the context (a text prompt, or a
    conversation ending with a user turn) and the two answers to it, the chosen one first."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    chosen: str
    rejected: str


def _preference_format(record: dict[str, Any]) -> DatasetFormat | None:
    """The preference format a record is written in, or None when it has none of their keys; raises ValueError
    naming the key a preference record lacks."""
    openai_keys = [k for k in OPENAI_PREFERENCE_KEYS if k in record]
    native_keys = [k for k in ("chosen", "rejected") if k in record]
    if openai_keys and native_keys:
        raise ValueError(
            "ambiguous record: it has the keys of both preference formats (chosen/rejected and "
            "input/preferred_output/non_preferred_output)"
        )
    if openai_keys:
        missing = [k for k in OPENAI_PREFERENCE_KEYS if k not in record]
        if missing:
            raise ValueError(
                f"missing '{missing[0]}' (OpenAI's preference format needs input, preferred_output and "
                "non_preferred_output)"
            )
        return DatasetFormat.openai_preference
    if not native_keys:
        return None
    if len(native_keys) == 1:
        other = "rejected" if native_keys[0] == "chosen" else "chosen"
        raise ValueError(f"missing '{other}' (a preference pair needs both 'chosen' and 'rejected')")
    contexts = [k for k in ("prompt", "messages") if k in record]
    if not contexts:
        raise ValueError("missing 'prompt' (or 'messages'): a preference pair needs the context it answers")
    if len(contexts) > 1:
        raise ValueError("ambiguous record: give the context as 'prompt' or as 'messages', not both")
    for key in ("completion", "text"):
        if key in record:
            raise ValueError(f"ambiguous record: '{key}' has no place in a preference pair (chosen/rejected)")
    return DatasetFormat.preference


def detect_format(record: Any) -> DatasetFormat:
    """Returns the format a record is written in; raises ValueError saying what is missing."""
    if not isinstance(record, dict):
        raise ValueError(f"each line must be a JSON object, got {_type_name(record)}")
    preference = _preference_format(record)
    if preference is not None:
        return preference
    present = [
        fmt
        for fmt, keys in (
            (DatasetFormat.messages, ("messages",)),
            (DatasetFormat.prompt_completion, ("prompt", "completion")),
            (DatasetFormat.text, ("text",)),
        )
        if all(k in record for k in keys)
    ]
    if len(present) > 1:
        raise ValueError(f"ambiguous record: it has the keys of several formats ({', '.join(present)})")
    if not present:
        if "prompt" in record or "completion" in record:
            missing = "completion" if "prompt" in record else "prompt"
            raise ValueError(f"missing '{missing}' (a prompt/completion record needs both)")
        raise ValueError(
            "no 'messages', 'prompt'/'completion', 'text', 'chosen'/'rejected' or "
            "'input'/'preferred_output'/'non_preferred_output' key"
        )
    return present[0]


def _check_messages(messages: Any, where: str) -> None:
    """Raises ValueError naming the message at fault if `messages` is not a non-empty list of role/content
    objects."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{where}' must be a non-empty array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}[{i}] must be an object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got {_type_name(content)}")


def _answer(value: Any, where: str, *, messages_only: bool) -> str:
    """One answer of a preference pair as text: a string, or an array of one assistant message (always for
    OpenAI's format). Raises ValueError naming the field."""
    if isinstance(value, str) and not messages_only:
        text = value
    elif isinstance(value, list):
        _check_messages(value, where)
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise ValueError(f"'{where}' must hold exactly one assistant message")
        text = value[0]["content"]
    else:
        expected = "an array of one assistant message"
        expected = expected if messages_only else f"a string or {expected}"
        raise ValueError(f"'{where}' must be {expected}, got {_type_name(value)}")
    if not text.strip():
        raise ValueError(f"'{where}' is empty: there would be no answer to compare")
    return text


def _context(messages: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    _check_messages(messages, where)
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"'{where}' must end with a user message: the chosen and rejected answers are the assistant's "
            f"reply to it (the last one is {messages[-1]['role']!r})"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def preference_pair(record: dict[str, Any], fmt: DatasetFormat) -> PreferencePair:
    """A record of a preference format as a PreferencePair; raises ValueError naming the field at fault."""
    if fmt is DatasetFormat.openai_preference:
        source = record["input"]
        if not isinstance(source, dict):
            raise ValueError(f"'input' must be an object with 'messages', got {_type_name(source)}")
        if "messages" not in source:
            raise ValueError("'input' has no 'messages'")
        if source.get("tools"):
            raise ValueError("'input.tools': tool definitions are not supported; remove them")
        messages = _context(source["messages"], "input.messages")
        chosen = _answer(record["preferred_output"], "preferred_output", messages_only=True)
        rejected = _answer(record["non_preferred_output"], "non_preferred_output", messages_only=True)
        prompt = None
        chosen_key, rejected_key = "preferred_output", "non_preferred_output"
    else:
        prompt, messages = record.get("prompt"), None
        if "messages" in record:
            messages = _context(record["messages"], "messages")
        elif not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {_type_name(prompt)}")
        elif not prompt.strip():
            raise ValueError("'prompt' is empty: a preference pair needs the context it answers")
        chosen = _answer(record["chosen"], "chosen", messages_only=False)
        rejected = _answer(record["rejected"], "rejected", messages_only=False)
        chosen_key, rejected_key = "chosen", "rejected"
    if chosen == rejected:
        raise ValueError(f"'{chosen_key}' and '{rejected_key}' are the same answer: the pair teaches nothing")
    return PreferencePair(prompt=prompt, messages=messages, chosen=chosen, rejected=rejected)


def method_mismatch(method: Method, fmt: DatasetFormat) -> str | None:
    """Why a dataset of format `fmt` cannot train a job of `method`, or None when it can."""
    if method in PREFERENCE_METHODS and fmt not in PREFERENCE_FORMATS:
        return (
            f"method {method.value} learns from preference pairs, and this dataset is in the {fmt.value} format; "
            "give each line a 'prompt' (or 'messages') with 'chosen' and 'rejected', or OpenAI's 'input', "
            "'preferred_output' and 'non_preferred_output'"
        )
    if method not in PREFERENCE_METHODS and fmt in PREFERENCE_FORMATS:
        return (
            f"this dataset holds preference pairs ({fmt.value} format), which method {method.value} cannot "
            "train on; use method dpo, or a messages, prompt/completion or text dataset"
        )
    return None


def check_record(record: dict[str, Any], fmt: DatasetFormat) -> None:
    """Raises ValueError with what is wrong if `record` is not a valid sample of `fmt`."""
    unstorable = find_unstorable(record)
    if unstorable is not None:
        where, problem = unstorable
        # Neither the tokenizer nor the database can take it; say where, so the line can be fixed.
        raise ValueError(f"'{where}' {problem}")
    if fmt in PREFERENCE_FORMATS:
        preference_pair(record, fmt)
        return
    if fmt is DatasetFormat.text:
        if not isinstance(record["text"], str):
            raise ValueError(f"'text' must be a string, got {_type_name(record['text'])}")
        if not record["text"].strip():
            raise ValueError("'text' is empty")
        return
    if fmt is DatasetFormat.prompt_completion:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(f"'{key}' must be a string, got {_type_name(record[key])}")
        if not record["completion"].strip():
            raise ValueError("'completion' is empty: there would be nothing to learn")
        return
    messages = record["messages"]
    _check_messages(messages, "messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no non-empty assistant message: there would be nothing to learn")


def _check_rows(
    rows: Iterable[tuple[int, Any]], *, unit: str, keep_records: bool, kind: FileKind
) -> DatasetSummary:
    """Checks numbered records (or the ValueError that reading one raised); raises DatasetInvalid listing the
    first problems by `unit` ("line" or "row") and number."""
    problems: list[DatasetProblem] = []
    total_problems = 0
    fmt: DatasetFormat | None = None
    samples = 0
    records: list[dict[str, Any]] = []
    number = 0
    for number, record in rows:
        try:
            if isinstance(record, ValueError):
                raise record
            line_fmt = detect_format(record)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt is not fmt:
                raise ValueError(f"format {line_fmt} differs from the {fmt} format of the first sample")
            check_record(record, line_fmt)
        except ValueError as exc:
            total_problems += 1
            if len(problems) < MAX_PROBLEMS_REPORTED:
                message = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                problems.append(DatasetProblem(number, message, unit))
            continue
        samples += 1
        if keep_records:
            records.append(record)
    if problems:
        raise DatasetInvalid(problems, total_problems)
    if fmt is None:
        raise DatasetInvalid([DatasetProblem(max(number, 1), "the dataset has no samples", unit)])
    return DatasetSummary(format=fmt, num_samples=samples, num_lines=number, records=records, kind=kind)


def _json_lines(lines: Iterable[bytes | str]) -> Iterator[tuple[int, Any]]:
    for line_no, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            yield line_no, ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text)
        except ValueError as exc:
            yield line_no, exc


def scan_jsonl(lines: Iterable[bytes | str], *, keep_records: bool = False) -> DatasetSummary:
    """Checks every line of a JSONL dataset; raises DatasetInvalid listing the first problems."""
    return _check_rows(_json_lines(lines), unit="line", keep_records=keep_records, kind=FileKind.jsonl)


def _row_record(row: dict[str, Any]) -> dict[str, Any] | ValueError:
    """A table row as a record: null cells are absent columns, and a `messages` cell written as JSON text (as
    CSV must) is parsed."""
    record = {column: value for column, value in row.items() if value is not None}
    messages = record.get("messages")
    if isinstance(messages, str):
        try:
            record["messages"] = json.loads(messages)
        except ValueError as exc:
            return ValueError(f"'messages' is not a JSON array of messages ({exc})")
    return record


def _numbered(batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield number, _row_record(row)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    yield from _numbered(pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH))


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    from pyarrow import csv

    # Every cell is text, as written: no column turns into numbers or dates by inference.
    # The header's names (rows with the wrong number of cells are skipped here, and reported below).
    names = csv.open_csv(
        path, parse_options=csv.ParseOptions(invalid_row_handler=lambda row: "skip")
    ).schema.names
    bad: deque[tuple[int, ValueError]] = deque()

    def skip_bad_row(row: Any) -> str:
        # pyarrow counts the header as row 1: data rows are numbered from 1 here, as in the other kinds.
        cells = f"{row.actual_columns} cells where the header has {row.expected_columns} columns"
        bad.append((row.number - 1, ValueError(cells)))
        return "skip"

    reader = csv.open_csv(
        path,
        # One thread: the rows the handler skips are numbered, and come before the batch that follows them.
        read_options=csv.ReadOptions(use_threads=False),
        parse_options=csv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip_bad_row),
        convert_options=csv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    number = 0
    for batch in reader:
        for row in batch.to_pylist():
            number += 1
            while bad and bad[0][0] == number:
                yield bad.popleft()
                number += 1
            yield number, _row_record(row)
    yield from bad


def _saved_rows(path: Path, split: str | None, kind: FileKind) -> Iterator[tuple[int, Any]]:
    from datasets import Dataset, load_dataset, load_from_disk

    # A repository's files are split by their names (train, validation, test…) as the Hub's dataset viewer does.
    loaded = load_from_disk(str(path)) if kind is FileKind.saved else load_dataset(str(path))
    if not isinstance(loaded, Dataset):
        splits = list(loaded)
        if split not in loaded:
            if len(splits) != 1:
                raise DatasetInvalid(
                    [
                        DatasetProblem(
                            0,
                            f"the saved dataset has splits {', '.join(splits)} and none named {split!r}",
                            "row",
                        )
                    ]
                )
            split = splits[0]
        loaded = loaded[split]
    yield from _numbered(loaded.data.to_batches(max_chunksize=ROWS_PER_BATCH))


def file_kind(path: Path, name: str | None = None) -> FileKind:
    """The kind of a dataset file: a saved dataset's folder, Parquet (by its magic bytes or name), CSV (by its
    name), or else JSONL."""
    if path.is_dir():
        return FileKind.saved if any((path / m).is_file() for m in SAVED_MARKERS) else FileKind.repo
    with path.open("rb") as handle:
        if handle.read(4) == PARQUET_MAGIC:
            return FileKind.parquet
    return SUFFIXES.get(Path(name or path.name).suffix.lower(), FileKind.jsonl)


def kind_of_name(name: str) -> FileKind:
    """The kind a file name says (what an upload's size limit is chosen by, before its bytes arrive)."""
    return SUFFIXES.get(Path(name).suffix.lower(), FileKind.jsonl)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def scan_file(
    path: Path, *, kind: FileKind | None = None, keep_records: bool = False, split: str | None = None
) -> DatasetSummary:
    """Checks every sample of a dataset file (or saved dataset folder); raises DatasetInvalid naming the first
    bad lines or rows. `split` picks a split of a saved DatasetDict."""
    kind = kind or file_kind(path)
    if kind is FileKind.jsonl:
        return scan_jsonl(_lines(path), keep_records=keep_records)
    if kind is FileKind.saved and not any((path / marker).is_file() for marker in SAVED_MARKERS):
        raise DatasetInvalid(
            [DatasetProblem(0, "the folder is not a dataset saved with save_to_disk (no state.json)", "row")]
        )
    if kind is FileKind.repo and not any(p.suffix in REPO_DATA for p in path.rglob("*")):
        raise DatasetInvalid(
            [
                DatasetProblem(
                    0,
                    "the folder holds no dataset: neither what save_to_disk writes (state.json) nor data files "
                    f"({', '.join(REPO_DATA)})",
                )
            ]
        )
    if kind in (FileKind.saved, FileKind.repo):
        rows = _saved_rows(path, split, kind)
    else:
        rows = _parquet_rows(path) if kind is FileKind.parquet else _csv_rows(path)
    try:
        return _check_rows(rows, unit="row", keep_records=keep_records, kind=kind)
    except DatasetInvalid:
        raise
    except Exception as exc:  # pyarrow's own errors: a file that is not what its name says
        if type(exc).__module__.split(".")[0] not in ("pyarrow", "datasets"):
            raise
        raise DatasetInvalid([DatasetProblem(0, f"not a readable {kind} file ({exc})", "row")]) from exc


def read_dataset(path: Path, split: str | None = None) -> DatasetSummary:
    """Reads and checks a dataset file of any kind, returning its records."""
    return scan_file(path, keep_records=True, split=split)


def dataset_digest(path: Path) -> str:
    """The sha256 of a dataset file, or of a saved dataset folder (its files' names and sha256, in order)."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_file(item)}\n".encode())
    return digest.hexdigest()
