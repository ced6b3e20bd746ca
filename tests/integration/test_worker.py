"""The worker's validation and training code, called directly, on real PostgreSQL and S3 with a tiny Llama."""

import threading
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_messages, color_preferences, color_prompt_completion, to_jsonl, upload_dataset
from worker import runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)


def submit(settings, store, dataset: str | bytes, **spec) -> str:
    with session_scope(settings.database_url) as session:
        if isinstance(dataset, bytes):
            dataset = upload_dataset(session, settings, store, dataset).id
        body = {"base_model": TINY_MODEL, "dataset": dataset, **spec}
        if body.get("validation_dataset") == "same":
            body["validation_dataset"] = dataset
        return job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=JobSpec(**body)
        ).id


def job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_malformed_dataset_fails_validation_with_the_line(settings, store, tiny_model_dir):
    # Written straight to the bucket, so the upload check never saw it.
    store.put_bytes("datasets/broken.jsonl", to_jsonl(color_prompt_completion(5)) + b'{"prompt": "x"}\n')
    job_id = submit(settings, store, f"s3://{BUCKET}/datasets/broken.jsonl")
    assert validation.validate_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.error_code == "invalid_dataset"
    assert "dataset: line 6: missing 'completion'" in failed.error_message


@pytest.mark.parametrize(
    ("rows", "method", "message"),
    [
        (
            color_messages(4),
            "dpo",
            "dataset: method dpo learns from preference pairs, and this dataset is in the ",
        ),
        (color_preferences(4, shape="openai"), "lora", "dataset: this dataset holds preference pairs"),
    ],
)
def test_a_dataset_of_the_wrong_kind_fails_validation(settings, store, tiny_model_dir, rows, method, message):
    # Outside uploads (whose format the API knows), the worker finds the dataset's kind when it reads it.
    store.put_bytes(f"datasets/kind-{method}.jsonl", to_jsonl(rows))
    job_id = submit(settings, store, f"s3://{BUCKET}/datasets/kind-{method}.jsonl", method=method)
    assert validation.validate_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.error_code == "invalid_dataset"
    assert message in failed.error_message


def test_missing_dataset_object_fails_validation(settings, store, tiny_model_dir):
    job_id = submit(settings, store, f"s3://{BUCKET}/datasets/never-written.jsonl")
    assert validation.validate_job(settings, job_id) is JobStatus.failed
    assert job(settings, job_id).error_code == "dataset_not_found"


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_dataset_rewritten_after_validation_is_refused(settings, store, where):
    # Only uploads are immutable: a file or an S3 object can change between validation and the run (or between
    # two attempts), and the job must not train on content nobody checked.
    checked, rewritten = to_jsonl(color_messages(8)), to_jsonl(color_messages(8, seed=3))
    if where == "file":
        path = settings.allowed_file_roots[0] / "rewritten.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(checked)
        uri = f"file://{path}"
    else:
        store.put_bytes("datasets/rewritten.jsonl", checked)
        uri = f"s3://{BUCKET}/datasets/rewritten.jsonl"
    job_id = submit(settings, store, uri, hyperparameters={"max_steps": 1})
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    assert set(job(settings, job_id).input_digests) == {"dataset"}
    if where == "file":
        path.write_bytes(rewritten)
    else:
        store.put_bytes("datasets/rewritten.jsonl", rewritten)

    assert runner.run_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.error_code == "invalid_dataset"
    assert f"dataset: {uri} changed after the job was validated" in failed.error_message


def test_lora_trains_and_uploads_a_loadable_adapter(settings, store, tiny_model_dir, tmp_path):
    data = to_jsonl(color_messages(48))
    job_id = submit(
        settings,
        store,
        data,
        validation_dataset="same",
        adapter={"rank": 8, "target_modules": "attention"},
        hyperparameters={"max_steps": 24, "learning_rate": 5e-3, "batch_size": 8, "eval_steps": 12},
    )
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    assert runner.run_job(settings, job_id) is JobStatus.succeeded

    done = job(settings, job_id)
    assert done.status == "succeeded" and done.attempt == 1 and done.error_code is None
    assert done.result["final_train_loss"] < done.result["first_train_loss"]
    assert done.result["eval_loss"] is not None
    # Throughput and the measured peak memory, reported next to the plan's estimate.
    assert done.result["tokens_per_second"] > 0 and done.trained_tokens > 0
    assert done.result["peak_host_memory_bytes"] > 100 * 2**20
    assert ("peak_gpu_memory_bytes" in done.result) == torch.cuda.is_available()
    with session_scope(settings.database_url) as session:
        curves = job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)
        artifacts = artifact_service.list_artifacts(session=session, team_id=TEAM, job_id=job_id)
    assert [m.step for m in curves["train"]] == list(range(1, 25))
    assert [m.step for m in curves["eval"]] == [12, 24]
    assert all(m.tokens_per_second and m.tokens_per_second > 0 for m in curves["train"][1:])
    with session_scope(settings.database_url) as session:
        events, _ = job_service.list_events(session=session, team_id=TEAM, job_id=job_id)
    memory = [e for e in events if e.type == "memory"]
    assert len(memory) == 1 and memory[0].data["peak_host_bytes"] == done.result["peak_host_memory_bytes"]
    assert memory[0].data["plan_estimate_bytes"] == done.plan["memory"]["total"] > 0
    names = {a.name for a in artifacts}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names

    adapter_dir = tmp_path / "adapter"
    for artifact in artifacts:
        store.get_file(artifact.storage_key, adapter_dir / artifact.name, expected_sha256=artifact.sha256)
    card = (adapter_dir / "README.md").read_text()
    assert "library_name: peft" in card and f"{done.trainable_params:,}" in card and job_id in card

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        after = tuned(inputs).logits
        trainable, total = tuned.get_nb_trainable_parameters()
    assert not torch.allclose(before, after, atol=1e-4)
    # The job reports exactly peft's own parameter count (attention q/k/v/o, r=8, 2 layers).
    assert (done.trainable_params, done.total_params) == (trainable, total)
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32) + 8 * (64 + 32) + 8 * (64 + 64))


def test_bad_target_module_fails_before_queueing_with_an_actionable_message(settings, store, tiny_model_dir):
    job_id = submit(
        settings,
        store,
        to_jsonl(color_messages(4)),
        adapter={"target_modules": ["c_attn"]},
        hyperparameters={"max_steps": 2},
    )
    # The plan made during validation finds it: the job never waits for a GPU.
    assert validation.validate_job(settings, job_id) is JobStatus.failed
    assert runner.run_job(settings, job_id) is None
    failed = job(settings, job_id)
    assert failed.error_code == "invalid_config"
    assert "c_attn" in failed.error_message and "q_proj" in failed.error_message
    assert failed.status == "failed"  # never left running


def test_cancelling_a_running_job_stops_training_within_seconds(settings, store, tiny_model_dir):
    job_id = submit(settings, store, to_jsonl(color_messages(16)), hyperparameters={"max_steps": 5000})
    validation.validate_job(settings, job_id)
    outcome: list[JobStatus | None] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with session_scope(settings.database_url) as session:
            if job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)["train"]:
                break
        time.sleep(0.2)
    with session_scope(settings.database_url) as session:
        assert job_service.cancel_job(session=session, team_id=TEAM, job_id=job_id).status == "cancelling"
    asked = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - asked < 10
    assert outcome == [JobStatus.cancelled]
    cancelled = job(settings, job_id)
    assert cancelled.status == "cancelled"
    with session_scope(settings.database_url) as session:
        assert artifact_service.list_artifacts(session=session, team_id=TEAM, job_id=job_id) == []


def test_a_second_delivery_of_a_finished_job_does_nothing(settings, store, tiny_model_dir):
    job_id = submit(settings, store, to_jsonl(color_messages(4)), hyperparameters={"max_steps": 1})
    validation.validate_job(settings, job_id)
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    assert runner.run_job(settings, job_id) is None
    assert validation.validate_job(settings, job_id) is None
    assert job(settings, job_id).attempt == 1


@pytest.mark.parametrize("fmt", ["prompt_completion", "text"])
def test_other_formats_train(settings, store, tiny_model_dir, fmt):
    rows = color_prompt_completion(16)
    if fmt == "text":
        rows = [{"text": r["prompt"] + r["completion"]} for r in rows]
    job_id = submit(
        settings, store, to_jsonl(rows), hyperparameters={"max_steps": 6, "packing": fmt == "text"}
    )
    validation.validate_job(settings, job_id)
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    assert job(settings, job_id).trained_tokens > 0
