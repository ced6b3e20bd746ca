"""The pooled connections of shared/db.py make_engine on PostgreSQL: one that sat idle is pinged before use and
replaced when it died (a database restarted meanwhile); one in use a moment ago is not pinged (a round trip
saved per request), and when it turns out dead its statement fails and the pool drops every connection."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from shared import db
from tests.conftest import PG_ADMIN_URL


def backend_pid(engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(text("SELECT pg_backend_pid()"))


def terminate(pid: int) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        # Wait until the backend is gone, so that the pooled connection is dead when it is next used.
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            pass


def test_an_idle_connection_that_died_is_replaced_before_use(pg_url, monkeypatch):
    engine = db.make_engine(pg_url)
    try:
        first = backend_pid(engine)
        terminate(first)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checked-in connection counts as idle
        second = backend_pid(engine)  # the ping finds it dead; the pool connects again
        assert second != first
        assert engine.pool.checkedin() == 1
    finally:
        engine.dispose()


def test_a_connection_in_use_a_moment_ago_is_not_pinged(pg_url, monkeypatch):
    engine = db.make_engine(pg_url)
    try:
        first = backend_pid(engine)
        terminate(first)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600.0)
        with pytest.raises(OperationalError):
            backend_pid(engine)
        # The failure invalidated the pool: the next checkout connects again.
        assert backend_pid(engine) != first
    finally:
        engine.dispose()
