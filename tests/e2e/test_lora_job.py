"""End to end: HTTP -> a real uvicorn API -> Redis -> a real Celery worker process -> LoRA training of a tiny
Llama -> adapter in S3 -> downloaded through the API, checked by sha256, loaded with PeftModel."""

import hashlib
import io
import tarfile
import time

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")


@pytest.fixture
def client(service, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=service.base_url, timeout=60, headers=headers) as http:
        yield http


def upload(client: httpx.Client, rows: list[dict]) -> str:
    response = client.post("/v1/files", files={"file": ("train.jsonl", to_jsonl(rows))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_lora_job_end_to_end(client, service, tiny_model_dir, tmp_path):
    train = upload(client, color_messages(64, seed=1))
    valid = upload(client, color_messages(16, seed=2))
    response = client.post(
        "/v1/jobs",
        json={
            "base_model": TINY_MODEL,
            "dataset": train,
            "validation_dataset": valid,
            "adapter": {"rank": 8, "alpha": 16},
            "hyperparameters": {"max_steps": 30, "learning_rate": 5e-3, "batch_size": 8, "eval_steps": 10},
        },
    )
    assert response.status_code == 201, response.text
    job = wait_for(client, response.json()["id"], TERMINAL)
    assert job["status"] == "succeeded", (job, service.log("worker")[-3000:])
    # The job names the exact content it trained on.
    assert job["dataset_sha256"] == {
        "dataset": hashlib.sha256(to_jsonl(color_messages(64, seed=1))).hexdigest(),
        "validation_dataset": hashlib.sha256(to_jsonl(color_messages(16, seed=2))).hexdigest(),
    }

    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    statuses = [e["data"].get("status") for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert {"created", "dataset", "model", "worker"} <= {e["type"] for e in events}

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    losses = [m["loss"] for m in metrics["train"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses  # training loss fell
    assert [m["step"] for m in metrics["eval"]] == [10, 20, 30]
    assert metrics["eval"][-1]["loss"] < metrics["eval"][0]["loss"]

    listing = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    # Besides the adapter: TensorBoard event files, and the evaluation (prompts from the validation set).
    assert {a["kind"] for a in listing["data"]} == {"adapter", "tensorboard", "evaluation"}
    evaluation = client.get(f"/v1/jobs/{job['id']}/evaluation").json()
    assert [s["source"] for s in evaluation["samples"]] == ["validation"] * 4
    assert all(isinstance(s["base"], str) and isinstance(s["adapter"], str) for s in evaluation["samples"])
    assert evaluation["perplexity"]["after"] < evaluation["perplexity"]["before"]
    assert job["result"]["validation_perplexity_after"] == evaluation["perplexity"]["after"]
    recorded = {a["name"]: a["sha256"] for a in listing["data"] if a["kind"] == "adapter"}
    # The adapter's archive was stored with it: on S3 its URL redirects there.
    assert client.get(listing["archive_url"]).status_code == 307
    archive = client.get(listing["archive_url"], follow_redirects=True)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    adapter_dir = tmp_path / f"{job['id']}-adapter"
    for name, sha in recorded.items():
        assert hashlib.sha256((adapter_dir / name).read_bytes()).hexdigest() == sha, name
    sums = (adapter_dir / "SHA256SUMS").read_text()
    assert all(f"{sha}  {name}" in sums for name, sha in recorded.items())

    single = client.get(f"/v1/jobs/{job['id']}/artifacts/adapter/adapter_config.json")
    assert single.headers["x-checksum-sha256"] == recorded["adapter_config.json"]
    redirect = client.get(
        f"/v1/jobs/{job['id']}/artifacts/adapter/adapter_model.safetensors", params={"redirect": True}
    )
    assert redirect.status_code == 307
    assert (
        hashlib.sha256(httpx.get(redirect.headers["location"]).content).hexdigest()
        == recorded["adapter_model.safetensors"]
    )

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter_dir)(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_cancel_stops_a_running_job_within_seconds(client, service):
    train = upload(client, color_messages(32))
    job_id = client.post(
        "/v1/jobs",
        json={"base_model": TINY_MODEL, "dataset": train, "hyperparameters": {"max_steps": 100000}},
    ).json()["id"]
    wait_for(client, job_id, {"running"}, timeout=120)
    deadline = time.monotonic() + 60
    while not client.get(f"/v1/jobs/{job_id}/metrics").json()["train"] and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelling = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelling["status"] == "cancelling"
    asked = time.monotonic()
    job = wait_for(client, job_id, TERMINAL, timeout=30)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 10
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []


def test_malformed_dataset_fails_the_job_with_the_line(client, service, store):
    store.put_bytes("datasets/e2e-bad.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"txt": "typo"}\n')
    job_id = client.post(
        "/v1/jobs", json={"base_model": TINY_MODEL, "dataset": f"s3://{BUCKET}/datasets/e2e-bad.jsonl"}
    ).json()["id"]
    job = wait_for(client, job_id, TERMINAL, timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_dataset"
    assert "line 3" in job["error"]["message"]


def test_events_stream_until_the_job_ends(client, service):
    train = upload(client, color_messages(8))
    job_id = client.post(
        "/v1/jobs", json={"base_model": TINY_MODEL, "dataset": train, "hyperparameters": {"max_steps": 2}}
    ).json()["id"]
    seen = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events/stream", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
    assert seen[0] == "created" and seen[-1] == "end"
    assert "status" in seen
