"""Plans before queueing, through a real API and worker: a dry run reports the dataset, the parameters
(counted without weights) and the memory estimate, refuses what cannot work, and a job carries its plan."""

import time

import httpx
import pytest

from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(service, api_key):
    with httpx.Client(
        base_url=service.base_url, timeout=120, headers={"Authorization": f"Bearer {api_key}"}
    ) as c:
        yield c


def spec(dataset: str, **extra) -> dict:
    return {
        "base_model": TINY_MODEL,
        "dataset": dataset,
        "adapter": {"rank": 4, "target_modules": "attention"},
        "hyperparameters": {"max_steps": 3, "batch_size": 2, "max_seq_length": 64},
    } | extra


def test_a_dry_run_reports_and_a_job_carries_the_same_plan(client):
    dataset = client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(12)))}).json()["id"]
    response = client.post("/v1/plans", json=spec(dataset))
    assert response.status_code in (200, 202), response.text
    plan = response.json()
    while plan["status"] == "pending":
        time.sleep(0.5)
        plan = client.get(f"/v1/plans/{plan['id']}").json()
    assert plan["status"] == "ready", plan
    result = plan["result"]
    report = result["datasets"]["dataset"]
    assert report["samples"] == 12 and report["truncated_samples"] == 0
    assert "[[" in report["first_sample"]["text"]  # the trained spans, marked
    assert result["params"]["trainable"] == 2 * 4 * (4 * (64 + 64) - 2 * 32)  # q,o: 64x64; k,v: 64x32
    assert result["memory"]["total"] > result["memory"]["components"]["weights"] > 0

    job = client.post("/v1/jobs", json=spec(dataset)).json()
    deadline = time.monotonic() + 180
    while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job["status"] == "succeeded", job["error"]
    assert job["plan"]["params"]["trainable"] == job["trainable_params"] == result["params"]["trainable"]


def test_refusals_name_what_to_change(client):
    dataset = client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))}).json()["id"]
    # Known from the model's config alone: answered at once.
    too_long = client.post("/v1/plans", json=spec(dataset, hyperparameters={"max_seq_length": 4096}))
    assert too_long.status_code == 422
    assert too_long.json()["error"]["param"] == "hyperparameters.max_seq_length"
    assert (
        client.post("/v1/jobs", json=spec(dataset, hyperparameters={"max_seq_length": 4096})).status_code
        == 422
    )
    # Known once a worker looked at the model: the plan is refused, and so is a job.
    wrong_layers = spec(dataset, adapter={"target_modules": ["c_attn"]})
    refused = client.post("/v1/plans", json=wrong_layers)
    if refused.status_code == 202:
        plan = refused.json()
        while plan["status"] == "pending":
            time.sleep(0.5)
            plan = client.get(f"/v1/plans/{plan['id']}").json()
        assert plan["status"] == "refused"
    else:
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "adapter.target_modules"
    job = client.post("/v1/jobs", json=wrong_layers).json()
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_config" and "c_attn" in job["error"]["message"]
