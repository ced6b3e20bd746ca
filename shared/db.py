"""Database engine and sessions for PostgreSQL (production, tests) and SQLite (embedded default)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, create_engine, event, tuple_
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; the busy timeout waits out the writer lock
    # instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Returns an engine for `url`, tuned for its backend."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20, max_overflow=20
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # Sized for the API's threadpool (40 threads) so requests rarely wait for a connection.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """Returns one shared engine per database URL in this process."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yields a session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def retry_transient(action: Callable[[], T], *, retry_for: float = 60.0, what: str = "a database write") -> T:
    """Runs `action`, retrying while the database is unreachable (a restart, a failover) for up to
    `retry_for` seconds. Other errors pass through at once."""
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def beyond(model: Any, created_at: Any, row_id: str, *, descending: bool = True) -> ColumnElement[bool]:
    """Keyset pagination over (created_at, id): the rows of `model` that come after the anchor row in that
    order, newest first unless `descending` is False. One row-value comparison (PostgreSQL and SQLite)."""
    key = tuple_(model.created_at, model.id)
    return key < (created_at, row_id) if descending else key > (created_at, row_id)
