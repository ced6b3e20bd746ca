"""Database engine and sessions for PostgreSQL (production, tests) and SQLite (embedded default)."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, create_engine, event, tuple_
from sqlalchemy.exc import InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.base import Executable

from shared.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
_PYFORMAT = re.compile(r"%\((\w+)\)s|%%")


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
    engine = create_engine(url, pool_size=20, max_overflow=20)
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", _pinger(engine))
    return engine


# A pooled connection is pinged before use only when it sat idle this long: one that was just in use is
# alive, and a ping per checkout is a round trip on every request (a database that went away under load fails
# the statement instead, which invalidates the pool, as a failed ping would).
PING_AFTER_IDLE_SECONDS = 1.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _pinger(engine: Engine) -> Callable[[Any, Any, Any], None]:
    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.get("checked_in")
        if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
            return  # a new connection, or one in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # Dead: the connections opened before it are suspect too. The pool drops them all and this checkout
            # goes on with a new connection.
            raise InvalidatePoolError("a pooled connection failed its ping") from exc

    return ping_if_idle


def make_async_engine(url: str) -> AsyncEngine:
    """Returns an async engine for the embedded default's SQLite file (aiosqlite), its connections in autocommit
    mode. PostgreSQL is read through psycopg's own pool instead (AsyncDatabase)."""
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        "sqlite+aiosqlite:///" + path,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": 30},
        pool_size=5,
        max_overflow=5,
    )
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def libpq_url(url: str) -> str:
    """A settings database URL (`postgresql://` or SQLAlchemy's `postgresql+psycopg://`) as psycopg connects to it."""
    return "postgresql://" + url.split("://", 1)[1]


class _PostgresPool:
    """psycopg async connections for one event loop, in autocommit: made on demand, so that a database that is
    down is an error at once (not a wait for a background reconnect), reused while healthy, at most `size` in
    use at a time (a request waits `wait` seconds for one)."""

    def __init__(self, url: str, size: int, wait: float) -> None:
        self.url = libpq_url(url)
        self.wait = wait
        self.idle: collections.deque[Any] = collections.deque()
        self.slots = asyncio.Semaphore(size)

    async def acquire(self) -> Any:
        import psycopg
        from psycopg.rows import namedtuple_row
        from psycopg.types.json import set_json_loads
        from pydantic_core import from_json

        if self.slots.locked():
            try:
                await asyncio.wait_for(self.slots.acquire(), self.wait)
            except TimeoutError:
                raise DatabaseUnavailable("every database connection is busy; try again shortly") from None
        else:
            await self.slots.acquire()
        try:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection
            connection = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                row_factory=namedtuple_row,
                cursor_factory=psycopg.AsyncRawCursor,  # $1 placeholders: AsyncDatabase._sql
                connect_timeout=5,
            )
            # JSON columns parsed by pydantic-core (Rust), a few times faster than the json module.
            set_json_loads(from_json, connection)
            return connection
        except BaseException:
            self.slots.release()
            raise

    async def release(self, connection: Any, *, broken: bool = False) -> None:
        from psycopg.pq import ConnStatus, TransactionStatus

        try:
            healthy = (
                not broken
                and not connection.closed
                and connection.pgconn.status == ConnStatus.OK
                and connection.info.transaction_status == TransactionStatus.IDLE
            )
            if healthy:
                self.idle.append(connection)
            else:
                await connection.close()
        finally:
            self.slots.release()

    async def discard_idle(self) -> None:
        """Closes the idle connections: after one turned out dead, the others opened with it are too."""
        while self.idle:
            await self.idle.pop().close()


class AsyncDatabase:
    """The database as the API's event loop reads it: statements built with SQLAlchemy Core, run on autocommit
    connections, so that a read is one round trip (no BEGIN before it, no ROLLBACK after). Rows have their
    columns as attributes.

    On PostgreSQL each statement is compiled once and run by psycopg on a pool of its own: SQLAlchemy's asyncio
    layer costs several times the query itself (profiled with bench/api.py). On SQLite (the embedded default)
    it runs through SQLAlchemy's aiosqlite engine. A pool (or engine) per running event loop: uvicorn runs one
    per process; test clients may start several. A connection found dead (the database restarted since it was
    opened) is dropped with the other idle ones and the statement run once more on a new one; a database that
    does not answer raises DatabaseUnavailable (503 with Retry-After) at once."""

    def __init__(self, url: str, *, max_connections: int = 10, wait_seconds: float = 10.0) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")
        self.max_connections = max_connections
        self.wait_seconds = wait_seconds
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._compiled: dict[int, tuple[Executable, bytes, tuple[str, ...]]] = {}

    def _pool(self) -> Any:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            if self.postgres:
                pool = _PostgresPool(self.url, self.max_connections, self.wait_seconds)
            else:
                pool = make_async_engine(self.url)
            self._pools[loop] = pool
        return pool

    def _sql(self, statement: Executable) -> tuple[bytes, tuple[str, ...]]:
        """The statement as PostgreSQL's own SQL, with $1, $2... placeholders, and the names of the parameters
        they stand for. psycopg sends such SQL as it is (a raw cursor): with named parameters it would parse
        each statement again on every run, as it caches only short ones (4 kB), and the job reads are longer."""
        # Keyed by identity: the statements are module constants, held alive by the cache entry itself.
        cached = self._compiled.get(id(statement))
        if cached is None or cached[0] is not statement:
            from sqlalchemy.dialects.postgresql import psycopg

            compiled = str(
                statement.compile(dialect=psycopg.dialect(), compile_kwargs={"render_postcompile": True})
            )
            names: list[str] = []

            def placeholder(match: re.Match[str]) -> str:
                if match[1] is None:
                    return "%"  # pyformat's escaped percent sign
                if match[1] not in names:
                    names.append(match[1])
                return f"${names.index(match[1]) + 1}"

            raw = _PYFORMAT.sub(placeholder, compiled).encode()
            cached = self._compiled[id(statement)] = (statement, raw, tuple(names))
        return cached[1], cached[2]

    async def _run(
        self, statement: Executable, params: dict[str, Any], fetch: bool, tuples: bool = False
    ) -> list[Any]:
        if not self.postgres:
            engine: AsyncEngine = self._pool()
            try:
                async with engine.connect() as connection:
                    result = await connection.execute(statement, params)
                    return list(result) if fetch else []
            except (OperationalError, PoolTimeoutError) as exc:
                raise DatabaseUnavailable("the database is unavailable; try again shortly") from exc
        import psycopg
        from psycopg.rows import tuple_row

        pool: _PostgresPool = self._pool()
        sql, names = self._sql(statement)
        values = [params[name] for name in names]
        for last in (False, True):
            try:
                connection = await pool.acquire()
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable("the database is unavailable; try again shortly") from exc
            try:
                cursor = connection.cursor(row_factory=tuple_row) if tuples else connection.cursor()
                await cursor.execute(sql, values)
                rows = await cursor.fetchall() if fetch else []
            except psycopg.OperationalError as exc:
                await pool.release(connection, broken=True)
                await pool.discard_idle()
                if last:
                    raise DatabaseUnavailable("the database is unavailable; try again shortly") from exc
                log.info("a pooled database connection failed (%s); trying once more on a new one", exc)
                continue
            except BaseException:
                await pool.release(connection, broken=True)
                raise
            await pool.release(connection)
            return rows
        raise AssertionError("unreachable")

    async def fetch_all(self, statement: Executable, **params: Any) -> list[Any]:
        """The rows of a SELECT whose bind parameters are named in `params`."""
        return await self._run(statement, params, True)

    async def fetch_tuples(self, statement: Executable, **params: Any) -> list[tuple[Any, ...]]:
        """The rows of a SELECT as plain tuples, in the order of its columns: for many rows, where building
        an object per row costs more than the query."""
        return await self._run(statement, params, True, tuples=True)

    async def fetch_one(self, statement: Executable, **params: Any) -> Any | None:
        """The first row of a SELECT, or None."""
        rows = await self._run(statement, params, True)
        return rows[0] if rows else None

    async def execute(self, statement: Executable, **params: Any) -> None:
        """Runs one statement that changes rows (in its own transaction)."""
        await self._run(statement, params, False)

    async def dispose(self) -> None:
        """Closes the running loop's pooled connections."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if isinstance(pool, _PostgresPool):
            await pool.discard_idle()
        elif pool is not None:
            await pool.dispose()


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
