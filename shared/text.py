"""Text that can be stored and tokenized: no NUL characters (PostgreSQL refuses them in text and JSON) and no
unpaired surrogates (UTF-8 cannot encode them; tokenizers and the database refuse them)."""

from __future__ import annotations


def text_problem(value: str) -> str | None:
    """What makes `value` unstorable, or None."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode text"
    return None


def find_unstorable(value: object, where: str = "") -> tuple[str, str] | None:
    """The first place (a dotted path) in a JSON-like value where a key or a string is unstorable, with what
    is wrong there; None when all of it can be stored."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (where, problem) if problem else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        inner = f"{where}.{key}" if where else str(key)
        found = find_unstorable(key, inner) or find_unstorable(item, inner)
        if found:
            return found
    return None
