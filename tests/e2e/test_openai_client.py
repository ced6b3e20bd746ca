"""End to end through the official `openai` client: a real uvicorn API and a real Celery worker train the tiny
Llama with LoRA; the client uploads, creates, polls, and reads results, events and checkpoints."""

import csv
import io
import secrets
import time

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_until_finished(client: openai.OpenAI, job_id: str, timeout: float = 300) -> tuple[object, list[str]]:
    """Polls with retrieve, as OpenAI's examples do; returns the job and the statuses seen on the way."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in TERMINAL:
            return job, seen
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {seen[-1]} after {timeout}s")


def test_openai_client_end_to_end(service, make_team):
    team_name = f"e2e-openai-{secrets.token_hex(3)}"
    _, key = make_team(team_name)
    client = openai.OpenAI(api_key=key, base_url=service.base_url + "/v1")

    train = client.files.create(
        file=("train.jsonl", to_jsonl(color_messages(64, seed=1))), purpose="fine-tune"
    )
    valid = client.files.create(
        file=("valid.jsonl", to_jsonl(color_messages(16, seed=2))), purpose="fine-tune"
    )
    assert train.status == "processed" and train.num_samples == 64

    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=valid.id,
        suffix="colors",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 8, "learning_rate_multiplier": 25}},
        },
        extra_body={
            "tuneforge": {
                "adapter": {"rank": 8, "alpha": 16},
                "hyperparameters": {"max_steps": 12, "eval_steps": 6, "checkpoint_steps": 4},
            }
        },
    )
    assert job.status == "validating_files"
    assert job.hyperparameters.learning_rate_multiplier == 25.0

    done, seen = wait_until_finished(client, job.id)
    assert done.status == "succeeded", (done, service.log("worker")[-3000:])
    assert seen[-1] == "succeeded" and set(seen) <= {"validating_files", "queued", "running", "succeeded"}
    assert done.fine_tuned_model == f"ft:{TINY_MODEL}:{team_name}:colors:{job.id}"
    assert done.trained_tokens > 0
    assert done.finished_at >= done.created_at
    assert done.error is None

    # The results file: OpenAI's metrics CSV, one row per step; the loss fell.
    [results_id] = done.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(results_id).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    losses = [float(r["train_loss"]) for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert [r["step"] for r in rows if r["valid_loss"]] == ["6", "12"]
    assert client.files.retrieve(results_id).purpose == "fine-tune-results"

    # Events, newest first, through the client's auto-pagination.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))
    ids = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert ids == sorted(ids, reverse=True)
    statuses = [e.data["status"] for e in events if e.tuneforge_type == "status"]
    assert statuses == ["succeeded", "running", "queued"]
    assert {"created", "dataset", "model", "checkpoint"} <= {e.tuneforge_type for e in events}

    # Checkpoints before the last step, latest first; each downloads as a tar of the training state.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert [c.step_number for c in checkpoints] == [8, 4]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-8"
    assert checkpoints[0].metrics.train_loss > 0
    archive = httpx.get(
        service.base_url + checkpoints[0].download_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"

    # The training file is free again once the job has finished.
    assert client.files.delete(train.id).deleted is True
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == train.id
