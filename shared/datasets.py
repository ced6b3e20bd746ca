"""Dataset formats and their line-by-line check (pure Python: the API runs it on uploads)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared.text import find_unstorable

MAX_PROBLEMS_REPORTED = 10
ROLES = ("system", "user", "assistant")


class DatasetFormat(StrEnum):
    messages = "messages"  # chat; loss on assistant turns
    prompt_completion = "prompt_completion"  # loss on the completion
    text = "text"  # plain language modelling


@dataclass(frozen=True)
class DatasetProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


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


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def detect_format(record: Any) -> DatasetFormat:
    """Returns the format a record is written in; raises ValueError saying what is missing."""
    if not isinstance(record, dict):
        raise ValueError(f"each line must be a JSON object, got {_type_name(record)}")
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
        raise ValueError("no 'messages', 'prompt'/'completion' or 'text' key")
    return present[0]


def check_record(record: dict[str, Any], fmt: DatasetFormat) -> None:
    """Raises ValueError with what is wrong if `record` is not a valid sample of `fmt`."""
    unstorable = find_unstorable(record)
    if unstorable is not None:
        where, problem = unstorable
        # Neither the tokenizer nor the database can take it; say where, so the line can be fixed.
        raise ValueError(f"'{where}' {problem}")
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
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    has_answer = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {_type_name(content)}")
        has_answer = has_answer or (role == "assistant" and bool(content.strip()))
    if not has_answer:
        raise ValueError("no non-empty assistant message: there would be nothing to learn")


def scan_jsonl(lines: Iterable[bytes | str], *, keep_records: bool = False) -> DatasetSummary:
    """Checks every line of a JSONL dataset; raises DatasetInvalid listing the first problems."""
    problems: list[DatasetProblem] = []
    total_problems = 0
    fmt: DatasetFormat | None = None
    samples = 0
    records: list[dict[str, Any]] = []
    line_no = 0
    for line_no, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            line_fmt = detect_format(record)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt is not fmt:
                raise ValueError(f"format {line_fmt} differs from the {fmt} format of the first sample")
            check_record(record, line_fmt)
        except (ValueError, UnicodeDecodeError) as exc:
            total_problems += 1
            if len(problems) < MAX_PROBLEMS_REPORTED:
                message = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                problems.append(DatasetProblem(line_no, message))
            continue
        samples += 1
        if keep_records:
            records.append(record)
    if problems:
        raise DatasetInvalid(problems, total_problems)
    if fmt is None:
        raise DatasetInvalid([DatasetProblem(max(line_no, 1), "the dataset has no samples")])
    return DatasetSummary(format=fmt, num_samples=samples, num_lines=line_no, records=records)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def read_dataset(path: Path) -> DatasetSummary:
    """Reads and checks a JSONL dataset file, returning its records."""
    return scan_jsonl(_lines(path), keep_records=True)
