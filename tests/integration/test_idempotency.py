"""Idempotency-Key on job and file creation: retries return the first answer, never a second resource."""

import threading

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from shared.db import session_scope
from shared.models import Job
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl


def jobs_tagged(settings, tag: str) -> int:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(Job.user_metadata)).all()
    return sum(1 for metadata in rows if (metadata or {}).get("tag") == tag)


def body(dataset: str, tag: str, **extra) -> dict:
    return {"base_model": TINY_MODEL, "dataset": dataset, "metadata": {"tag": tag}, **extra}


def upload(client) -> str:
    return client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))}).json()["id"]


def test_a_retried_job_creation_returns_the_first_job(api_client, settings):
    dataset = upload(api_client)
    headers = {"Idempotency-Key": "retry-1"}
    first = api_client.post("/v1/jobs", json=body(dataset, "retry-1"), headers=headers)
    again = api_client.post("/v1/jobs", json=body(dataset, "retry-1"), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert jobs_tagged(settings, "retry-1") == 1
    # The key belongs to the team: without it, the same body makes a new job.
    assert api_client.post("/v1/jobs", json=body(dataset, "retry-1")).json()["id"] != first.json()["id"]


def test_the_same_key_with_another_body_is_refused(api_client):
    dataset = upload(api_client)
    headers = {"Idempotency-Key": "changed-body"}
    assert api_client.post("/v1/jobs", json=body(dataset, "a"), headers=headers).status_code == 201
    response = api_client.post("/v1/jobs", json=body(dataset, "b"), headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "Idempotency-Key"


def test_a_failed_request_frees_its_key(api_client, settings):
    dataset = upload(api_client)
    headers = {"Idempotency-Key": "fix-and-retry"}
    refused = api_client.post("/v1/jobs", json=body(dataset, "fix") | {"base_model": "nope"}, headers=headers)
    assert refused.status_code == 422
    fixed = api_client.post("/v1/jobs", json=body(dataset, "fix"), headers=headers)
    assert fixed.status_code == 201
    assert jobs_tagged(settings, "fix") == 1


def test_concurrent_requests_with_one_key_make_one_job(settings, api_key, tiny_model_dir):
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": "race-1"}
    clients = [TestClient(app, headers=headers) for _ in range(4)]
    dataset = upload(clients[0])
    barrier = threading.Barrier(len(clients))
    answers: list[tuple[int, str]] = []

    def submit(client: TestClient) -> None:
        barrier.wait()
        response = client.post("/v1/jobs", json=body(dataset, "race-1"))
        answers.append((response.status_code, response.json().get("id")))

    threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _ in answers] == [201] * 4
    assert len({job_id for _, job_id in answers}) == 1
    assert jobs_tagged(settings, "race-1") == 1


def test_file_uploads_are_idempotent_too(api_client, settings):
    from shared.models import UploadedFile

    headers = {"Idempotency-Key": "upload-1"}
    data = to_jsonl(color_messages(5, seed=9))
    first = api_client.post("/v1/files", files={"file": ("u.jsonl", data)}, headers=headers)
    again = api_client.post("/v1/files", files={"file": ("u.jsonl", data)}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    with session_scope(settings.database_url) as session:
        count = session.scalar(
            select(func.count())
            .select_from(UploadedFile)
            .where(UploadedFile.sha256 == first.json()["sha256"])
        )
    assert count == 1
    other = api_client.post(
        "/v1/files", files={"file": ("u.jsonl", to_jsonl(color_messages(6)))}, headers=headers
    )
    assert other.status_code == 422
    assert other.json()["error"]["param"] == "Idempotency-Key"
