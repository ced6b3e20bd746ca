"""The status cache (api/status_cache.py) on real PostgreSQL: answers of GET /v1/jobs/{id} kept in memory and
dropped when PostgreSQL announces a change to what they show, made by another connection as a worker makes it.
A test waits (bounded) for the notification to be handled, seen as the cached answer being gone, and then
asserts that the next GET shows the change: the stale answer is never served after its notification."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from api.status_cache import StatusCache
from cli.local_service import free_port
from shared.db import session_scope
from shared.models import Attempt, Job, JobMetric
from shared.services import claims
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.005)


@pytest.fixture
def cached(settings, tiny_model_dir, make_team, store):
    """A client of a team of its own, with the status cache on and listening, and a dataset uploaded."""
    team_id, key = make_team(max_queued_jobs=1000)
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(8)), team_id=team_id).id
    app = create_app(settings.model_copy(update={"status_cache": True}))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        cache: StatusCache = app.state.status_cache
        wait_until(lambda: cache.live, "the listener listens")
        yield client, cache, team_id, dataset


def submit(client, dataset: str, **extra) -> str:
    body = {"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 5}} | extra
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def cached_get(client, cache: StatusCache, team_id: str, job_id: str) -> dict:
    """GETs a job until its answer is the cached one (a notification of the submission's own changes may come
    after the first GET), and checks that the cached answer is what the GET sent."""
    wait_until(
        lambda: (
            client.get(f"/v1/jobs/{job_id}").status_code == 200 and cache.get(team_id, job_id) is not None
        ),
        "the answer is cached",
    )
    response = client.get(f"/v1/jobs/{job_id}")
    entry = cache.get(team_id, job_id)
    assert entry is not None and response.content == entry.body and response.headers["etag"] == entry.etag
    return response.json()


def changed_elsewhere(settings, cache: StatusCache, team_id: str, job_id: str, change: Callable) -> None:
    """Runs `change(session)` in a transaction of its own, then waits for its notification to drop the answer."""
    with session_scope(settings.database_url) as session:
        change(session)
    wait_until(lambda: cache.get(team_id, job_id) is None, "the notification dropped the answer")


def job_update(job_id: str, **values) -> Callable:
    """A change for changed_elsewhere: the job's row updated with `values`, as a worker's move would."""
    return lambda session: session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_worker_s_change_is_served_once_its_notification_arrived(cached, settings):
    client, cache, team_id, dataset = cached
    job_id = submit(client, dataset)
    before = cached_get(client, cache, team_id, job_id)
    etag = client.get(f"/v1/jobs/{job_id}").headers["etag"]
    assert client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag}).status_code == 304

    changed_elsewhere(settings, cache, team_id, job_id, job_update(job_id, status="failed", error_code="x"))
    after = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert after.status_code == 200 and after.headers["etag"] != etag
    assert (before["status"], after.json()["status"], after.json()["error"]["code"]) == (
        "validating",
        "failed",
        "x",
    )
    # Cached again, with the new ETag.
    assert cache.get(team_id, job_id).etag == after.headers["etag"]


def test_progress_and_placement_changes_drop_the_answer(cached, settings):
    client, cache, team_id, dataset = cached
    job_id = submit(client, dataset)
    started = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", attempt=1, worker_id="node-1")
        )
    assert cached_get(client, cache, team_id, job_id)["placement"] is None

    def attempt(session) -> None:
        session.add(
            Attempt(
                job_id=job_id, team_id=team_id, number=1, worker_id="node-1", host="node-1.test",
                gpu_indices=[1], gpus=1, launcher="torchrun", started_at=started,
            )
        )  # fmt: skip

    changed_elsewhere(settings, cache, team_id, job_id, attempt)
    placement = cached_get(client, cache, team_id, job_id)["placement"]
    assert placement["host"] == "node-1.test" and placement["gpu_indices"] == [1]
    assert client.get(f"/v1/jobs/{job_id}").json()["progress"] is None

    def point(session) -> None:
        session.add(JobMetric(job_id=job_id, attempt=1, split="train", step=2, loss=1.0, created_at=started))

    changed_elsewhere(settings, cache, team_id, job_id, point)
    assert cached_get(client, cache, team_id, job_id)["progress"]["step"] == 2


def test_a_queued_job_s_place_follows_the_jobs_ahead_of_it(cached, settings):
    client, cache, team_id, dataset = cached
    ahead, behind = submit(client, dataset), submit(client, dataset)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_([ahead, behind])).values(status="queued"))
    first = cached_get(client, cache, team_id, behind)["queue"]["position"]
    # The job ahead leaves the queue (a worker claims it): `behind` moves up although its own row did not change.
    changed_elsewhere(settings, cache, team_id, behind, job_update(ahead, status="running"))
    assert cached_get(client, cache, team_id, behind)["queue"]["position"] == first - 1


def test_an_answer_read_before_a_change_is_not_stored_after_its_notification(cached, settings):
    """The race: a GET reads the job, the job changes and the notification is handled, then the GET stores what
    it read. The stale answer must not be stored."""
    client, cache, team_id, dataset = cached
    job_id, witness = submit(client, dataset), submit(client, dataset)
    stale = cached_get(client, cache, team_id, job_id)
    cached_get(client, cache, team_id, witness)
    mark = cache.begin()  # as a GET does before it reads
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(priority="high"))
    # A listener gets notifications in commit order: once the witness's is handled, so was the job's.
    with psycopg.connect(settings.database_url, autocommit=True) as other:
        other.execute("SELECT pg_notify('tuneforge_jobs', %s)", [witness])
    wait_until(lambda: cache.get(team_id, witness) is None, "the witness's notification was handled")
    cache.fill(mark, team_id, job_id, json.dumps(stale).encode(), queued=False)
    assert cache.get(team_id, job_id) is None
    assert client.get(f"/v1/jobs/{job_id}").json()["priority"] == "high"


def test_a_change_made_by_this_process_shows_at_once(cached):
    client, cache, team_id, dataset = cached
    job_id = submit(client, dataset)
    cached_get(client, cache, team_id, job_id)
    etag = client.get(f"/v1/jobs/{job_id}").headers["etag"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    # No waiting: the route dropped the answer itself.
    changed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag


def test_another_team_s_job_is_not_found_even_when_cached(cached, make_team):
    client, cache, team_id, dataset = cached
    job_id = submit(client, dataset)
    cached_get(client, cache, team_id, job_id)
    _, other_key = make_team()
    other = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 404
    missing = client.get("/v1/jobs/ftjob-000000000000000000000000")
    assert missing.status_code == 404 and cache.get(team_id, "ftjob-000000000000000000000000") is None


def test_while_the_listener_is_lost_the_cache_is_empty_and_then_listens_again(cached, settings):
    client, cache, team_id, dataset = cached
    job_id = submit(client, dataset)
    cached_get(client, cache, team_id, job_id)
    admin = psycopg.connect(settings.database_url, autocommit=True)
    with admin:
        # As PostgreSQL restarting does to it: the listening connection is closed by the server.
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = 'LISTEN tuneforge_jobs'"
        ).fetchall()
    assert len(killed) >= 1
    wait_until(lambda: cache.get(team_id, job_id) is None, "the cache was emptied")
    # A change whose notification may have no listener: the cache is empty, and fills begun before it listens
    # again are not stored.
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(priority="low"))
    wait_until(lambda: cache.live, "the listener listens again")
    assert cached_get(client, cache, team_id, job_id)["priority"] == "low"
    changed_elsewhere(settings, cache, team_id, job_id, job_update(job_id, priority="high"))
    assert client.get(f"/v1/jobs/{job_id}").json()["priority"] == "high"


def test_without_its_database_the_cached_api_answers_503(settings, api_key):
    away = settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/x", "status_cache": True}
    )
    app = create_app(away)
    with TestClient(app, headers={"Authorization": f"Bearer {api_key}"}) as client:
        response = client.get("/v1/jobs/ftjob-x")
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert not app.state.status_cache.live


def test_turned_off_nothing_is_cached(settings, make_team, store):
    team_id, key = make_team()
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(8)), team_id=team_id).id
    app = create_app(settings.model_copy(update={"status_cache": False}))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        job_id = submit(client, dataset)
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert not app.state.status_cache.live and app.state.status_cache.get(team_id, job_id) is None


def test_a_lease_renewal_keeps_the_answer(cached, settings):
    """A heartbeat changes nothing the answer shows: its update sends no notification (nodes renew every running
    job every few seconds), while any other change to the job still does."""
    client, cache, team_id, dataset = cached
    job_id, witness = submit(client, dataset), submit(client, dataset)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
    before = cached_get(client, cache, team_id, job_id)
    cached_get(client, cache, team_id, witness)
    with session_scope(settings.database_url) as session:
        assert claims.renew(session=session, job_id=job_id, attempt=1).status is not None
    # Notifications arrive in commit order: once the witness's is handled, the renewal's would have been.
    changed_elsewhere(settings, cache, team_id, witness, job_update(witness, status="failed"))
    assert cache.get(team_id, job_id) is not None
    assert client.get(f"/v1/jobs/{job_id}").json() == before
    changed_elsewhere(settings, cache, team_id, job_id, job_update(job_id, status="cancelling"))
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelling"
