"""Jobs larger than a node run as Ray Train jobs: on a local Ray cluster of two nodes (one CPU slot each, so
the two ranks land on different nodes), through the real runner, with gloo and DeepSpeed ZeRO. Losses follow
the one-process run, the adapter is complete and loads, failures keep their meaning, and a lost node's job
resumes from its checkpoint."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("ray", reason="Ray is an optional extra of the worker (pip install tuneforge[ray])")

from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Attempt, Job, JobEvent
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset
from worker import runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)
ADAPTER = {"rank": 8, "dropout": 0.0, "target_modules": "attention"}
HP = {"max_steps": 6, "learning_rate": 1e-2, "seed": 11}


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_settings(settings, tiny_model_dir, ray_cluster):
    return settings.model_copy(update={"ray_address": ray_cluster.address, "environment": "test"})


def submit(settings, store, *, nodes: int, zero_stage: int, batch_size: int, **hp) -> str:
    resources = {"gpus": 1, "zero_stage": zero_stage} if nodes == 1 else {"nodes": nodes, "gpus_per_node": 1}
    resources["zero_stage"] = zero_stage
    with session_scope(settings.database_url) as session:
        upload = upload_dataset(session, settings, store, to_jsonl(color_messages(48, seed=5)))
        spec = JobSpec(
            base_model=TINY_MODEL,
            dataset=upload.id,
            adapter=ADAPTER,
            hyperparameters=HP | {"batch_size": batch_size} | hp,
            resources=resources,
        )
        job_id = job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    return job_id


def job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def events(settings, job_id) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        return list(session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id))


def losses(settings, job_id) -> list[float]:
    with session_scope(settings.database_url) as session:
        return [
            m.loss for m in job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)["train"]
        ]


@pytest.fixture(scope="module")
def one_process(ray_settings, store):
    # One process with the global batch of the two-rank runs (2 x 2).
    job_id = submit(ray_settings, store, nodes=1, zero_stage=0, batch_size=4)
    assert runner.run_job(ray_settings, job_id) is JobStatus.succeeded
    return job_id


def test_a_two_node_zero_2_job_follows_one_process_and_saves_a_loadable_adapter(
    ray_settings, store, one_process, tiny_model_dir, tmp_path
):
    job_id = submit(ray_settings, store, nodes=2, zero_stage=2, batch_size=2)
    status = runner.run_job(ray_settings, job_id)
    done = job(ray_settings, job_id)
    assert status is JobStatus.succeeded, (
        done.error_message,
        [e.message for e in events(ray_settings, job_id)][-3:],
    )
    assert losses(ray_settings, job_id) == pytest.approx(
        losses(ray_settings, one_process), rel=1e-4, abs=1e-5
    )
    with session_scope(ray_settings.database_url) as session:
        attempt = session.query(Attempt).filter(Attempt.job_id == job_id).one()
        files = artifact_service.list_artifacts(session=session, team_id=TEAM, job_id=job_id, kind="adapter")
    assert attempt.launcher == "ray"
    folder = tmp_path / "adapter"
    for artifact in files:
        store.get_file(artifact.storage_key, folder / artifact.name, expected_sha256=artifact.sha256)
    weights = load_file(folder / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 4 and all(w.abs().max() > 0 for w in lora_b)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)


def test_a_rank_s_job_failure_decides_the_outcome_on_ray(ray_settings, store):
    settings = ray_settings.model_copy(update={"test_job_failure_on_rank": 1})
    job_id = submit(settings, store, nodes=2, zero_stage=0, batch_size=2)
    assert runner.run_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.attempt == 1 and failed.error_code == "invalid_config"
    assert failed.error_message == "simulated job failure on rank 1 (test hook)"


def test_out_of_memory_on_ray_halves_the_micro_batch(ray_settings, store):
    settings = ray_settings.model_copy(update={"test_oom_above_micro_batch": 1})
    job_id = submit(settings, store, nodes=2, zero_stage=0, batch_size=2, max_steps=2)
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    done = job(settings, job_id)
    assert done.attempt == 1 and done.spec["hyperparameters"]["batch_size"] == 1
    assert [e.type for e in events(settings, job_id)].count("out_of_memory") == 1


def test_cancelling_a_ray_job_stops_it_within_seconds(ray_settings, store):
    job_id = submit(ray_settings, store, nodes=2, zero_stage=0, batch_size=2, max_steps=2000)
    ended: list = []
    thread = threading.Thread(target=lambda: ended.append(runner.run_job(ray_settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 240
    while not losses(ray_settings, job_id):
        assert time.monotonic() < deadline and thread.is_alive(), "the Ray job never trained"
        time.sleep(0.5)
    with session_scope(ray_settings.database_url) as session:
        job_service.cancel_job(session=session, team_id=TEAM, job_id=job_id)
    asked = time.monotonic()
    thread.join(60)
    took = time.monotonic() - asked
    assert ended == [JobStatus.cancelled] and job(ray_settings, job_id).status == "cancelled"
    assert took < 10, took


def test_a_zero_3_job_that_loses_a_node_resumes_from_its_checkpoint_and_follows_one_process(
    ray_settings, ray_cluster, store, one_process, tiny_model_dir, tmp_path
):
    from shared.models import Checkpoint

    settings = ray_settings.model_copy(update={"max_attempts": 2, "retry_backoff_seconds": 0.0})
    job_id = submit(settings, store, nodes=2, zero_stage=3, batch_size=2, checkpoint_steps=3)
    ended: list = []
    thread = threading.Thread(target=lambda: ended.append(runner.run_job(settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        with session_scope(settings.database_url) as session:
            if session.query(Checkpoint).filter(Checkpoint.job_id == job_id).count():
                break
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was stored"
        time.sleep(0.2)
    # The second node goes away with the rank it ran: the Ray job fails, the attempt ends as a crash.
    ray_cluster.remove_node(next(iter(ray_cluster.worker_nodes)))
    thread.join(240)
    assert ended == [JobStatus.queued], job(settings, job_id).error_message
    ray_cluster.add_node(num_cpus=1)  # a replacement node
    ray_cluster.wait_for_nodes()
    with session_scope(settings.database_url) as session:
        [step] = [c.step for c in session.query(Checkpoint).filter(Checkpoint.job_id == job_id)]
        files = {
            a.name
            for a in artifact_service.list_artifacts(
                session=session, team_id=TEAM, job_id=job_id, kind="checkpoint"
            )
        }
    # Every rank's ZeRO shard is in the stored checkpoint, not only rank 0's.
    shards = {name for name in files if "zero_pp_rank_" in name}
    assert any("zero_pp_rank_0_" in n for n in shards) and any("zero_pp_rank_1_" in n for n in shards), files
    assert runner.run_job(settings, job_id) is JobStatus.succeeded, job(settings, job_id).error_message
    done = job(settings, job_id)
    assert done.attempt == 2
    assert any(e.type == "resume" and e.attempt == 2 for e in events(settings, job_id))
    with session_scope(settings.database_url) as session:
        points = job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)["train"]
    assert [p.step for p in points] == list(range(1, HP["max_steps"] + 1))
    assert {p.attempt for p in points if p.step > step} == {2} and {
        p.attempt for p in points if p.step <= step
    } == {1}
    # Resumed across the lost node, the ZeRO-3 run still follows the one-process curve.
    assert [p.loss for p in points] == pytest.approx(losses(settings, one_process), rel=1e-4, abs=1e-5)
    with session_scope(settings.database_url) as session:
        adapter = artifact_service.list_artifacts(
            session=session, team_id=TEAM, job_id=job_id, kind="adapter"
        )
    folder = tmp_path / "adapter"
    for artifact in adapter:
        store.get_file(artifact.storage_key, folder / artifact.name, expected_sha256=artifact.sha256)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
