"""The schema comes from Alembic alone: upgrade and downgrade work, and the models match the migrations."""

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import make_engine
from shared.migrate import downgrade, upgrade
from shared.models import Base
from tests.conftest import PG_ADMIN_URL, RUN_ID

TABLES = {
    "teams",
    "files",
    "jobs",
    "job_events",
    "job_metrics",
    "artifacts",
    "plans",
    "checkpoints",
    "api_keys",
    "idempotency_keys",
    "webhooks",
    "webhook_deliveries",
    "nodes",
    "attempts",
    "gpu_usage",
    "attempt_log_chunks",
}


@pytest.fixture
def scratch_pg():
    name = f"tuneforge_migrations_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_downgrade_upgrade(backend, scratch_pg, tmp_path):
    url = scratch_pg if backend == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert tables(url) == TABLES
    downgrade(url)
    assert tables(url) == set()
    upgrade(url)
    assert tables(url) == TABLES


def test_models_match_the_migrations(pg_url):
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ; write a migration: {diff}"
