"""Per-team limits: waiting jobs answer 429 past the limit; running jobs are capped at claim time so one
team's burst leaves workers for the others; priority reaches the broker."""

import redis
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Job
from shared.queue import BROKER_PRIORITY, train_queue
from shared.services import claims
from shared.services import jobs as job_service
from shared.states import JobStatus
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl


def client_for(api_client, key):
    return {"Authorization": f"Bearer {key}"}


def submit(api_client, headers, **extra) -> dict:
    dataset = api_client.post(
        "/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))}, headers=headers
    )
    body = {"base_model": TINY_MODEL, "dataset": dataset.json()["id"], **extra}
    return api_client.post("/v1/jobs", json=body, headers=headers)


def test_waiting_jobs_past_the_team_limit_answer_429(api_client, make_team):
    _, key = make_team(max_queued_jobs=2)
    headers = client_for(api_client, key)
    assert submit(api_client, headers).status_code == 201
    assert submit(api_client, headers).status_code == 201
    refused = submit(api_client, headers)
    assert refused.status_code == 429
    assert "limit is 2" in refused.json()["error"]["message"]
    # Another team is not affected.
    _, other = make_team(max_queued_jobs=2)
    assert submit(api_client, client_for(api_client, other)).status_code == 201


def test_a_team_at_its_running_limit_waits_and_others_go_first(api_client, make_team, settings):
    _, busy_key = make_team(max_running_jobs=1)
    _, calm_key = make_team()
    burst = [submit(api_client, client_for(api_client, busy_key)).json()["id"] for _ in range(3)]
    calm = submit(api_client, client_for(api_client, calm_key)).json()["id"]
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_([*burst, calm])).values(status=JobStatus.queued.value))

    def claim(job_id):
        with session_scope(settings.database_url) as session:
            return claims.claim_job(
                session=session, job_id=job_id, worker_id="w", lease_timeout=30, settings=settings
            )

    assert claim(burst[0]) == 1
    # The busy team's next jobs wait (deferred, not lost); the other team's job is claimed at once.
    assert claim(burst[1]) is None
    assert claim(burst[2]) is None
    assert claim(calm) == 1
    with session_scope(settings.database_url) as session:
        deferred = session.get(Job, burst[1])
        assert deferred.status == "queued" and deferred.not_before is not None
        # Once the running job ends and the wait is over, the next one is claimed.
        job_service.transition(session=session, job_id=burst[0], to=JobStatus.succeeded)
        session.execute(update(Job).where(Job.id == burst[1]).values(not_before=None))
    assert claim(burst[1]) == 1


def test_high_priority_jobs_are_served_before_low_ones(api_client, settings):
    from shared.services.dispatch import send_after_commit

    low = submit(api_client, {}, priority="low", hyperparameters={"max_steps": 1}).json()["id"]
    high = submit(api_client, {}, priority="high", hyperparameters={"max_steps": 1}).json()["id"]
    client = redis.Redis.from_url(settings.broker_url)
    queue = train_queue(settings, 1)
    for key in client.scan_iter(f"{queue}*"):
        client.delete(key)
    with session_scope(settings.database_url) as session:
        dispatches = []
        for job_id in (low, high):  # the low one is sent first
            session.get(Job, job_id).status = JobStatus.queued.value
            dispatches.append(send_after_commit(session, settings, job_id))
    assert all(dispatch.sent for dispatch in dispatches)
    # A worker pops the lists in kombu's priority order (step 0 first), as BRPOP does with these keys.
    keys = [queue if step == 0 else f"{queue}\x06\x16{step}" for step in (0, 3, 6, 9)]
    first = client.brpop(keys, timeout=1)
    second = client.brpop(keys, timeout=1)
    assert high in first[1].decode() and low in second[1].decode()
    assert BROKER_PRIORITY == {"high": 0, "normal": 3, "low": 6}


def test_a_retry_at_the_limit_replays_the_first_answer(api_client, make_team):
    """The Idempotency-Key is looked up before any check: a retry of an accepted job is not refused for the
    job it made itself."""
    _, key = make_team(max_queued_jobs=1)
    headers = {**client_for(api_client, key), "Idempotency-Key": "at-the-limit"}
    first = submit(api_client, headers)
    assert first.status_code == 201
    again = submit(api_client, headers)
    assert again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert submit(api_client, client_for(api_client, key)).status_code == 429
