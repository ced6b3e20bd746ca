"""Maps errors to JSON answers `{"error": {code, message, param}}`: 4xx naming the field, never a bare 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import TuneforgeError, Unauthorized
from shared.storage import ObjectNotFound, StorageError

log = logging.getLogger(__name__)


def _field_path(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic adds the union member tried (e.g. "list[...]" or "literal[...]"); it names no field.
    parts = [p for p in parts if not p.startswith(("list[", "literal[", "function-after["))]
    return ".".join(parts) or "body"


def _error(status: int, code: str, message: str, param: str | None, **extra: object) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, "param": param}, **extra}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneforgeError)
    async def _domain(_: Request, exc: TuneforgeError) -> JSONResponse:
        response = _error(exc.status_code, exc.code, exc.message, exc.param)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail), None)
        response.headers.update(exc.headers or {})  # e.g. the `Allow` header a 405 must carry
        return response

    @app.exception_handler(ObjectNotFound)
    async def _missing_object(_: Request, exc: ObjectNotFound) -> JSONResponse:
        log.error("object missing from storage: %s", exc)
        return _error(404, "object_missing", f"the stored object is missing: {exc}", None)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        log.error("object storage failed: %s", exc)
        return _error(503, "storage_unavailable", "object storage is unavailable; try again shortly", None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "internal error; the server log has the details", None)
