"""Continuing from a finished job (`init_from`, OpenAI's `model: "ft:..."`), on real PostgreSQL, Redis and S3
with a tiny Llama: the native API and the official `openai` client over the app's TestClient; validation and
training run in this process through the worker's own code."""

import openai
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select, update

from shared.db import session_scope
from shared.models import Artifact, Job, JobEvent
from shared.states import JobStatus
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl
from worker import runner, validation

ADAPTER = {"rank": 4, "target_modules": "attention"}
# A learning rate so small that one step leaves the starting adapter as it was: what the job starts from shows.
STILL = {"max_steps": 1, "learning_rate": 1e-10, "batch_size": 4, "seed": 3}


def upload(api_client) -> str:
    response = api_client.post(
        "/v1/files",
        files={"file": ("colors.jsonl", to_jsonl(color_messages(16)))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(api_client, **body) -> dict:
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def train(settings, job_id: str) -> None:
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    assert runner.run_job(settings, job_id) is JobStatus.succeeded


def stored_weights(settings, store, tmp_path, job_id: str, kind: str, name: str) -> dict[str, torch.Tensor]:
    with session_scope(settings.database_url) as session:
        artifact = session.scalar(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind, Artifact.name == name)
        )
        key, sha = artifact.storage_key, artifact.sha256
    path = tmp_path / f"{job_id}-{kind}-{name.replace('/', '_')}"
    store.get_file(key, path, expected_sha256=sha)
    return load_file(path) if name.endswith(".safetensors") else {"text": path.read_text()}


@pytest.fixture(scope="module")
def source(settings, store, tiny_model_dir):
    """A finished job of the default team: 4 steps, a checkpoint at step 2."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.models import DEFAULT_TEAM_ID
    from shared.services.auth import create_api_key

    with session_scope(settings.database_url) as session:
        _, key = create_api_key(session=session, settings=settings, team_id=DEFAULT_TEAM_ID, name="init")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
        job = submit(
            client,
            base_model=TINY_MODEL,
            dataset=upload(client),
            adapter=ADAPTER,
            hyperparameters={"max_steps": 4, "checkpoint_steps": 2, "learning_rate": 5e-3, "seed": 1},
        )
    train(settings, job["id"])
    return job["id"]


def test_a_job_continues_from_a_finished_adapter_and_from_a_checkpoint(
    api_client, settings, store, tmp_path, source
):
    dataset = upload(api_client)
    # From the final adapter; base_model defaults to the source's.
    from_final = submit(
        api_client, dataset=dataset, adapter=ADAPTER, hyperparameters=STILL, init_from={"job": source}
    )
    assert from_final["base_model"] == TINY_MODEL
    assert from_final["init_from"] == {"job": source, "checkpoint_step": None}
    from_step = submit(
        api_client,
        base_model=TINY_MODEL,
        dataset=dataset,
        method="rslora",  # the scaling may change; the shape may not
        adapter=ADAPTER,
        hyperparameters=STILL,
        init_from={"job": source, "checkpoint_step": 2},
    )
    train(settings, from_final["id"])
    train(settings, from_step["id"])

    final = stored_weights(settings, store, tmp_path, source, "adapter", "adapter_model.safetensors")
    at_step_2 = stored_weights(
        settings, store, tmp_path, source, "checkpoint", "step-00000002/adapter_model.safetensors"
    )
    for job, start in ((from_final, final), (from_step, at_step_2)):
        trained = stored_weights(settings, store, tmp_path, job["id"], "adapter", "adapter_model.safetensors")
        assert trained.keys() == start.keys()
        for name in start:
            torch.testing.assert_close(trained[name], start[name], rtol=1e-6, atol=1e-8)
    # The two starting points differ, so each job really started from its own.
    assert any(not torch.allclose(final[n], at_step_2[n]) for n in final)

    # Lineage: on the job, in its events and in its model card.
    shown = api_client.get(f"/v1/jobs/{from_step['id']}").json()
    assert shown["init_from"] == {"job": source, "checkpoint_step": 2}
    with session_scope(settings.database_url) as session:
        started = session.scalar(
            select(JobEvent).where(JobEvent.job_id == from_step["id"], JobEvent.type == "init_from")
        )
        assert started.message == f"the adapter starts from job {source} at step 2"
    card = stored_weights(settings, store, tmp_path, from_final["id"], "adapter", "README.md")["text"]
    assert f"Continued from Tuneforge job `{source}` (its final adapter)." in card


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"adapter": {"rank": 8, "target_modules": "attention"}}, "adapter.rank", "has rank 4"),
        ({"adapter": {"rank": 4, "target_modules": "all-linear"}}, "adapter.target_modules", "k_proj"),
        ({"method": "dora"}, "method", "without DoRA"),
        ({"init_from": {"checkpoint_step": 3}}, "init_from.checkpoint_step", "its checkpoints: 2"),
        ({"init_from": {"job": "ftjob-000000000000000000000000"}}, "init_from.job", "not found"),
    ],
)
def test_a_source_that_does_not_fit_is_a_422_naming_the_mismatch(api_client, source, change, param, words):
    init = {"job": source} | change.pop("init_from", {})
    body = {"base_model": TINY_MODEL, "dataset": upload(api_client), "adapter": ADAPTER, "init_from": init}
    response = api_client.post("/v1/jobs", json=body | change)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_the_source_must_be_of_the_same_team_on_the_same_base(api_client, settings, make_team, source):
    _, key = make_team()
    body = {"base_model": TINY_MODEL, "dataset": upload(api_client), "adapter": ADAPTER}
    other = api_client.post(
        "/v1/files",
        files={"file": ("colors.jsonl", to_jsonl(color_messages(16)))},
        data={"purpose": "fine-tune"},
        headers={"Authorization": f"Bearer {key}"},
    ).json()["id"]
    response = api_client.post(
        "/v1/jobs",
        json=body | {"dataset": other, "init_from": {"job": source}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "init_from.job"
    assert response.json()["error"]["message"] == f"job {source} not found"  # not: it exists elsewhere

    with session_scope(settings.database_url) as session:  # as if the source had been trained on another base
        session.execute(update(Job).where(Job.id == source).values(base_model="another-model"))
    try:
        response = api_client.post("/v1/jobs", json=body | {"init_from": {"job": source}})
    finally:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == source).values(base_model=TINY_MODEL))
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "base_model"
    assert "was trained on another-model" in response.json()["error"]["message"]


def test_the_openai_client_continues_from_a_fine_tuned_model(api_client, api_key, source):
    client = openai.OpenAI(
        api_key=api_key, base_url=str(api_client.base_url) + "/v1", http_client=api_client, max_retries=0
    )
    training_file = client.files.create(
        file=("colors.jsonl", to_jsonl(color_messages(16))), purpose="fine-tune"
    ).id
    extra = {"tuneforge": {"adapter": ADAPTER}}
    model = client.fine_tuning.jobs.retrieve(source).fine_tuned_model
    assert model.startswith(f"ft:{TINY_MODEL}:") and model.endswith(f":{source}")
    job = client.fine_tuning.jobs.create(model=model, training_file=training_file, extra_body=extra)
    assert job.model == TINY_MODEL
    assert job.tuneforge["init_from"] == {"job": source, "checkpoint_step": None}
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(source).data
    from_checkpoint = client.fine_tuning.jobs.create(
        model=checkpoint.fine_tuned_model_checkpoint, training_file=training_file, extra_body=extra
    )
    assert from_checkpoint.tuneforge["init_from"] == {"job": source, "checkpoint_step": 2}

    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model=f"{model}:ckpt-step-9", training_file=training_file, extra_body=extra
        )
    assert excinfo.value.body["param"] == "model"
    assert "no checkpoint at step 9" in excinfo.value.body["message"]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model="ft:nonsense", training_file=training_file)
    assert excinfo.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model=model, training_file=training_file, extra_body={"tuneforge": {"adapter": {"rank": 2}}}
        )
    assert excinfo.value.body["param"] == "tuneforge.adapter.rank"
