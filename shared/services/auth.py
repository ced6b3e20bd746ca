"""Teams and their API keys. A key is shown once; the database keeps only its HMAC."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import AsyncDatabase
from shared.errors import Conflict, NotFound
from shared.models import ApiKey, Team, UTCDateTime, new_id, utcnow
from shared.settings import Settings
from shared.tenancy import TeamID

KEY_FORMAT = re.compile(r"^tf_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,100})$")


def key_digest(settings: Settings, key: str) -> str:
    """HMAC-SHA256 of a key under the deployment's secret: a stolen database does not yield usable keys."""
    return hmac.new(settings.secret_key.get_secret_value().encode(), key.encode(), hashlib.sha256).hexdigest()


def create_team(
    *, session: Session, name: str, max_running_jobs: int | None = None, max_queued_jobs: int | None = None
) -> Team:
    """Creates a team; its name must be new."""
    team = Team(
        id=new_id("team"), name=name, max_running_jobs=max_running_jobs, max_queued_jobs=max_queued_jobs
    )
    session.add(team)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a team named {name!r} exists already", param="name") from exc
    return team


def find_team(*, session: Session, name_or_id: str) -> Team:
    """Returns a team by name or id."""
    team = session.scalar(select(Team).where((Team.name == name_or_id) | (Team.id == name_or_id)))
    if team is None:
        raise NotFound(f"no team {name_or_id!r}", param="team")
    return team


def create_api_key(*, session: Session, settings: Settings, team_id: str, name: str) -> tuple[ApiKey, str]:
    """Creates a key for a team; returns the record and the key itself (shown once, never stored)."""
    prefix = secrets.token_hex(6)
    key = f"tf_{prefix}_{secrets.token_urlsafe(32)}"
    record = ApiKey(
        id=new_id("key"), team_id=team_id, name=name, prefix=prefix, digest=key_digest(settings, key)
    )
    session.add(record)
    session.flush()
    return record, key


def authenticate(*, session: Session, settings: Settings, key: str) -> TeamID | None:
    """Returns the team a key belongs to, or None for an unknown, malformed or revoked key."""
    match = KEY_FORMAT.match(key)
    if match is None:
        return None
    record = session.scalar(select(ApiKey).where(ApiKey.prefix == match[1]))
    if record is None or record.revoked_at is not None:
        return None
    if not hmac.compare_digest(record.digest, key_digest(settings, key)):
        return None
    now = utcnow()
    if record.last_used_at is None or now - record.last_used_at > timedelta(minutes=1):
        record.last_used_at = now  # at most once a minute: a write per request would cost more than the read
        session.commit()
    return TeamID(record.team_id)


class KeyCache:
    """Keys this process verified lately, each trusted for `ttl_seconds` before the database is asked again:
    a revoked key stops working in every process within that time."""

    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._teams: dict[str, tuple[float, TeamID]] = {}
        self.pending: dict[str, asyncio.Future[TeamID | None]] = {}  # lookups under way, by key

    def get(self, key: str) -> TeamID | None:
        entry = self._teams.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._teams.pop(key, None)
            return None
        return entry[1]

    def put(self, key: str, team: TeamID) -> None:
        now = time.monotonic()
        if len(self._teams) >= self.max_entries:
            self._teams = {k: v for k, v in self._teams.items() if v[0] > now}
            if len(self._teams) >= self.max_entries:
                self._teams.clear()
        self._teams[key] = (now + self.ttl_seconds, team)


KEY_BY_PREFIX = select(
    ApiKey.id, ApiKey.team_id, ApiKey.digest, ApiKey.revoked_at, ApiKey.last_used_at
).where(ApiKey.prefix == bindparam("prefix"))
KEY_USED = (
    update(ApiKey)
    .where(
        ApiKey.id == bindparam("key_id"),
        or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < bindparam("stale", type_=UTCDateTime)),
    )
    .values(last_used_at=bindparam("now", type_=UTCDateTime))
)


async def authenticate_cached(
    *, db: AsyncDatabase, settings: Settings, cache: KeyCache, key: str
) -> TeamID | None:
    """`authenticate` on the event loop, answered from `cache` while the key was verified less than its TTL
    ago. Unknown and revoked keys are never cached."""
    team = cache.get(key)
    if team is not None:
        return team
    # One lookup per key at a time: when a busy key's entry expires, the requests that arrive meanwhile wait
    # for that lookup instead of each running its own (bench/api.py's 64 connections did 64 at once every second;
    # the cached status GET's p99 was 300-500 ms in 3 runs out of 3 without this, 49-81 ms in 3 out of 4 with it).
    loop = asyncio.get_running_loop()
    pending = cache.pending.get(key)
    if pending is not None and pending.get_loop() is loop:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if not pending.cancelled():
                raise  # this request was cancelled; otherwise the lookup was, and this one does its own
    lookup = cache.pending[key] = loop.create_future()
    try:
        team = await _look_up(db=db, settings=settings, cache=cache, key=key)
    except BaseException as exc:
        if isinstance(exc, Exception):
            lookup.set_exception(exc)
            lookup.exception()  # retrieved: no warning when nobody waited
        else:
            lookup.cancel()
        raise
    else:
        lookup.set_result(team)
    finally:
        if cache.pending.get(key) is lookup:
            del cache.pending[key]
    return team


async def _look_up(*, db: AsyncDatabase, settings: Settings, cache: KeyCache, key: str) -> TeamID | None:
    """Verifies a key against the database (and notes its use, at most once a minute); caches a valid one."""
    match = KEY_FORMAT.match(key)
    if match is None:
        return None
    record = await db.fetch_one(KEY_BY_PREFIX, prefix=match[1])
    if record is None or record.revoked_at is not None:
        return None
    if not hmac.compare_digest(record.digest, key_digest(settings, key)):
        return None
    now = utcnow()
    stale = now - timedelta(minutes=1)
    if record.last_used_at is None or record.last_used_at < stale:
        # At most once a minute per key (a write per request would cost more than the read).
        await db.execute(KEY_USED, key_id=record.id, stale=stale, now=now)
    team = TeamID(record.team_id)
    cache.put(key, team)
    return team


def revoke_api_key(*, session: Session, key_id: str) -> ApiKey:
    """Revokes a key at once."""
    record = session.get(ApiKey, key_id)
    if record is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.flush()
    return record


def list_api_keys(*, session: Session, team_id: str) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.created_at)).all()
