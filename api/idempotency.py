"""The Idempotency-Key header on creating endpoints (the rules are in shared/services/idempotency.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Request
from fastapi.responses import JSONResponse

from shared.services.idempotency import IdempotentCall, Replay

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="retrying with the same key and body returns the first answer instead of a second resource",
    ),
]


def idempotent_call(
    request: Request, team_id: str, endpoint: str, key: str | None, fingerprint: str
) -> IdempotentCall:
    """The creating request as the idempotency service sees it."""
    return IdempotentCall(request.app.state.session_factory, team_id, endpoint, key, fingerprint)


def replayed(replay: Replay) -> JSONResponse:
    """The first request's answer, sent again."""
    return JSONResponse(replay.body, status_code=replay.status_code, headers={"Idempotent-Replayed": "true"})
