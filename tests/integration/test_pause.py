"""Pause and resume through the native API and the official `openai` client, on real PostgreSQL, Redis and
S3 (the app's TestClient; validation and claims run in this process, no training). That a paused and
resumed job trains the same curve and adapter as an uninterrupted one is in test_reliability.py."""

import openai
import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Attempt, Job, JobEvent
from shared.states import JobStatus
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl
from worker import runner, validation


@pytest.fixture
def queued_job(api_client, settings) -> str:
    upload = api_client.post(
        "/v1/files",
        files={"file": ("colors.jsonl", to_jsonl(color_messages(12)))},
        data={"purpose": "fine-tune"},
    ).json()
    body = {"base_model": TINY_MODEL, "dataset": upload["id"], "hyperparameters": {"max_steps": 3}}
    created = api_client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # Still validating: there is nothing to pause yet.
    early = api_client.post(f"/v1/jobs/{job_id}/pause")
    assert early.status_code == 409
    assert early.json()["error"]["param"] == "job_id"
    assert "validating" in early.json()["error"]["message"]
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    return job_id


def set_status(settings, job_id: str, status: JobStatus) -> None:
    with session_scope(settings.database_url) as session:
        session.get(Job, job_id).status = status.value


def test_a_queued_job_is_held_until_resumed(api_client, settings, queued_job):
    paused = api_client.post(f"/v1/jobs/{queued_job}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    assert api_client.get(f"/v1/jobs/{queued_job}").json()["status"] == "paused"
    # Held: no worker takes it.
    assert runner.run_job(settings, queued_job) is None
    # Pausing it again changes nothing (a retried request is safe).
    again = api_client.post(f"/v1/jobs/{queued_job}/pause")
    assert again.status_code == 200 and again.json()["status"] == "paused"

    resumed = api_client.post(f"/v1/jobs/{queued_job}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "queued"
    twice = api_client.post(f"/v1/jobs/{queued_job}/resume")
    assert twice.status_code == 409
    assert "queued, not paused" in twice.json()["error"]["message"]
    with session_scope(settings.database_url) as session:
        messages = [
            e.message
            for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == queued_job, JobEvent.type == "status")
            )
        ]
    assert any("paused by the user" in m for m in messages)
    assert any("resumed by the user" in m for m in messages)

    # A paused job can be cancelled; a finished one can be neither paused nor resumed.
    api_client.post(f"/v1/jobs/{queued_job}/pause")
    assert api_client.post(f"/v1/jobs/{queued_job}/cancel").json()["status"] == "cancelled"
    for action in ("pause", "resume"):
        refused = api_client.post(f"/v1/jobs/{queued_job}/{action}")
        assert refused.status_code == 409
        assert "already cancelled" in refused.json()["error"]["message"]


def test_a_running_job_is_asked_to_checkpoint_and_keeps_its_gpus_until_then(api_client, settings, queued_job):
    with session_scope(settings.database_url) as session:
        from shared.services import claims

        assert (
            claims.claim_job(session=session, job_id=queued_job, worker_id="w-pause", lease_timeout=30) == 1
        )
    pausing = api_client.post(f"/v1/jobs/{queued_job}/pause")
    assert pausing.status_code == 200, pausing.text
    assert pausing.json()["status"] == "pausing"
    with session_scope(settings.database_url) as session:
        # The attempt still holds its GPUs while it checkpoints; its heartbeat tells the worker to stop.
        attempt = session.scalar(select(Attempt).where(Attempt.job_id == queued_job))
        assert attempt.ended_at is None
        assert claims.renew(session=session, job_id=queued_job, attempt=1).status is JobStatus.pausing
    refused = api_client.post(f"/v1/jobs/{queued_job}/resume")
    assert refused.status_code == 409
    assert "still checkpointing" in refused.json()["error"]["message"]
    assert api_client.post(f"/v1/jobs/{queued_job}/pause").json()["status"] == "pausing"
    # Cancelling wins over a pause in progress.
    assert api_client.post(f"/v1/jobs/{queued_job}/cancel").json()["status"] == "cancelling"


def test_the_openai_client_pauses_and_resumes(api_client, settings, api_key, queued_job):
    client = openai.OpenAI(
        api_key=api_key, base_url=str(api_client.base_url) + "/v1", http_client=api_client, max_retries=0
    )
    paused = client.fine_tuning.jobs.pause(queued_job)
    assert paused.status == "paused" and paused.tuneforge["status"] == "paused"
    assert client.fine_tuning.jobs.retrieve(queued_job).status == "paused"
    resumed = client.fine_tuning.jobs.resume(queued_job)
    assert resumed.status == "queued"
    with pytest.raises(openai.ConflictError) as excinfo:
        client.fine_tuning.jobs.resume(queued_job)
    assert "not paused" in excinfo.value.body["message"]

    set_status(settings, queued_job, JobStatus.running)  # as if a worker had claimed it
    pausing = client.fine_tuning.jobs.pause(queued_job)
    assert pausing.status == "running" and pausing.tuneforge["status"] == "pausing"
    set_status(settings, queued_job, JobStatus.succeeded)
    with pytest.raises(openai.ConflictError) as excinfo:
        client.fine_tuning.jobs.pause(queued_job)
    assert "already succeeded" in excinfo.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.pause("ftjob-000000000000000000000000")
