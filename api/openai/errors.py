"""Errors on the OpenAI-compatible surface, in OpenAI's shape {"error": {"message", "type", "param", "code"}},
naming OpenAI's fields; invalid requests are 400 there (the native API says 422)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from api.errors import describe
from shared.errors import TuneforgeError
from shared.services.idempotency import PARAM as IDEMPOTENCY_PARAM

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_SOURCES = ("body", "query", "path", "header", "form")
# Parts pydantic adds to an error's location for the union member it tried; they name no field.
_TYPE_TAGS = ("literal[", "constrained-", "function-", "list[", "dict[", "nullable[", "json-or-python[")
_PLAIN_TYPES = frozenset({"int", "float", "str", "bool", "none"})


def openai_error(
    status: int, code: str | None, message: str, param: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: Iterable[Any]) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p not in _SOURCES and not (isinstance(p, str) and (p.startswith(_TYPE_TAGS) or p in _PLAIN_TYPES))
    ]
    return ".".join(parts) or None


def first_error(errors: list[Any]) -> tuple[str | None, str, str]:
    """(param, message, pydantic type) of the most useful error: for `"auto" | number` fields, pydantic
    reports both members; the literal's complaint ("should be 'auto'") says less than the number's."""
    ranked = sorted(errors, key=lambda e: e.get("type") == "literal_error" and len(errors) > 1)
    first = ranked[0]
    return _param(first.get("loc", ())), first.get("msg", "invalid"), first.get("type", "")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    param, message, kind = first_error(errors) if errors else (None, "invalid request", "")
    if kind == "json_invalid":
        return openai_error(400, "invalid_json", "the request body is not valid JSON", None)
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(
        kind, "invalid_value"
    )
    return openai_error(400, code, f"{param}: {message}" if param else message, param)


def render_error(exc: Exception, request: Request) -> JSONResponse:
    """An error on this surface, in OpenAI's shape."""
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    status, code, message, param, headers = describe(exc, request)
    if isinstance(exc, TuneforgeError):
        status = 400 if status == 422 else status
        if status == 409 and exc.param != IDEMPOTENCY_PARAM:
            # A state conflict (cancelling a finished job) does not go away on retry; the client would
            # otherwise retry every 409. A busy Idempotency-Key does: the client may retry that.
            headers["x-should-retry"] = "false"
    return openai_error(status, code, message, param, headers)


class OpenAIRoute(APIRoute):
    """A route that answers its errors in OpenAI's shape; the native routes keep the app's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return render_error(exc, request)

        return route
