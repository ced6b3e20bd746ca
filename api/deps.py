"""Request dependencies: settings, a database session, object storage and the caller's team.

They are `async def` because FastAPI runs a plain `def` dependency on a threadpool thread: a hop per
dependency per request, for functions that never block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from shared.models import DEFAULT_TEAM_ID
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.tenancy import TeamID


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


async def get_caller_team() -> TeamID:
    """Returns the team the caller acts for. Until API keys exist, every caller is the default team."""
    return TeamID(DEFAULT_TEAM_ID)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CallerTeam = Annotated[TeamID, Depends(get_caller_team)]
