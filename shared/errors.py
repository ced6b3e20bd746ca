"""Errors the domain raises; the API maps each to an HTTP status, the worker to a failed job."""

from __future__ import annotations

from enum import StrEnum


class TuneforgeError(Exception):
    """An error a caller can act on: a code, a message and, where one is to blame, the field."""

    status_code = 400
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        details: list[dict[str, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # One entry per problem, when there are several (e.g. a dataset's bad lines: line and message).
        self.details = details
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": self.param}


class InvalidRequest(TuneforgeError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(TuneforgeError):
    status_code = 401
    code = "unauthorized"


class TooManyRequests(TuneforgeError):
    status_code = 429
    code = "quota_exceeded"


class NotFound(TuneforgeError):
    status_code = 404
    code = "not_found"


class Conflict(TuneforgeError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(TuneforgeError):
    status_code = 413
    code = "payload_too_large"


class DatabaseUnavailable(TuneforgeError):
    """The database did not answer (restarting, failing over, unreachable, or every connection busy): the same
    request can be sent again shortly."""

    status_code = 503
    code = "database_unavailable"


class StoredDataDamaged(TuneforgeError):
    """Stored bytes no longer match the sha256 recorded when they were stored: they are never served. Retrying
    cannot help (answers carry `x-should-retry: false`)."""

    status_code = 500
    code = "artifact_corrupted"


class ServiceUnavailable(TuneforgeError):
    status_code = 503
    code = "service_unavailable"


class JobErrorCode(StrEnum):
    """Why a job failed; stored on the job with a message that says what to change."""

    invalid_dataset = "invalid_dataset"
    dataset_not_found = "dataset_not_found"
    invalid_model = "invalid_model"
    invalid_config = "invalid_config"
    out_of_memory = "out_of_memory"
    training_diverged = "training_diverged"
    storage_error = "storage_error"
    storage_unavailable = "storage_unavailable"
    timeout = "timeout"
    worker_lost = "worker_lost"
    internal_error = "internal_error"


class JobFailure(Exception):
    """Raised inside a worker to fail the job with a code and a message a user can act on."""

    def __init__(self, code: JobErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
