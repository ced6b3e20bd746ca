"""JSON answers for the reads clients poll, built from plain data: serialized once, in pydantic's own format
(UTC times with `Z`, NaN and infinities as null), with an ETag so that a client that sends it back in
If-None-Match gets a bodiless 304 while nothing changed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic_core import to_json, to_jsonable_python

# Every client revalidates (the answer changes as the job moves); only the client itself may keep a copy.
CACHE_CONTROL = "private, no-cache"


def _matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison (RFC 9110 13.1.2): W/"x" matches "x".
    return if_none_match.strip() == "*" or any(
        tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(",")
    )


def encode(content: Any) -> bytes:
    """`content` (dicts, lists, scalars, datetimes) as the response models would write it."""
    return to_json(content, inf_nan_mode="null")


def json_answer(request: Request, content: Any, status_code: int = 200) -> Response:
    """`content` as JSON with its ETag; 304 without a body when the request's If-None-Match names it."""
    return json_body_answer(request, encode(content), status_code)


def etag_of(body: bytes) -> str:
    """The ETag of an answer's body."""
    # SHA-256 (in hardware on most CPUs) hashes a page of jobs twice as fast as BLAKE2b; 128 bits of it.
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def json_body_answer(request: Request, body: bytes, status_code: int = 200) -> Response:
    """`body` (JSON already) with its ETag; 304 without a body when the request's If-None-Match names it."""
    return tagged_answer(request, body, etag_of(body), status_code)


def tagged_answer(request: Request, body: bytes, etag: str, status_code: int = 200) -> Response:
    """`body` (JSON already) with `etag` (etag_of(body), computed before); 304 without a body when the request's
    If-None-Match names it."""
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


class CreatedAnswer:
    """The 201 answer of a creating request, built once by `build` (plain data, as json_answer takes): the
    service stores it for Idempotency-Key retries (`answer(resource)`, JSON-ready), and the route sends it."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self.build = build
        self.body: Any = None

    def __call__(self, resource: Any) -> Any:
        self.body = to_jsonable_python(self.build(resource), inf_nan_mode="null")
        return self.body

    def response(self, resource: Any) -> Response:
        body = self.body if self.body is not None else self.build(resource)
        return Response(encode(body), status_code=201, media_type="application/json")
