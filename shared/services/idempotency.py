"""Idempotency-Key: a retried request returns the first answer instead of creating a second resource.

The same key with the same request replays the first response; with a different request it is a 422; two
requests racing with one key make one resource (the second waits for the first and replays its answer).

Two ways to hold a key while the work runs:
- `claim` (job submission, whose work is database writes only): the key row is inserted in the transaction
  that makes the resource and updated with the answer before it commits. A racing request's insert waits on
  the row until that transaction ends, then replays its answer (or goes ahead, if it rolled back). One
  transaction, no separate commit; a failure or a crash rolls the key back with the work.
- `begin` / `complete` / `release` (file uploads, whose bytes go to storage first): the key row is committed
  before the work starts, in a transaction of its own, and its answer stored in the transaction of the
  work, so a crash in between leaves neither a resource nor a stored answer (and the key can be retried).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Insert, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.errors import Conflict, InvalidRequest
from shared.models import IdempotencyKey, utcnow

PARAM = "Idempotency-Key"


@dataclass(frozen=True)
class Replay:
    """The stored answer of the first request with this key."""

    status_code: int
    body: dict[str, Any]


def request_hash(*parts: bytes | str) -> str:
    """A fingerprint of a request's meaningful content."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()


def _check_key(key: str) -> str:
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable characters", param=PARAM)
    return key


def begin(
    *,
    factory: Callable[[], Session],
    team_id: str,
    endpoint: str,
    key: str,
    fingerprint: str,
    wait_seconds: float = 30.0,
    abandoned_after_seconds: float = 120.0,
) -> Replay | None:
    """Claims `key` for this request (returns None: go ahead) or returns the first request's answer."""
    _check_key(key)
    deadline = time.monotonic() + wait_seconds
    while True:
        with factory() as session:
            session.add(IdempotencyKey(team_id=team_id, endpoint=endpoint, key=key, request_hash=fingerprint))
            try:
                session.commit()
                return None
            except IntegrityError:
                session.rollback()
            row = session.scalar(
                select(IdempotencyKey).where(
                    IdempotencyKey.team_id == team_id,
                    IdempotencyKey.endpoint == endpoint,
                    IdempotencyKey.key == key,
                )
            )
            if row is None:  # released between our insert and our read: try again
                continue
            if (replay := _answered(row, fingerprint)) is not None:
                return replay
            if utcnow() - row.created_at > timedelta(seconds=abandoned_after_seconds):
                # The first request died mid-way (it stored nothing): this one takes the key over.
                taken = session.execute(
                    update(IdempotencyKey)
                    .where(IdempotencyKey.id == row.id, IdempotencyKey.status_code.is_(None))
                    .where(IdempotencyKey.created_at == row.created_at)
                    .values(created_at=utcnow())
                )
                session.commit()
                if taken.rowcount == 1:
                    return None
        if time.monotonic() > deadline:
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry in a moment", param=PARAM
            )
        time.sleep(0.1)


def _answered(row: Any, fingerprint: str) -> Replay | None:
    """The first request's answer to replay, if it has one; refuses a different request under the same key."""
    if row.request_hash != fingerprint:
        raise InvalidRequest(
            "this Idempotency-Key was used with a different request; use a new key for a new request",
            param=PARAM,
        )
    if row.status_code is not None:
        return Replay(row.status_code, row.response or {})
    return None


def _insert_if_absent(dialect: str) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id, for the dialect; built once (the values are parameters)."""
    if dialect not in _INSERTS:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        _INSERTS[dialect] = (
            insert(IdempotencyKey)
            .on_conflict_do_nothing(index_elements=["team_id", "endpoint", "key"])
            .returning(IdempotencyKey.id)
        )
    return _INSERTS[dialect]


_INSERTS: dict[str, Insert] = {}
_ANSWER = (
    update(IdempotencyKey)
    .where(IdempotencyKey.id == bindparam("key_id"))
    .values(status_code=bindparam("status_code"), response=bindparam("response"))
)


def claim(
    *,
    session: Session,
    team_id: str,
    endpoint: str,
    key: str,
    fingerprint: str,
    abandoned_after_seconds: float = 120.0,
) -> int | Replay:
    """Claims `key` in the caller's transaction (returns the key row's id: go ahead, and `complete_claimed` it
    in the same transaction) or returns the first request's answer. A request racing with this one on the
    same key waits here until this one's transaction ends."""
    _check_key(key)
    values = {
        "team_id": team_id,
        "endpoint": endpoint,
        "key": key,
        "request_hash": fingerprint,
        "created_at": utcnow(),
    }
    while True:
        # Core statements on the session's connection: no ORM object is involved.
        connection = session.connection()
        claimed = connection.scalar(_insert_if_absent(connection.dialect.name), values)
        if claimed is not None:
            return claimed
        # The key is taken by a committed request (an insert racing with ours has ended by now).
        row = (
            session.connection()
            .execute(
                select(IdempotencyKey.id, IdempotencyKey.request_hash, IdempotencyKey.status_code)
                .add_columns(IdempotencyKey.response, IdempotencyKey.created_at)
                .where(
                    IdempotencyKey.team_id == team_id,
                    IdempotencyKey.endpoint == endpoint,
                    IdempotencyKey.key == key,
                )
            )
            .one_or_none()
        )
        if row is None:  # released between our insert and our read: try again
            continue
        if (replay := _answered(row, fingerprint)) is not None:
            return replay
        # A key committed without an answer (by `begin`): in progress, or abandoned by a request that died.
        if utcnow() - row.created_at <= timedelta(seconds=abandoned_after_seconds):
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry in a moment", param=PARAM
            )
        session.connection().execute(
            delete(IdempotencyKey).where(IdempotencyKey.id == row.id, IdempotencyKey.status_code.is_(None))
        )


def complete_claimed(*, session: Session, key_id: int, status_code: int, body: dict[str, Any]) -> None:
    """Stores the answer of a claimed key, in the transaction that claimed it."""
    session.connection().execute(_ANSWER, {"key_id": key_id, "status_code": status_code, "response": body})


def complete(
    *, session: Session, team_id: str, endpoint: str, key: str, status_code: int, body: dict[str, Any]
) -> None:
    """Stores the answer, in the caller's transaction (the one that made the resource)."""
    session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.team_id == team_id, IdempotencyKey.endpoint == endpoint, IdempotencyKey.key == key
        )
        .values(status_code=status_code, response=body)
    )


def release(*, factory: Callable[[], Session], team_id: str, endpoint: str, key: str) -> None:
    """Forgets an unanswered key after the request failed, so that a retry can run."""
    with factory() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.team_id == team_id,
                IdempotencyKey.endpoint == endpoint,
                IdempotencyKey.key == key,
                IdempotencyKey.status_code.is_(None),
            )
        )
        session.commit()


@dataclass(frozen=True)
class IdempotentCall:
    """One creating request, with or without an Idempotency-Key: claim the key first, store the answer in the
    transaction that makes the resource, free the key if that fails."""

    factory: Callable[[], Session]
    team_id: str
    endpoint: str
    key: str | None
    fingerprint: str

    def begin(self) -> Replay | None:
        """Claims the key (None: go ahead), or returns the first request's answer to send again."""
        if self.key is None:
            return None
        return begin(
            factory=self.factory,
            team_id=self.team_id,
            endpoint=self.endpoint,
            key=self.key,
            fingerprint=self.fingerprint,
        )

    def claim(self, session: Session) -> int | Replay | None:
        """Claims the key in `session`'s transaction (see `claim`): its row id (go ahead), or the first
        request's answer to send again; None without a key."""
        if self.key is None:
            return None
        return claim(
            session=session,
            team_id=self.team_id,
            endpoint=self.endpoint,
            key=self.key,
            fingerprint=self.fingerprint,
        )

    def complete(self, session: Session, status_code: int, body: dict[str, Any]) -> None:
        """Stores the answer in the caller's transaction (the one that made the resource)."""
        if self.key is not None:
            complete(
                session=session,
                team_id=self.team_id,
                endpoint=self.endpoint,
                key=self.key,
                status_code=status_code,
                body=body,
            )

    def release(self) -> None:
        """Frees the key after a failure, so the client can retry with it."""
        if self.key is not None:
            release(factory=self.factory, team_id=self.team_id, endpoint=self.endpoint, key=self.key)
