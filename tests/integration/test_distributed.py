"""Multi-GPU jobs as two processes on CPU (gloo): data parallel, DeepSpeed ZeRO-2 and ZeRO-3, through the
real runner. Each saves a complete adapter and follows the single-process loss curve."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job, JobEvent
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL, make_settings
from tests.helpers import color_messages, color_preferences, to_jsonl, upload_dataset
from worker import runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)
# Dropout off: each rank would draw its own masks, and the comparison is about the maths of the split. bf16 off
# too: its default depends on the CPU, and its rounding differs between one batch and two halves of it.
ADAPTER = {"rank": 8, "dropout": 0.0, "target_modules": "attention"}
HP = {"max_steps": 6, "learning_rate": 1e-2, "seed": 11, "bf16": False}


@pytest.fixture(scope="module")
def two_gpu_settings(work_dir, pg_url, redis_url, s3_server, tiny_model_dir):
    settings = make_settings(
        work_dir=work_dir, pg_url=pg_url, redis_url=redis_url, s3=s3_server, max_gpus_per_job=2
    )
    return settings


def run(
    settings,
    store,
    gpus: int,
    zero_stage: int,
    batch_size: int,
    method: str = "lora",
    expect=JobStatus.succeeded,
    hyperparameters: dict | None = None,
    rows: list[dict] | None = None,
    **resources,
) -> str:
    with session_scope(settings.database_url) as session:
        rows = rows if rows is not None else color_messages(48, seed=5)
        upload = upload_dataset(session, settings, store, to_jsonl(rows))
        spec = JobSpec(
            base_model=TINY_MODEL,
            dataset=upload.id,
            method=method,
            adapter=ADAPTER,
            hyperparameters=HP | {"batch_size": batch_size} | (hyperparameters or {}),
            resources={"gpus": gpus, "zero_stage": zero_stage, **resources},
        )
        job_id = job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    status = runner.run_job(settings, job_id)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        events = [
            e.message for e in session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ]
    assert status is expect, (job.error_message, events[-1])
    return job_id


def losses(settings, job_id) -> list[float]:
    with session_scope(settings.database_url) as session:
        return [
            m.loss for m in job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)["train"]
        ]


def download_adapter(settings, store, job_id, folder):
    with session_scope(settings.database_url) as session:
        for artifact in artifact_service.list_artifacts(
            session=session, team_id=TEAM, job_id=job_id, kind="adapter"
        ):
            store.get_file(artifact.storage_key, folder / artifact.name, expected_sha256=artifact.sha256)
    return folder


@pytest.fixture(scope="module")
def single_process_run(two_gpu_settings, store):
    # One process with the global batch of the two-process runs (2 x 2).
    return run(two_gpu_settings, store, gpus=1, zero_stage=0, batch_size=4)


@pytest.mark.parametrize("zero_stage", [0, 2, 3], ids=["data-parallel", "zero-2", "zero-3"])
def test_two_process_jobs_match_one_process_and_save_a_complete_adapter(
    two_gpu_settings, store, single_process_run, tiny_model_dir, tmp_path, zero_stage
):
    settings = two_gpu_settings
    job_id = run(settings, store, gpus=2, zero_stage=zero_stage, batch_size=2)
    reference, split = losses(settings, single_process_run), losses(settings, job_id)
    assert len(split) == HP["max_steps"]
    assert split == pytest.approx(reference, rel=1e-4, abs=1e-5)

    folder = download_adapter(settings, store, job_id, tmp_path / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 4  # q, k, v, o in each of the two layers
    assert all(w.numel() > 0 and w.abs().max() > 0 for w in lora_b), "an empty or untrained LoRA B was saved"
    reference_weights = load_file(
        download_adapter(settings, store, single_process_run, tmp_path / "ref") / "adapter_model.safetensors"
    )
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-3, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, folder)  # loads as it is


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero-2", "zero-3"])
def test_zero_on_one_gpu_runs_under_the_launcher_and_matches(
    two_gpu_settings, store, single_process_run, zero_stage
):
    # DeepSpeed with a single process still needs a process-group environment (it would look for MPI
    # without one): such a job starts under torchrun like a multi-GPU one.
    settings = two_gpu_settings
    job_id = run(settings, store, gpus=1, zero_stage=zero_stage, batch_size=4)
    assert losses(settings, job_id) == pytest.approx(losses(settings, single_process_run), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero-2", "zero-3"])
def test_cpu_offload_under_zero_trains_and_matches(
    two_gpu_settings, store, single_process_run, tmp_path, zero_stage
):
    # resources.cpu_offload: DeepSpeed keeps the optimizer states (and under ZeRO-3 the weights) in CPU memory
    # and steps them there. On this CPU-only machine the step is torch's AdamW (deepspeed_config: DeepSpeed's
    # CPU Adam would be compiled first); the offloaded partitions, their copies and the step must still give
    # the single-process losses and weights.
    settings = two_gpu_settings
    job_id = run(settings, store, gpus=2, zero_stage=zero_stage, batch_size=2, cpu_offload=True)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
    assert job.spec["resources"]["cpu_offload"] is True
    assert job.spec["hyperparameters"]["fused_adamw"] is False
    split = losses(settings, job_id)
    assert len(split) == HP["max_steps"] and split[-1] < split[0]
    assert split == pytest.approx(losses(settings, single_process_run), rel=1e-4, abs=1e-5)
    weights = load_file(
        download_adapter(settings, store, job_id, tmp_path / "adapter") / "adapter_model.safetensors"
    )
    reference = load_file(
        download_adapter(settings, store, single_process_run, tmp_path / "ref") / "adapter_model.safetensors"
    )
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-5)


def test_zero_in_bf16_saves_the_float32_master_weights(two_gpu_settings, store, tmp_path):
    # DeepSpeed's bf16 mode casts the module's weights to bfloat16 and steps float32 masters in the optimizer;
    # the saved adapter must be those masters (as one process saves float32 weights), not the rounded copies.
    settings = two_gpu_settings.model_copy(update={"worker_features": ["bf16"]})  # asked for, so offered
    job_id = run(settings, store, gpus=2, zero_stage=2, batch_size=2, hyperparameters={"bf16": True})
    split = losses(settings, job_id)
    assert len(split) == HP["max_steps"] and split[-1] < split[0]
    weights = load_file(
        download_adapter(settings, store, job_id, tmp_path / "adapter") / "adapter_model.safetensors"
    )
    assert weights and all(w.dtype is torch.float32 for w in weights.values())
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert all(w.abs().max() > 0 for w in lora_b)
    # Trained float32 values: most are not representable in bfloat16.
    assert any(not torch.equal(w, w.bfloat16().float()) for w in lora_b)


def test_dpo_under_zero_3_on_two_processes_follows_one_process(two_gpu_settings, store):
    # Each rank scores its own pairs against the reference (its adapter switched off); the mean loss over the
    # two ranks' pairs is the one process's loss over all of them.
    # In float32: the margins DPO's loss compares are small differences of log-probabilities.
    settings, pairs = two_gpu_settings, color_preferences(48, seed=5, shape="messages")
    one = run(settings, store, gpus=1, zero_stage=0, batch_size=4, method="dpo", rows=pairs)
    two = run(settings, store, gpus=2, zero_stage=3, batch_size=2, method="dpo", rows=pairs)
    reference, split = losses(settings, one), losses(settings, two)
    assert len(split) == HP["max_steps"] and reference[0] == pytest.approx(0.693147, abs=1e-5)
    assert split == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_qlora_under_zero_3_on_two_processes_follows_one_process(
    two_gpu_settings, store, tiny_model_dir, tmp_path
):
    # The 4-bit weights are stored in the compute dtype (quant storage), so ZeRO-3 can partition them like any
    # other parameter; the split run must still train the same adapter.
    settings = two_gpu_settings
    one = run(settings, store, gpus=1, zero_stage=0, batch_size=4, method="qlora")
    two = run(settings, store, gpus=2, zero_stage=3, batch_size=2, method="qlora")
    reference, split = losses(settings, one), losses(settings, two)
    print(f"qlora losses, one process: {reference}\nqlora losses, ZeRO-3 x 2: {split}")
    assert len(split) == HP["max_steps"] and split[-1] < split[0]
    assert split == pytest.approx(reference, rel=1e-4, abs=1e-5)

    folder = download_adapter(settings, store, two, tmp_path / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 4 and all(w.abs().max() > 0 for w in lora_b)
    reference_weights = load_file(
        download_adapter(settings, store, one, tmp_path / "ref") / "adapter_model.safetensors"
    )
    assert weights.keys() == reference_weights.keys()
    # Adam divides by the root of the squared gradient, so an element whose gradient is near zero turns a
    # rounding difference of the 4-bit matmuls into a visible step; 1e-3 is a tenth of one step at lr 1e-2.
    for name, value in weights.items():
        torch.testing.assert_close(value.float(), reference_weights[name].float(), rtol=1e-3, atol=1e-3)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)


def test_a_rank_s_job_failure_decides_the_outcome_under_torchrun(two_gpu_settings, store):
    # Rank 1 fails the job; rank 0 is killed by torchrun while it waits for rank 1, and torchrun exits 1.
    settings = two_gpu_settings.model_copy(update={"environment": "test", "test_job_failure_on_rank": 1})
    job_id = run(settings, store, gpus=2, zero_stage=0, batch_size=2, expect=JobStatus.failed)
    with session_scope(settings.database_url) as session:
        failed = session.get(Job, job_id)
    assert failed.attempt == 1 and failed.error_code == "invalid_config"
    assert failed.error_message == "simulated job failure on rank 1 (test hook)"


def test_out_of_memory_on_two_processes_halves_the_micro_batch(two_gpu_settings, store):
    settings = two_gpu_settings.model_copy(update={"environment": "test", "test_oom_above_micro_batch": 1})
    job_id = run(settings, store, gpus=2, zero_stage=0, batch_size=2)
    with session_scope(settings.database_url) as session:
        done = session.get(Job, job_id)
        oom = (
            session.query(JobEvent).filter(JobEvent.job_id == job_id, JobEvent.type == "out_of_memory").all()
        )
    assert done.attempt == 1 and len(oom) == 1
    assert done.spec["hyperparameters"]["batch_size"] == 1
    assert done.spec["hyperparameters"]["gradient_accumulation_steps"] == 2


def test_without_the_warm_runtime_a_two_process_job_runs_under_torchrun_and_matches(
    two_gpu_settings, store, single_process_run
):
    # A deployment may turn the warm runtime off: fresh processes under torchrun, the same losses.
    settings = two_gpu_settings.model_copy(update={"warm_runtime": False})
    job_id = run(settings, store, gpus=2, zero_stage=2, batch_size=2)
    assert losses(settings, job_id) == pytest.approx(losses(settings, single_process_run), rel=1e-4, abs=1e-5)
    with session_scope(settings.database_url) as session:
        [started] = session.query(JobEvent).filter(JobEvent.job_id == job_id, JobEvent.type == "worker").all()
    assert started.data["warm"] is False and "fresh training processes" in started.message
