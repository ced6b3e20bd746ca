"""The errors the SDK raises: every one is a TuneforgeError carrying the API's `code`, `message` and `param`."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["APIConnectionError", "ChecksumMismatch", "TuneforgeError"]


class TuneforgeError(Exception):
    """An error answer of the API (`{"error": {"code", "message", "param"}}`), or a client-side failure.

    `status_code` is the HTTP status (None when no answer came back), `code` the machine-readable reason,
    `param` the field to blame when there is one, `details` the per-field list of a validation error."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str = "error",
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param
        self.details = details or []

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        status = f"HTTP {self.status_code} " if self.status_code is not None else ""
        return f"{self.message}{where} ({status}{self.code})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code!r}, code={self.code!r}, "
            f"message={self.message!r}, param={self.param!r})"
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> TuneforgeError:
        """Builds the error from an answer's body; a body that is not the API's error shape is quoted."""
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            details = body.get("details") if isinstance(body.get("details"), list) else None
            return cls(
                str(error["message"]),
                status_code=response.status_code,
                code=str(error.get("code") or "error"),
                param=error.get("param"),
                details=details,
            )
        text = response.text.strip()[:500] or response.reason_phrase
        return cls(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: {text}",
            status_code=response.status_code,
            code="http_error",
        )


class APIConnectionError(TuneforgeError):
    """No answer came back (connection refused, reset, timed out), after the retries."""

    def __init__(self, message: str, *, code: str = "connection_error", **kwargs: Any) -> None:
        super().__init__(message, code=code, **kwargs)


class ChecksumMismatch(TuneforgeError):
    """A downloaded archive is not what the API recorded: a file's size or sha256 differs, a file is missing
    or extra, SHA256SUMS disagrees, or the tar itself is broken or unsafe."""

    def __init__(self, message: str, *, code: str = "checksum_mismatch", **kwargs: Any) -> None:
        super().__init__(message, code=code, **kwargs)
