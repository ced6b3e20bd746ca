"""The Idempotency-Key header on creating endpoints (see shared/services/idempotency.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from shared.services import idempotency

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="retrying with the same key and body returns the first answer instead of a second resource",
    ),
]


class IdempotentRequest:
    """One creating request, with or without an Idempotency-Key."""

    def __init__(
        self, request: Request, team_id: str, endpoint: str, key: str | None, fingerprint: str
    ) -> None:
        self.factory = request.app.state.session_factory
        self.team_id = team_id
        self.endpoint = endpoint
        self.key = key
        self.fingerprint = fingerprint

    def replay(self) -> JSONResponse | None:
        """Claims the key, or returns the first request's answer to send again."""
        if self.key is None:
            return None
        found = idempotency.begin(
            factory=self.factory,
            team_id=self.team_id,
            endpoint=self.endpoint,
            key=self.key,
            fingerprint=self.fingerprint,
        )
        if found is None:
            return None
        return JSONResponse(
            found.body, status_code=found.status_code, headers={"Idempotent-Replayed": "true"}
        )

    def record(self, session: Session, status_code: int, body: dict[str, Any]) -> None:
        """Stores the answer in the transaction that made the resource."""
        if self.key is not None:
            idempotency.complete(
                session=session,
                team_id=self.team_id,
                endpoint=self.endpoint,
                key=self.key,
                status_code=status_code,
                body=body,
            )

    def abandon(self) -> None:
        """Frees the key after a failure, so the client can retry with it."""
        if self.key is not None:
            idempotency.release(
                factory=self.factory, team_id=self.team_id, endpoint=self.endpoint, key=self.key
            )
