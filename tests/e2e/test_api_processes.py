"""The API as deployed: several processes behind one port (`tuneforge api --workers 2`) on real PostgreSQL,
Redis and S3. A revoked key stops working in every process within api_key_cache_seconds, and while
PostgreSQL is stopped the API answers 503 with Retry-After (never 500), then serves again once it is back,
without being restarted. Bounded: PostgreSQL is down for a few seconds and always started again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.models import ApiKey
from shared.services.auth import revoke_api_key
from tests.conftest import PG_ADMIN_URL, TINY_MODEL, ServiceProcesses
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_processes(settings, tiny_model_dir, tmp_path_factory):
    procs = ServiceProcesses(settings, tmp_path_factory.mktemp("api-processes"))
    procs.spawn("api", ["api", "--port", str(procs.port), "--workers", "2"])
    try:
        procs.wait_ready(timeout=60)
        yield procs
    finally:
        procs.stop()


def fresh_get(base_url: str, path: str, key: str) -> httpx.Response:
    # A new connection each time, so that the requests spread over both processes.
    return httpx.get(base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_revoked_key_stops_working_in_every_process_within_a_second(two_processes, settings, make_team):
    _, key = make_team()
    assert all(fresh_get(two_processes.base_url, "/v1/jobs", key).status_code == 200 for _ in range(12))
    with session_scope(settings.database_url) as session:
        record = session.scalar(select(ApiKey).where(ApiKey.prefix == key.split("_")[1]))
        revoke_api_key(session=session, key_id=record.id)
    time.sleep(settings.api_key_cache_seconds)
    assert [fresh_get(two_processes.base_url, "/v1/jobs", key).status_code for _ in range(12)] == [401] * 12


def _cluster() -> list[str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def _postgres_answers() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@pytest.mark.skipif(not Path("/etc/postgresql").is_dir(), reason="needs the machine's PostgreSQL cluster")
def test_while_postgres_is_stopped_the_api_answers_503_then_recovers(two_processes, api_key):
    client = httpx.Client(
        base_url=two_processes.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    dataset = client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(8)))}).json()["id"]
    body = {"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 5}}
    job = client.post("/v1/jobs", json=body).json()["id"]
    reads = [f"/v1/jobs/{job}", "/v1/jobs", f"/v1/jobs/{job}/metrics", "/v1/files"]
    assert all(client.get(path).status_code == 200 for path in reads)
    answers: list[tuple[str, int, str | None]] = []
    subprocess.run([*_cluster(), "stop", "-m", "fast"], check=True, timeout=60)
    try:
        for _ in range(3):
            for path in reads:
                response = client.get(path)
                answers.append((path, response.status_code, response.headers.get("retry-after")))
            response = client.post("/v1/jobs", json=body)
            answers.append(("POST /v1/jobs", response.status_code, response.headers.get("retry-after")))
    finally:
        subprocess.run([*_cluster(), "start"], check=True, timeout=120)
    deadline = time.monotonic() + 60
    while not _postgres_answers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {(status, retry) for _, status, retry in answers} == {(503, "2")}, answers
    # Back without restarting the API: the pooled connections that died are replaced.
    recovered = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recovered = [client.get(path).status_code for path in reads]
        if recovered == [200] * len(reads):
            break
        assert set(recovered) <= {200, 503}, recovered
        time.sleep(0.5)
    assert recovered == [200] * len(reads)
    assert client.post("/v1/jobs", json=body).status_code == 201
    assert two_processes.procs["api"].poll() is None
