"""Request dependencies: settings, a database session (for writes, on the threadpool), the async database
(for the reads clients poll, on the event loop), object storage and the caller's team.

They are `async def` because FastAPI runs a plain `def` dependency on a threadpool thread: a hop per
dependency per request. The caller's team comes from a key cache, or an async read when the cache has
not seen the key within api_key_cache_seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from shared.errors import InvalidRequest, Unauthorized
from shared.services.auth import authenticate_cached
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.tenancy import TeamID
from shared.text import find_unstorable


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # An async generator: its cleanup runs on the event loop. A sync one would need a threadpool thread to
    # close the session, and under load every thread can be busy waiting for a pooled connection that only
    # such a cleanup would return (a deadlock until the pool timeout).
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_caller_team(request: Request) -> TeamID:
    """Returns the team whose API key (`Authorization: Bearer <key>`) the caller sent; 401 otherwise."""
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send your team's API key as `Authorization: Bearer <key>`", param="authorization")
    state = request.app.state
    team = await authenticate_cached(
        db=state.db, settings=state.settings, cache=state.key_cache, key=key.strip()
    )
    if team is None:
        raise Unauthorized("the API key is unknown or revoked", param="authorization")
    return team


async def refuse_unstorable_text(request: Request) -> None:
    """Refuses (4xx) path, query and JSON body values with NUL or unpaired surrogates, before they reach the
    database (whose errors on them would otherwise be 500s). Runs for every route."""
    found = next(
        (
            place
            for name, value in [*request.path_params.items(), *request.query_params.multi_items()]
            if (place := find_unstorable(name, name) or find_unstorable(value, name))
        ),
        None,
    )
    if found is None and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None  # not JSON (or nested too deeply): the route's own parsing says so
        found = find_unstorable(body, "")
    if found is not None:
        where, _ = found
        raise InvalidRequest(
            f"{where or 'body'}: text may not contain NUL characters or unpaired surrogates",
            param=where or None,
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CallerTeam = Annotated[TeamID, Depends(get_caller_team)]
