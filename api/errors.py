"""Maps errors to JSON answers `{"error": {code, message, param}}`: 4xx naming the field, never a bare 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import DatabaseUnavailable, StoredDataDamaged, TuneforgeError, Unauthorized
from shared.storage import ObjectNotFound, StorageError

log = logging.getLogger(__name__)
# Seconds a client should wait before retrying while the database is away (a restart takes a few).
DATABASE_RETRY_AFTER = "2"


def _field_path(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic adds the union member tried (e.g. "list[...]" or "literal[...]"); it names no field.
    parts = [p for p in parts if not p.startswith(("list[", "literal[", "function-after["))]
    return ".".join(parts) or "body"


def _error(status: int, code: str, message: str, param: str | None, **extra: object) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, "param": param}, **extra}
    )


ErrorParts = tuple[int, str, str, str | None, dict[str, str]]


def describe(exc: Exception, request: Request) -> ErrorParts:
    """Status, code, message, param and headers for an error raised while serving `request`, logging what an
    operator must see. Both API surfaces word their answers from this (validation errors aside)."""
    if isinstance(exc, TuneforgeError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if isinstance(exc, DatabaseUnavailable):
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.__cause__)
            headers["Retry-After"] = DATABASE_RETRY_AFTER
        if isinstance(exc, StoredDataDamaged):
            log.error("refused to serve damaged stored bytes: %s", exc.message)
            headers["x-should-retry"] = "false"
        return exc.status_code, exc.code, exc.message, exc.param, headers
    if isinstance(exc, StarletteHTTPException) and isinstance(exc.__cause__, RecursionError):
        # FastAPI's "There was an error parsing the body": the JSON is nested deeper than the parser goes.
        message = "the JSON body is nested too deeply to read; arrays and objects may nest at most about 1,000 levels"
        return 400, "invalid_json", message, "body", {}
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # e.g. the `Allow` header a 405 must carry
        return exc.status_code, code, str(exc.detail), None, dict(exc.headers or {})
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        # A session's statement (the threadpool routes) found the database restarting, failing over,
        # unreachable, or every connection busy: the request can be sent again as is.
        unavailable = DatabaseUnavailable("the database is unavailable; try again shortly")
        unavailable.__cause__ = exc
        return describe(unavailable, request)
    if isinstance(exc, ObjectNotFound):
        log.error("object missing from storage: %s", exc)
        return 404, "object_missing", f"the stored object is missing: {exc}", None, {}
    if isinstance(exc, StorageError):
        log.error("object storage failed: %s", exc)
        return 503, "storage_unavailable", "object storage is unavailable; try again shortly", None, {}
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return 500, "internal_error", "internal error; the server log has the details", None, {}


def install_error_handlers(app: FastAPI) -> None:
    async def _native(request: Request, exc: Exception) -> JSONResponse:
        status, code, message, param, headers = describe(exc, request)
        details = getattr(exc, "details", None) if isinstance(exc, TuneforgeError) else None
        response = _error(status, code, message, param, **({"details": details} if details else {}))
        response.headers.update(headers)
        return response

    # The database's errors get a handler of their own: an answer through the catch-all Exception handler is
    # re-raised to the server after it is sent, which logs every 503 of an outage as a crash.
    for kind in (
        TuneforgeError,
        StarletteHTTPException,
        ObjectNotFound,
        StorageError,
        SQLAlchemyError,
        Exception,
    ):
        app.add_exception_handler(kind, _native)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [
            {"param": _field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            for e in errors
        ]
        first = details[0] if details else {"param": "body", "message": "invalid request"}
        message = "; ".join(f"{d['param']}: {d['message']}" for d in details[:5])
        return _error(422, "validation_error", message or first["message"], first["param"], details=details)
