"""Webhooks against real PostgreSQL: registration through the outbound URL policy, team scoping, delivery rows
written with the job's final status, signed deliveries to receivers on 127.0.0.1, back-off, giving up, and
several workers delivering at once. Receivers run on loopback; the test-only loopback allowance lets the
policy reach them, and a resolver that never leaves the machine replaces DNS."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from api.main import create_app
from shared import urlpolicy
from shared.db import session_scope
from shared.models import Job, Webhook, WebhookDelivery, utcnow
from shared.schemas import JobSpec
from shared.services import claims
from shared.services import jobs as job_service
from shared.services import webhooks as webhook_service
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import make_store
from tests.conftest import TINY_MODEL
from tests.unit.test_urlpolicy import LocalServer, Seen
from worker import webhooks as delivery

LOCAL_NAMES = {"localhost": ["127.0.0.1"], "hooks.example.test": ["127.0.0.1"]}


def offline_resolver(host: str, port: int) -> list[str]:
    """Numeric hosts and a fixed table only: no DNS query leaves the machine."""
    if host in LOCAL_NAMES:
        return LOCAL_NAMES[host]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


@pytest.fixture(autouse=True)
def _no_dns(monkeypatch):
    monkeypatch.setattr(urlpolicy, "system_resolver", offline_resolver)


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "outbound_allow_loopback": True,
            "webhook_backoff_base_seconds": 0.2,
            "webhook_backoff_max_seconds": 1.0,
            "webhook_max_attempts": 3,
            "webhook_timeout_seconds": 5.0,
        }
    )


@pytest.fixture
def receiver() -> Iterator[LocalServer]:
    server = LocalServer()
    yield server
    server.close()


@contextmanager
def client(settings: Settings, key: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture
def team(make_team, hook_settings) -> Iterator[tuple[str, TestClient]]:
    team_id, key = make_team()
    with client(hook_settings, key) as c:
        yield team_id, c
        # Leave nothing due for other tests' delivery rounds.
        for hook in c.get("/v1/webhooks").json()["data"]:
            c.delete(f"/v1/webhooks/{hook['id']}")


def dataset_uri(settings: Settings) -> str:
    return f"file://{Path(settings.allowed_file_roots[0]) / 'never-read.jsonl'}"


def new_job(settings: Settings, team_id: str, **metadata: str) -> str:
    spec = JobSpec.model_validate(
        {"base_model": TINY_MODEL, "dataset": dataset_uri(settings), "metadata": metadata}
    )
    with session_scope(settings.database_url) as session:
        job = job_service.create_job(
            session=session, settings=settings, store=make_store(settings), team_id=team_id, spec=spec
        )
        return job.id


def finish(settings: Settings, job_id: str, to: JobStatus) -> None:
    with session_scope(settings.database_url) as session:
        if to is JobStatus.succeeded:
            assert job_service.transition(session=session, job_id=job_id, to=JobStatus.queued)
            attempt = claims.claim_job(session=session, job_id=job_id, worker_id="t", lease_timeout=30)
            assert job_service.transition(
                session=session, job_id=job_id, to=JobStatus.succeeded, attempt=attempt, result={"loss": 0.5}
            )
        elif to is JobStatus.failed:
            assert job_service.transition(
                session=session,
                job_id=job_id,
                to=JobStatus.failed,
                error_code="invalid_dataset",
                error_message="line 3: invalid JSON",
            )
        else:
            assert job_service.transition(session=session, job_id=job_id, to=to)


def deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
            )
        )


def register(c: TestClient, url: str, **extra) -> dict:
    response = c.post("/v1/webhooks", json={"url": url, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def deliver_until(settings: Settings, job_id: str, done: set[str], timeout: float = 15) -> WebhookDelivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery.deliver_due_webhooks(settings)
        rows = deliveries(settings, job_id)
        if rows and all(r.status in done for r in rows):
            return rows[0]
        time.sleep(0.02)
    raise AssertionError(f"deliveries of {job_id} still {[r.status for r in deliveries(settings, job_id)]}")


def check_signature(seen: Seen, secret: str) -> int:
    """The receiver's side, written out independently of the service's helpers."""
    parts = dict(part.split("=", 1) for part in seen.headers["Tuneforge-Signature"].split(","))
    t = int(parts["t"])
    assert abs(time.time() - t) < 60, "timestamp outside the tolerance window"
    expected = hmac.new(secret.encode(), f"{t}.".encode() + seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert webhook_service.verify_signature(secret, seen.body, seen.headers["Tuneforge-Signature"])
    return t


# Registration


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://localhost/hook", "localhost resolves to 127.0.0.1; 127.0.0.1 is a loopback address"),
        ("http://127.0.0.1:9/hook", "127.0.0.1 is a loopback address"),
        ("http://2130706433/hook", "127.0.0.1 is a loopback address"),
        ("http://[::ffff:10.0.0.1]/hook", "private address"),
        ("ftp://example.com/hook", "only http:// and https:// URLs are allowed (got 'ftp')"),
        ("https://user:pw@example.com/hook", "credentials in the URL"),
    ],
)
def test_registration_refuses_urls_naming_the_field(api_client, url, message):
    # api_client runs with the test settings as they are: no loopback allowance.
    response = api_client.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "url"
    assert message in error["message"]


def test_registration_checks_events(api_client):
    response = api_client.post(
        "/v1/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["job.started"]}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"].startswith("events")


def test_webhooks_are_team_scoped(make_team, hook_settings, receiver):
    (_, key_a), (_, key_b) = make_team(), make_team()
    with client(hook_settings, key_a) as a, client(hook_settings, key_b) as b:
        created = register(a, receiver.url("/hook"), events=["job.failed"])
        assert created["secret"].startswith("whsec_")
        # Stored sealed: the database row does not hold the secret (deliveries still verify with it, below).
        with session_scope(hook_settings.database_url) as session:
            stored = session.get(Webhook, created["id"]).secret
        assert stored.startswith("sealed1:") and created["secret"] not in stored
        assert webhook_service.signing_secret(hook_settings, created["id"], stored) == created["secret"]
        assert created["events"] == ["job.failed"]
        listed = a.get("/v1/webhooks").json()["data"]
        assert [h["id"] for h in listed] == [created["id"]]
        assert "secret" not in listed[0]
        assert b.get("/v1/webhooks").json()["data"] == []
        assert b.delete(f"/v1/webhooks/{created['id']}").status_code == 404
        assert b.get(f"/v1/webhooks/{created['id']}/deliveries").status_code == 404
        assert a.delete(f"/v1/webhooks/{created['id']}").status_code == 204
        assert a.delete(f"/v1/webhooks/{created['id']}").status_code == 404
        assert a.get("/v1/webhooks").json()["data"] == []


# Delivery


def test_a_cancelled_job_is_delivered_signed(team, hook_settings, receiver):
    _, c = team
    receiver.routes["/hook"] = lambda seen: (204, {}, b"")
    hook = register(c, receiver.url("/hook", host="hooks.example.test"))
    only_success = register(c, receiver.url("/other"), events=["job.succeeded"])
    job = c.post(
        "/v1/jobs",
        json={"base_model": TINY_MODEL, "dataset": dataset_uri(hook_settings), "metadata": {"k": "v"}},
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert deliveries(hook_settings, job_id) == []
    assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    rows = deliveries(hook_settings, job_id)
    assert [(r.webhook_id, r.event, r.status) for r in rows] == [(hook["id"], "job.cancelled", "pending")]
    row = deliver_until(hook_settings, job_id, {"delivered"})
    assert (row.attempts, row.last_status_code, row.last_error) == (1, 204, None)
    assert row.delivered_at is not None

    [seen] = receiver.seen
    assert seen.method == "POST" and seen.path == "/hook"
    assert seen.headers["Host"] == f"hooks.example.test:{receiver.port}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["Tuneforge-Delivery-Id"] == row.id
    assert seen.headers["Tuneforge-Event"] == "job.cancelled"
    check_signature(seen, hook["secret"])
    body = json.loads(seen.body)
    assert set(body) == {"id", "type", "created_at", "data"}
    assert body["type"] == "job.cancelled"
    assert body["id"].startswith("evt-")
    assert body["data"]["id"] == job_id
    assert body["data"]["status"] == "cancelled"
    assert body["data"]["metadata"] == {"k": "v"}
    assert body["data"]["finished_at"] is not None

    # A tampered body or a stale timestamp fails the receiver's check.
    header = seen.headers["Tuneforge-Signature"]
    assert not webhook_service.verify_signature(hook["secret"], seen.body + b" ", header)
    assert not webhook_service.verify_signature(hook["secret"], seen.body, header, now=time.time() + 600)
    assert not webhook_service.verify_signature("whsec_wrong", seen.body, header)

    listed = c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert [(d["id"], d["status"], d["attempts"]) for d in listed] == [(row.id, "delivered", 1)]
    assert c.get(f"/v1/webhooks/{only_success['id']}/deliveries").json()["data"] == []
    delivery.deliver_due_webhooks(hook_settings)
    assert len(receiver.seen) == 1


def test_succeeded_and_failed_jobs_carry_their_result(team, hook_settings, receiver):
    team_id, c = team
    receiver.routes["/hook"] = lambda seen: (200, {}, b"ok")
    hook = register(c, receiver.url("/hook"))
    succeeded, failed = new_job(hook_settings, team_id), new_job(hook_settings, team_id)
    finish(hook_settings, succeeded, JobStatus.succeeded)
    finish(hook_settings, failed, JobStatus.failed)
    deliver_until(hook_settings, succeeded, {"delivered"})
    deliver_until(hook_settings, failed, {"delivered"})
    bodies = {json.loads(s.body)["data"]["id"]: json.loads(s.body) for s in receiver.seen}
    assert bodies[succeeded]["type"] == "job.succeeded"
    assert bodies[succeeded]["data"]["result"] == {"loss": 0.5}
    assert bodies[failed]["type"] == "job.failed"
    assert bodies[failed]["data"]["error"] == {"code": "invalid_dataset", "message": "line 3: invalid JSON"}
    for seen in receiver.seen:
        check_signature(seen, hook["secret"])


def test_retries_with_growing_backoff_until_delivered(team, hook_settings, receiver):
    team_id, c = team
    arrivals: list[Seen] = []

    def flaky(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        arrivals.append(seen)
        return (500, {}, b"database is down") if len(arrivals) <= 2 else (200, {}, b"")

    receiver.routes["/hook"] = flaky
    hook = register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    finish(hook_settings, job_id, JobStatus.failed)

    def next_attempt() -> datetime:
        """Runs delivery rounds until the receiver sees one more attempt; returns the time taken just before
        the round that made it."""
        before = len(arrivals)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            started = utcnow()
            delivery.deliver_due_webhooks(hook_settings)
            if len(arrivals) > before:
                assert len(arrivals) == before + 1
                return started
            time.sleep(0.02)
        raise AssertionError(
            f"no attempt after {before}: {[r.status for r in deliveries(hook_settings, job_id)]}"
        )

    def quiet_until_due(row: WebhookDelivery) -> None:
        """A round run a moment before the row is due sends nothing and counts no attempt."""
        sent = len(arrivals)
        delivery.deliver_due_webhooks(hook_settings, now=row.next_attempt_at - timedelta(milliseconds=1))
        assert len(arrivals) == sent
        [again] = deliveries(hook_settings, job_id)
        assert (again.status, again.attempts, again.next_attempt_at) == (
            "pending",
            row.attempts,
            row.next_attempt_at,
        )

    first = next_attempt()
    [row] = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500)
    assert row.last_error == "HTTP 500: database is down"
    assert row.next_attempt_at >= first + timedelta(seconds=delivery.backoff_seconds(hook_settings, 1))
    quiet_until_due(row)

    second = next_attempt()
    [row] = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 2, 500)
    assert row.last_error == "HTTP 500: database is down"
    assert row.next_attempt_at >= second + timedelta(seconds=delivery.backoff_seconds(hook_settings, 2))
    quiet_until_due(row)

    row = deliver_until(hook_settings, job_id, {"delivered"})
    assert (row.attempts, row.last_status_code, row.last_error) == (3, 200, None)
    assert len(arrivals) == 3
    ids = {s.headers["Tuneforge-Delivery-Id"] for s in receiver.seen}
    assert ids == {row.id}
    for seen in receiver.seen:
        check_signature(seen, hook["secret"])
    assert delivery.backoff_seconds(hook_settings, 1) == 0.2  # base
    assert delivery.backoff_seconds(hook_settings, 2) == 0.4  # base * 2
    assert delivery.backoff_seconds(hook_settings, 3) == 0.8
    assert delivery.backoff_seconds(hook_settings, 10) == 1.0  # the cap


def test_gives_up_after_max_attempts(team, hook_settings, receiver):
    team_id, c = team
    receiver.routes["/hook"] = lambda seen: (503, {}, b"maintenance")
    register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    finish(hook_settings, job_id, JobStatus.cancelled)
    row = deliver_until(hook_settings, job_id, {"failed"})
    assert row.attempts == 3
    assert row.last_status_code == 503
    assert row.last_error == "gave up after 3 attempts; last error: HTTP 503: maintenance"
    assert row.next_attempt_at is None
    assert len(receiver.seen) == 3
    delivery.deliver_due_webhooks(hook_settings)
    assert len(receiver.seen) == 3


def test_another_teams_job_never_fires(make_team, team, hook_settings, receiver):
    team_id, c = team
    receiver.routes["/hook"] = lambda seen: (200, {}, b"")
    hook = register(c, receiver.url("/hook"))
    other_team, _ = make_team()
    other_job = new_job(hook_settings, other_team)
    finish(hook_settings, other_job, JobStatus.succeeded)
    assert deliveries(hook_settings, other_job) == []
    own_job = new_job(hook_settings, team_id)
    finish(hook_settings, own_job, JobStatus.succeeded)
    deliver_until(hook_settings, own_job, {"delivered"})
    assert [json.loads(s.body)["data"]["id"] for s in receiver.seen] == [own_job]
    assert [d["job_id"] for d in c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]] == [own_job]


def test_the_url_is_checked_again_at_each_delivery(team, hook_settings, receiver):
    team_id, c = team
    receiver.routes["/hook"] = lambda seen: (200, {}, b"")
    register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    finish(hook_settings, job_id, JobStatus.cancelled)
    strict = hook_settings.model_copy(update={"outbound_allow_loopback": False})
    delivery.deliver_due_webhooks(strict)
    [row] = deliveries(hook_settings, job_id)
    assert row.status == "pending"
    assert row.last_error == "127.0.0.1 is a loopback address"
    assert receiver.seen == []


def test_a_worker_with_another_secret_key_sends_nothing_and_says_why(team, hook_settings, receiver):
    team_id, c = team
    receiver.routes["/hook"] = lambda seen: (200, {}, b"")
    register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    finish(hook_settings, job_id, JobStatus.cancelled)
    rotated = hook_settings.model_copy(update={"secret_key": SecretStr("a different deployment secret")})
    delivery.deliver_due_webhooks(rotated)
    [row] = deliveries(hook_settings, job_id)
    assert row.status == "pending" and receiver.seen == []
    assert "TUNEFORGE_SECRET_KEY is not the one it was sealed with" in row.last_error


def test_the_delivery_row_commits_with_the_status(team, hook_settings, receiver):
    team_id, c = team
    register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    with pytest.raises(RuntimeError), session_scope(hook_settings.database_url) as session:
        assert job_service.transition(session=session, job_id=job_id, to=JobStatus.cancelled)
        assert (
            len(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).all()) == 1
        )
        raise RuntimeError("crash before commit")
    assert deliveries(hook_settings, job_id) == []
    with session_scope(hook_settings.database_url) as session:
        assert session.get(Job, job_id).status == JobStatus.validating
    finish(hook_settings, job_id, JobStatus.cancelled)
    assert [r.status for r in deliveries(hook_settings, job_id)] == ["pending"]


def test_deleting_a_webhook_gives_up_its_pending_deliveries(team, hook_settings, receiver):
    team_id, c = team
    hook = register(c, receiver.url("/hook"))
    job_id = new_job(hook_settings, team_id)
    finish(hook_settings, job_id, JobStatus.cancelled)
    assert c.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
    delivery.deliver_due_webhooks(hook_settings)
    [row] = deliveries(hook_settings, job_id)
    assert (row.status, row.last_error, row.attempts) == ("failed", "the webhook was deleted", 0)
    assert receiver.seen == []


def test_several_workers_deliver_each_event_once(team, hook_settings, receiver):
    team_id, c = team
    lock = threading.Lock()

    def slow(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.05)
        return 200, {}, b""

    receiver.routes["/hook"] = slow
    register(c, receiver.url("/hook"))
    jobs = [new_job(hook_settings, team_id) for _ in range(12)]
    for job_id in jobs:
        finish(hook_settings, job_id, JobStatus.cancelled)
    barrier = threading.Barrier(4)
    results: list[dict[str, int]] = []

    def worker() -> None:
        barrier.wait()
        counts = delivery.deliver_due_webhooks(hook_settings, limit=5)
        with lock:
            results.append(counts)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job_id in jobs:
        deliver_until(hook_settings, job_id, {"delivered"})
    ids = [s.headers["Tuneforge-Delivery-Id"] for s in receiver.seen]
    assert len(ids) == len(set(ids)) == 12
    assert sum(r["delivered"] for r in results) <= 12


def test_claims_are_exclusive_on_sqlite(tmp_path, hook_settings):
    from shared.migrate import upgrade
    from shared.services.auth import create_team

    url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    upgrade(url)
    lite = hook_settings.model_copy(update={"database_url": url})
    with session_scope(url) as session:
        team_id = create_team(session=session, name="lite").id
        webhook_service.create_webhook(
            session=session, settings=lite, team_id=team_id, url="http://127.0.0.1:9/hook"
        )
    jobs = [new_job(lite, team_id) for _ in range(6)]
    for job_id in jobs:
        finish(lite, job_id, JobStatus.cancelled)
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait()
        rows = delivery.claim_due(lite, limit=6)
        with lock:
            claimed.extend(r.id for r in rows)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 6
    assert delivery.claim_due(lite) == []  # leased: not due again until the lease runs out
