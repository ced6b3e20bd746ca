"""The Tuneforge HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import status_cache
from api.deps import refuse_unstorable_text
from api.errors import install_error_handlers
from api.openai import routes as openai_routes
from api.routers import console, docs, files, health, jobs, metrics, models, plans, webhooks
from shared.db import AsyncDatabase, session_factory
from shared.services.auth import KeyCache
from shared.settings import Settings, get_settings
from shared.storage import make_store

DESCRIPTION = """
Fine-tune LLMs with parameter-efficient methods. Upload a dataset (`POST /v1/files`), submit a job
(`POST /v1/jobs`), follow it (`GET /v1/jobs/{id}`, `/events`, `/metrics`) and download the adapter
(`GET /v1/jobs/{id}/artifacts/adapter.tar`), ready for `PeftModel.from_pretrained`. The web console is at
[/ui](/ui).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the API for the given settings (the environment's by default)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What the app built at start lives as long as the process: out of the collector's way, so that a
        # full collection under load walks only the objects requests made (shorter pauses, less CPU).
        gc.collect()
        gc.freeze()
        listener = status_cache.start(app.state.status_cache, settings.database_url) if caching else None
        yield
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await app.state.db.dispose()

    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description=DESCRIPTION,
        dependencies=[Depends(refuse_unstorable_text)],
        lifespan=lifespan,
        # Served by api/routers/docs.py with local assets, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.database_url)
    app.state.db = AsyncDatabase(settings.database_url)
    app.state.key_cache = KeyCache(settings.api_key_cache_seconds)
    # Never live (so never used) without PostgreSQL's notifications, or when turned off.
    caching = settings.status_cache and app.state.db.postgres
    app.state.status_cache = status_cache.StatusCache()
    app.state.store = make_store(settings)
    install_error_handlers(app)
    # Routes are matched in this order: the ones clients poll first.
    for module in (health, jobs, files, models, metrics, webhooks, openai_routes, plans, docs, console):
        app.include_router(module.router)
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")
    app.mount(console.ASSETS_PATH, console.assets(), name="console-assets")
    return app
