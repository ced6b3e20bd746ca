"""The reads clients poll, on real PostgreSQL, Redis and S3: conditional GETs, pages of jobs by status, metric
curves; and the API when its database or its broker does not answer (503 with Retry-After; submissions
accepted and sent by the sweeper once Redis is back)."""

from __future__ import annotations

import json
import math
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import null, select, update

from api.answers import encode
from api.main import create_app
from api.schemas import job_answer
from cli.local_service import free_port
from shared.db import session_scope
from shared.models import Attempt, Job, JobEvent, JobMetric
from shared.queue import queued_messages
from shared.services import job_reads
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset


@pytest.fixture
def team_client(settings, tiny_model_dir, make_team, store):
    """A client of a team of its own, with a dataset uploaded."""
    team_id, key = make_team(max_queued_jobs=1000)
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(8)), team_id=team_id).id
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, team_id, dataset


def submit(client, dataset: str, **extra) -> dict:
    body = {"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 5}} | extra
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_poller_gets_304_until_the_job_changes(team_client):
    client, _, dataset = team_client
    job = submit(client, dataset)
    first = client.get(f"/v1/jobs/{job['id']}")
    assert first.status_code == 200
    # The same answer as the submission's (sending it to the broker has since moved updated_at).
    assert first.json() | {"updated_at": None} == job | {"updated_at": None}
    etag = first.headers["etag"]
    again = client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    changed = client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag
    # Another team's job is not found, ETag or not.
    assert client.get("/v1/jobs/ftjob-nope", headers={"If-None-Match": "*"}).status_code == 404


def test_pages_by_status_walk_every_job_once_newest_first(team_client):
    client, _, dataset = team_client
    made = [submit(client, dataset)["id"] for _ in range(7)]
    for job_id in made[:3]:
        client.post(f"/v1/jobs/{job_id}/cancel")
    seen: dict[str | None, list[str]] = {}
    for status in (None, "cancelled", "validating"):
        cursor, ids = None, []
        while True:
            params = (
                {"limit": 2} | ({"status": status} if status else {}) | ({"cursor": cursor} if cursor else {})
            )
            page = client.get("/v1/jobs", params=params).json()
            ids += [job["id"] for job in page["data"]]
            assert all(status is None or job["status"] == status for job in page["data"])
            if not page["has_more"]:
                break
            cursor = page["next_cursor"]
        seen[status] = ids
    assert seen[None] == made[::-1]
    assert seen["cancelled"] == made[:3][::-1]
    assert seen["validating"] == made[3:][::-1]
    bad = client.get("/v1/jobs", params={"cursor": "bm9wZQ"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "cursor"


def test_the_answers_postgresql_writes_are_job_answer_of_the_same_rows(team_client, settings):
    """On PostgreSQL the database writes a job's JSON answer (shared/services/job_reads.py JOB_ANSWER); once
    parsed it is api/schemas.py job_answer of the same job's row, in every state the answer shows."""
    client, team_id, dataset = team_client
    queued, running, failed, plain = (submit(client, dataset, metadata={"n": str(n)})["id"] for n in range(4))
    started = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)  # no microseconds: written without a fraction
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == queued).values(status="queued"))
        session.execute(
            update(Job)
            .where(Job.id == running)
            .values(status="running", attempt=1, started_at=started, worker_id="node-1")
        )
        session.add(
            Attempt(
                job_id=running, team_id=team_id, number=1, worker_id="node-1", host="node-1.test",
                gpu_indices=[2, 3], gpus=2, launcher="torchrun", started_at=started,
            )
        )  # fmt: skip
        for step in (1, 2, 3):
            at = started + timedelta(seconds=10 * step, microseconds=step)
            session.add(
                JobMetric(job_id=running, attempt=1, split="train", step=step, epoch=step / 5, created_at=at)
            )
        session.execute(
            update(Job)
            .where(Job.id == failed)
            .values(
                status="failed",
                error_code="invalid_dataset",
                error_message='line 3: “invalid” JSON\n\ttab \\ quote "',
                finished_at=started + timedelta(microseconds=120000),
                plan={"memory": {"total": 1.5e9, "small": 1e-07, "ratio": 0.1}, "notes": [{"message": "ok"}]},
                result={"train_loss": 1.25, "nan": None},
                input_digests={"dataset": "ab" * 32},
                trainable_params=123,
                total_params=4567,
                trained_tokens=89,
            )
        )
        session.execute(
            update(Job).where(Job.id == plain).values(user_metadata=None, result=None, plan=null())
        )
        python = {
            job_id: json.loads(encode(job_answer(session.execute(job_reads.JOB, {"job_id": job_id, "team_id": team_id}).one())))
            for job_id in (queued, running, failed, plain)
        }  # fmt: skip
    assert python[queued]["queue"]["position"] >= 1 and python[running]["progress"]["total_steps"] == 5
    assert python[running]["placement"]["gpu_indices"] == [2, 3] and python[failed]["error"]["code"]
    for job_id, expected in python.items():
        assert client.get(f"/v1/jobs/{job_id}").json() == expected, job_id
    listed = {job["id"]: job for job in client.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    for job_id, expected in python.items():
        assert listed[job_id] == expected | {"queue": None}, job_id  # a page shows no queue places


def test_metrics_come_by_split_and_step_with_nan_as_null(team_client, settings):
    client, _, dataset = team_client
    job = submit(client, dataset)
    with session_scope(settings.database_url) as session:
        for step in (3, 1, 2):
            session.add(JobMetric(job_id=job["id"], attempt=1, split="train", step=step, loss=1.0 / step))
        session.add(JobMetric(job_id=job["id"], attempt=1, split="eval", step=2, loss=math.nan))
    curves = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in curves["train"]] == [1, 2, 3]
    assert curves["train"][1]["loss"] == 0.5 and curves["train"][1]["attempt"] == 1
    assert curves["eval"][0]["loss"] is None
    empty = submit(client, dataset)
    assert client.get(f"/v1/jobs/{empty['id']}/metrics").json() == {
        "job_id": empty["id"],
        "train": [],
        "eval": [],
    }
    assert client.get("/v1/jobs/ftjob-nope/metrics").status_code == 404


def test_without_its_database_the_api_answers_503_with_retry_after(settings, api_key):
    # A database URL where nothing listens: what the API sees while PostgreSQL is down.
    away = settings.model_copy(update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    with TestClient(create_app(away), headers={"Authorization": f"Bearer {api_key}"}) as client:
        for method, path in (
            ("GET", "/v1/jobs/ftjob-x"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/files"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/fine_tuning/jobs"),
        ):
            response = client.request(method, path, json={"base_model": TINY_MODEL, "dataset": "file-x"})
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "2", path
        assert client.get("/v1/jobs").json()["error"]["code"] == "database_unavailable"
        assert client.get("/healthz").status_code == 200


def test_without_redis_submissions_are_accepted_and_the_sweeper_sends_them(settings, api_key, store):
    from worker.maintenance import resend_lost_jobs

    prefix = f"{settings.queue_prefix}-away-{secrets.token_hex(3)}"
    away = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "queue_prefix": prefix}
    )
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(8))).id
    with TestClient(create_app(away), headers={"Authorization": f"Bearer {api_key}"}) as client:
        job = submit(client, dataset)
    with session_scope(settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert (row.status, row.enqueued_at) == ("validating", None)
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job["id"])).all()
    assert any("broker did not take the job" in message for message in events)
    # Redis is back: the sweeper (every worker runs it) sends what no queue holds.
    back = settings.model_copy(update={"queue_prefix": prefix})
    assert job["id"] in resend_lost_jobs(back)
    assert job["id"] in (queued_messages(back) or "")
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job["id"]).enqueued_at is not None


def test_on_sqlite_the_answers_are_built_from_rows(settings, tmp_path):
    """The embedded default's SQLite has no JOB_ANSWER: the same routes build the answer from the row."""
    from shared.migrate import upgrade
    from shared.schemas import JobSpec
    from shared.services.auth import create_api_key, create_team

    lite = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'tuneforge.db'}"})
    upgrade(lite.database_url)
    started = datetime(2026, 11, 30, 12, 0, 0, 5, tzinfo=UTC)
    spec = JobSpec.model_validate(
        {"base_model": TINY_MODEL, "dataset": "file-a", "hyperparameters": {"max_steps": 8}}
    )
    with session_scope(lite.database_url) as session:
        team_id = create_team(session=session, name="lite").id
        _, key = create_api_key(session=session, settings=lite, team_id=team_id, name="lite")
        session.add(
            Job(
                id="ftjob-lite", team_id=team_id, status="running", method="lora", base_model=TINY_MODEL,
                dataset_uri="s3://b/d.jsonl", spec=spec.model_dump(mode="json"), priority="normal",
                user_metadata={"k": "v"}, attempt=1, result={}, created_at=started, updated_at=started,
            )
        )  # fmt: skip
        session.flush()
        for step in (1, 2):
            at = started + timedelta(seconds=step)
            session.add(
                JobMetric(job_id="ftjob-lite", attempt=1, split="train", step=step, epoch=0.1, created_at=at)
            )
        session.flush()
        expected = json.loads(
            encode(
                job_answer(session.execute(job_reads.JOB, {"job_id": "ftjob-lite", "team_id": team_id}).one())
            )
        )
    assert (
        expected["progress"]["total_steps"] == 8 and expected["created_at"] == "2026-11-30T12:00:00.000005Z"
    )
    with TestClient(create_app(lite), headers={"Authorization": f"Bearer {key}"}) as client:
        one = client.get("/v1/jobs/ftjob-lite")
        assert one.status_code == 200 and one.json() == expected and one.headers["etag"]
        assert client.get("/v1/jobs").json()["data"] == [expected | {"queue": None}]
        assert client.get("/v1/jobs/ftjob-nope").status_code == 404
