"""The HTTP API against real PostgreSQL, Redis and S3 (no worker consumes the queue in this module)."""

import json

import pytest
import redis

from shared.queue import validate_queue
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, color_preferences, to_jsonl


@pytest.fixture
def uploaded(api_client) -> dict:
    response = api_client.post(
        "/v1/files",
        files={"file": ("colors.jsonl", to_jsonl(color_messages(12)))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def job_body(dataset: str, **overrides) -> dict:
    return {"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 5}} | overrides


def queued_messages_text(settings) -> str:
    from shared.queue import queued_messages as broker_contents

    return broker_contents(settings) or ""


def queued_messages(settings) -> int:
    # kombu keeps one Redis list per priority step: the queue's name, and name + "\x06\x16" + step.
    client = redis.Redis.from_url(settings.broker_url)
    return sum(client.llen(key) for key in client.scan_iter(f"{validate_queue(settings)}*"))


def test_health_and_readiness(api_client):
    assert api_client.get("/healthz").json() == {"status": "ok"}
    ready = api_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok", "broker": "ok"}


def test_models_come_from_the_registry(api_client):
    models = api_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [TINY_MODEL]


def test_upload_checks_every_line_and_stores_the_file(api_client, uploaded, store):
    assert uploaded["format"] == "messages"
    assert uploaded["num_samples"] == 12
    assert uploaded["id"].startswith("file-")
    content = api_client.get(f"/v1/files/{uploaded['id']}/content")
    assert content.content == to_jsonl(color_messages(12))
    assert content.headers["x-checksum-sha256"] == uploaded["sha256"]
    assert api_client.get("/v1/files").json()["data"][0]["id"] == uploaded["id"]


def test_upload_with_bad_lines_names_them(api_client):
    body = b'{"text": "ok"}\n{"text": 3}\nnot json\n{"text": "ok"}\n'
    response = api_client.post("/v1/files", files={"file": ("bad.jsonl", body)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "file"
    assert "line 2: 'text' must be a string, got number" in error["message"]
    assert "line 3: invalid JSON" in error["message"]


def test_empty_upload_and_bad_purpose(api_client):
    assert api_client.post("/v1/files", files={"file": ("e.jsonl", b"")}).json()["error"]["param"] == "file"
    response = api_client.post(
        "/v1/files", files={"file": ("x.jsonl", b'{"text":"a"}')}, data={"purpose": "chat"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "purpose"


def test_create_job_fills_defaults_and_enqueues_after_commit(api_client, uploaded, settings):
    before = queued_messages(settings)
    response = api_client.post("/v1/jobs", json=job_body(uploaded["id"], metadata={"team": "search"}))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "validating"
    assert job["adapter"] == {
        "rank": 16,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "use_dora": False,
        "use_rslora": False,
    }
    assert job["hyperparameters"]["max_steps"] == 5
    assert job["hyperparameters"]["learning_rate"] == 2e-4
    assert job["metadata"] == {"team": "search"}
    assert queued_messages(settings) == before + 1
    waiting = queued_messages_text(settings)
    assert job["id"] in waiting
    assert api_client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"adapter": {"rank": 0}}, "adapter.rank"),
        ({"adapter": {"rank": 1025}}, "adapter.rank"),
        ({"adapter": {"alpha": 0}}, "adapter.alpha"),
        ({"adapter": {"dropout": 1.0}}, "adapter.dropout"),
        ({"method": "prefix-tuning"}, "method"),
        ({"resources": {"cpu_offload": True}}, "resources"),
        ({"method": "merge"}, "dataset"),
        ({"base_model": "gpt-17"}, "base_model"),
        ({"dataset": "ftp://example.com/data.jsonl"}, "dataset"),
        ({"dataset": "file-000000000000000000000000"}, "dataset"),
        ({"validation_dataset": "gopher://x"}, "validation_dataset"),
        ({"hyperparameters": {"epochs": 1, "max_steps": 3}}, "hyperparameters"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"resources": {"gpus": 8}}, "resources.gpus"),
        ({"unexpected": True}, "unexpected"),
        ({"method": "dpo"}, "dataset"),  # a messages dataset: dpo needs preference pairs
        ({"method": "dpo", "dpo": {"beta": -1}}, "dpo.beta"),
        ({"method": "dpo", "hyperparameters": {"max_steps": 5, "packing": True}}, "hyperparameters.packing"),
        ({"dpo": {"beta": 0.1}}, "dpo"),
    ],
)
def test_bad_jobs_answer_422_naming_the_field(api_client, uploaded, change, param):
    response = api_client.post("/v1/jobs", json=job_body(uploaded["id"]) | change)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_preference_pairs_upload_and_make_a_dpo_job(api_client):
    rows = color_preferences(6, shape="messages")
    response = api_client.post("/v1/files", files={"file": ("pairs.jsonl", to_jsonl(rows))})
    assert response.status_code == 201, response.text
    pairs = response.json()
    assert pairs["format"] == "preference" and pairs["num_samples"] == 6
    bad = to_jsonl([*rows[:2], {"prompt": "p", "chosen": "same", "rejected": "same"}])
    response = api_client.post("/v1/files", files={"file": ("bad.jsonl", bad)})
    assert response.status_code == 422
    assert "line 3: 'chosen' and 'rejected' are the same answer" in response.json()["error"]["message"]

    body = job_body(
        pairs["id"], method="dpo", adapter={"use_dora": True}, dpo={"beta": 0.2, "loss_type": "hinge"}
    )
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["method"] == "dpo" and job["adapter"]["use_dora"] is True
    assert job["dpo"] == {"beta": 0.2, "loss_type": "hinge", "label_smoothing": None}
    assert job["hyperparameters"]["learning_rate"] == 5e-5
    # The same pairs cannot train a supervised method.
    response = api_client.post("/v1/jobs", json=job_body(pairs["id"], method="lora"))
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset"
    assert "use method dpo" in response.json()["error"]["message"]


def test_missing_dataset_and_malformed_body(api_client):
    response = api_client.post("/v1/jobs", json={"base_model": TINY_MODEL})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset"
    response = api_client.post("/v1/jobs", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_listing_is_newest_first_with_cursor_and_status_filter(api_client, uploaded):
    ids = [api_client.post("/v1/jobs", json=job_body(uploaded["id"])).json()["id"] for _ in range(5)]
    api_client.post(f"/v1/jobs/{ids[0]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api_client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert [i for i in seen if i in ids] == list(reversed(ids))
    assert len(seen) == len(set(seen))
    cancelled = api_client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
    assert ids[0] in [j["id"] for j in cancelled]
    assert all(j["status"] == "cancelled" for j in cancelled)
    assert api_client.get("/v1/jobs", params={"cursor": "garbage!"}).json()["error"]["param"] == "cursor"
    assert api_client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422


def test_cancel_before_start_is_immediate_and_final(api_client, uploaded):
    job = api_client.post("/v1/jobs", json=job_body(uploaded["id"])).json()
    cancelled = api_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = api_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    events = api_client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events] == ["created", "status"]
    assert events[-1]["data"]["status"] == "cancelled"


def test_unknown_ids_are_404(api_client):
    for path in (
        "/v1/jobs/ftjob-nope",
        "/v1/jobs/ftjob-nope/events",
        "/v1/jobs/ftjob-nope/metrics",
        "/v1/jobs/ftjob-nope/artifacts",
        "/v1/files/file-nope",
        "/v1/files/file-nope/content",
    ):
        response = api_client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert api_client.post("/v1/jobs/ftjob-nope/cancel").status_code == 404


def test_events_paginate_in_order(api_client, uploaded):
    job = api_client.post("/v1/jobs", json=job_body(uploaded["id"])).json()
    api_client.post(f"/v1/jobs/{job['id']}/cancel")
    first = api_client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert first["has_more"] is True
    rest = api_client.get(f"/v1/jobs/{job['id']}/events", params={"after": first["next_after"]}).json()
    ids = [e["id"] for e in first["data"] + rest["data"]]
    assert ids == sorted(ids) and len(ids) == 2


def test_openapi_documents_the_job_example(api_client):
    schema = api_client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"]
    assert schema["components"]["schemas"]["JobSpec"]["examples"][0]["method"] == "lora"
    assert json.dumps(schema)  # serialisable
