"""Resume, retries and limits of the worker, on real PostgreSQL, Redis and S3 with a tiny Llama.

The runner is called in this process (each attempt still trains in its own child process group)."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import timedelta

import pytest
import redis
import torch
from safetensors.torch import load_file
from sqlalchemy import delete, select, update

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Attempt, Checkpoint, Job, JobEvent, JobMetric, Team, utcnow
from shared.queue import queued_messages, train_queue
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import claims, pausing
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL, make_settings
from tests.helpers import color_messages, to_jsonl, upload_dataset
from worker import maintenance, runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)
HP = {"max_steps": 12, "learning_rate": 5e-3, "batch_size": 4, "checkpoint_steps": 3, "seed": 7}


@pytest.fixture
def tuned(work_dir, pg_url, redis_url, s3_server, tiny_model_dir):
    """Settings with short waits, plus any overrides a test asks for."""

    def make(**overrides):
        values = {"retry_backoff_seconds": 0.2, "resend_grace_seconds": 0, "lease_timeout_seconds": 30}
        return make_settings(
            work_dir=work_dir, pg_url=pg_url, redis_url=redis_url, s3=s3_server, **(values | overrides)
        )

    return make


def submit(settings, store, **spec) -> str:
    with session_scope(settings.database_url) as session:
        upload = upload_dataset(session, settings, store, to_jsonl(color_messages(24, seed=3)))
        body = {"base_model": TINY_MODEL, "dataset": upload.id, "hyperparameters": HP} | spec
        job = job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=JobSpec(**body)
        )
        job_id = job.id
    assert validation.validate_job(settings, job_id) is JobStatus.queued, error_of(settings, job_id)
    return job_id


def error_of(settings, job_id) -> str | None:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id).error_message


def job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        found = session.get(Job, job_id)
        session.expunge(found)
        return found


def events(settings, job_id) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        session.expunge_all()
        return list(rows)


def train_losses(settings, job_id) -> dict[int, float]:
    with session_scope(settings.database_url) as session:
        curves = job_service.get_metrics(session=session, team_id=TEAM, job_id=job_id)
        return {m.step: m.loss for m in curves["train"]}


def adapter_weights(settings, store, job_id, tmp_path) -> dict[str, torch.Tensor]:
    with session_scope(settings.database_url) as session:
        artifact = next(
            a
            for a in artifact_service.list_artifacts(
                session=session, team_id=TEAM, job_id=job_id, kind="adapter"
            )
            if a.name == "adapter_model.safetensors"
        )
        key, sha = artifact.storage_key, artifact.sha256
    path = tmp_path / f"{job_id}.safetensors"
    store.get_file(key, path, expected_sha256=sha)
    return load_file(path)


def drop_queued_messages(settings) -> None:
    client = redis.Redis.from_url(settings.broker_url)
    for key in client.scan_iter(f"{settings.queue_prefix}.*"):
        client.delete(key)


def has_checkpoint(settings, job_id) -> bool:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id).limit(1)) is not None


def wait_until(predicate, timeout=120.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


RESUME_HP = HP | {"max_steps": 60, "checkpoint_steps": 5}


@pytest.fixture(scope="module")
def straight_run(work_dir, pg_url, redis_url, s3_server, tiny_model_dir, store):
    """The uninterrupted reference run the resume tests compare against."""
    settings = make_settings(work_dir=work_dir, pg_url=pg_url, redis_url=redis_url, s3=s3_server)
    job_id = submit(settings, store, hyperparameters=RESUME_HP)
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    return job_id


def assert_same_run(settings, store, tmp_path, reference: str, resumed: str) -> None:
    a, b = train_losses(settings, reference), train_losses(settings, resumed)
    assert sorted(a) == sorted(b) == list(range(1, RESUME_HP["max_steps"] + 1))
    # Same data order, RNG and optimizer state after the resume: the curves agree step for step.
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])
    wa = adapter_weights(settings, store, reference, tmp_path)
    wb = adapter_weights(settings, store, resumed, tmp_path)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)


def run_in_thread(settings, job_id) -> tuple[threading.Thread, list]:
    outcome: list[JobStatus | None] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(settings, job_id)))
    thread.start()
    return thread, outcome


def test_a_warm_shutdown_checkpoints_and_the_next_attempt_resumes(tuned, store, tmp_path, straight_run):
    settings = tuned()
    job_id = submit(settings, store, hyperparameters=RESUME_HP)
    thread, outcome = run_in_thread(settings, job_id)
    # Once training is under way, shut the worker down warm: the attempt checkpoints and hands the job back.
    wait_until(lambda: has_checkpoint(settings, job_id))
    runner.SHUTDOWN.set()
    thread.join(timeout=120)
    runner.SHUTDOWN.clear()
    assert outcome == [JobStatus.queued]
    with session_scope(settings.database_url) as session:
        stopped_at = max(
            c.step for c in artifact_service.list_checkpoints(session=session, team_id=TEAM, job_id=job_id)
        )
    assert 5 <= stopped_at < RESUME_HP["max_steps"]
    assert any(e.type == "shutdown" for e in events(settings, job_id))

    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    done = job(settings, job_id)
    assert done.status == "succeeded" and done.attempt == 2
    assert f"checkpoint-{stopped_at}" in next(
        e.message for e in events(settings, job_id) if e.type == "resume"
    )
    assert_same_run(settings, store, tmp_path, straight_run, job_id)


def test_a_paused_then_resumed_job_trains_as_an_uninterrupted_one(tuned, store, tmp_path, straight_run):
    settings = tuned()

    def held() -> tuple[int, int]:  # what the team holds (other tests' jobs of the same team count too)
        with session_scope(settings.database_url) as session:
            team = session.get(Team, TEAM)
            return team.running_jobs, team.running_gpus

    before = held()
    job_id = submit(settings, store, hyperparameters=RESUME_HP)
    thread, outcome = run_in_thread(settings, job_id)
    wait_until(lambda: has_checkpoint(settings, job_id))
    with session_scope(settings.database_url) as session:
        assert pausing.pause_job(session=session, team_id=TEAM, job_id=job_id).status == "pausing"
    # The next heartbeat tells the attempt: it checkpoints, stops, and the job is paused.
    thread.join(timeout=120)
    assert outcome == [JobStatus.paused]
    with session_scope(settings.database_url) as session:
        stopped_at = max(
            c.step for c in artifact_service.list_checkpoints(session=session, team_id=TEAM, job_id=job_id)
        )
        # Its GPUs are given back: the attempt ended, the team holds what it held before.
        attempt = session.scalar(select(Attempt).where(Attempt.job_id == job_id))
        assert attempt.ended_at is not None and attempt.outcome == "paused"
    assert held() == before
    assert 5 <= stopped_at < RESUME_HP["max_steps"]
    assert any(e.type == "pausing" for e in events(settings, job_id))
    assert job(settings, job_id).status == "paused"
    assert runner.run_job(settings, job_id) is None  # paused: no worker takes it

    with session_scope(settings.database_url) as session:
        resumed = pausing.resume_job(session=session, settings=settings, team_id=TEAM, job_id=job_id)
        assert resumed.status == "queued"
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    done = job(settings, job_id)
    assert done.status == "succeeded" and done.attempt == 2
    assert f"checkpoint-{stopped_at}" in next(
        e.message for e in events(settings, job_id) if e.type == "resume"
    )
    assert_same_run(settings, store, tmp_path, straight_run, job_id)


def test_a_killed_attempt_resumes_from_its_last_checkpoint(tuned, store, tmp_path, straight_run):
    settings = tuned(retry_backoff_seconds=0)
    job_id = submit(settings, store, hyperparameters=RESUME_HP)
    thread, outcome = run_in_thread(settings, job_id)
    wait_until(lambda: has_checkpoint(settings, job_id))
    subprocess.run(["pkill", "-9", "-f", f"worker.launch .*tuneforge-{job_id}-"], check=True)
    thread.join(timeout=120)
    assert outcome == [JobStatus.queued]
    assert "crashed (exit code -9)" in events(settings, job_id)[-1].message

    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    assert job(settings, job_id).attempt == 2
    assert_same_run(settings, store, tmp_path, straight_run, job_id)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tuned, store):
    settings = tuned(environment="test", test_oom_above_micro_batch=2)
    job_id = submit(settings, store, hyperparameters=HP | {"batch_size": 8, "max_steps": 3})
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    done = job(settings, job_id)
    hp = JobSpec.model_validate(done.spec).hyperparameters
    assert (hp.batch_size, hp.gradient_accumulation_steps) == (2, 4)
    halvings = [e for e in events(settings, job_id) if e.type == "out_of_memory"]
    assert [(e.data["batch_size"], e.data["gradient_accumulation_steps"]) for e in halvings] == [
        (4, 2),
        (2, 4),
    ]
    assert done.attempt == 1


def test_out_of_memory_at_micro_batch_one_fails_with_advice(tuned, store):
    settings = tuned(environment="test", test_oom_above_micro_batch=0)
    job_id = submit(settings, store, hyperparameters=HP | {"batch_size": 2, "max_steps": 2})
    assert runner.run_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.error_code == "out_of_memory"
    assert "micro-batch 1" in failed.error_message


def test_run_time_limit_counts_every_attempt(tuned, store):
    settings = tuned()
    limit = 60.0  # seconds: max_runtime_minutes=1
    job_id = submit(
        settings, store, hyperparameters=HP | {"max_steps": 100000}, resources={"max_runtime_minutes": 1}
    )
    earlier = 58.0 * 60
    with session_scope(settings.database_url) as session:
        # Earlier attempts already ran 58 minutes, far past the limit.
        session.execute(update(Job).where(Job.id == job_id).values(runtime_seconds=earlier))
    assert runner.run_job(settings, job_id) is JobStatus.failed
    failed = job(settings, job_id)
    assert failed.error_code == "timeout"
    assert "max_runtime_minutes" in failed.error_message
    # The runner's own account of the attempt: its run time was added to the earlier attempts' total, and it
    # was stopped long before it alone had used the limit (the 100000 steps would not end on their own), so
    # the earlier attempts counted.
    this_attempt = failed.runtime_seconds - earlier
    assert 0 < this_attempt < limit, failed.runtime_seconds


def test_crashes_retry_with_back_off_then_fail(tuned, store):
    settings = tuned(max_attempts=2, retry_backoff_seconds=1.0)
    # Bounded: if a kill missed, the attempt would end on its own and the assertions below would fail.
    job_id = submit(settings, store, hyperparameters=HP | {"max_steps": 400})
    kills = []

    def crash_training_when_running():
        try:
            wait_until(
                lambda: (
                    bool(train_losses(settings, job_id))
                    or job(settings, job_id).status in ("failed", "succeeded")
                ),
                300,
            )
        finally:
            done = subprocess.run(["pkill", "-9", "-f", f"worker.launch .*tuneforge-{job_id}-"], check=False)
            kills.append(done.returncode == 0)

    for attempt in (1, 2):
        with session_scope(settings.database_url) as session:  # each attempt starts without metrics
            session.execute(delete(JobMetric).where(JobMetric.job_id == job_id))
        killer = threading.Thread(target=crash_training_when_running)
        killer.start()
        status = runner.run_job(settings, job_id)
        killer.join()
        if attempt == 1:
            assert status is JobStatus.queued
            waiting = job(settings, job_id)
            assert waiting.not_before is not None and waiting.not_before > utcnow()
            # Not before its back-off: a claim is refused; the sweeper sends it once the wait is over.
            assert runner.run_job(settings, job_id) is None
            wait_until(lambda: job(settings, job_id).not_before <= utcnow(), timeout=10)
    assert kills == [True, True]
    failed = job(settings, job_id)
    assert failed.status == "failed" and failed.error_code == "internal_error"
    assert "gave up after 2 attempts" in failed.error_message
    assert "exit code -9" in failed.error_message


def test_reaper_requeues_a_silent_job_and_wakes_the_nodes(tuned, store, redis_url):
    settings = tuned(lease_timeout_seconds=5)
    job_id = submit(settings, store)
    drop_queued_messages(settings)
    with session_scope(settings.database_url) as session:
        attempt = claims.claim_job(session=session, job_id=job_id, worker_id="ghost", lease_timeout=5)
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    assert attempt == 1
    assert job_id in maintenance.reap_stale_jobs(settings)  # (with leftovers of other tests, maybe)
    requeued = job(settings, job_id)
    assert requeued.status == "queued" and requeued.attempt == 1
    assert "stopped heartbeating" in events(settings, job_id)[-1].message
    # Back in the database's queue, where nodes find it; a nudge wakes them, and the sweeper has nothing to add.
    assert job_id in (queued_messages(settings) or "")
    assert job_id not in maintenance.resend_lost_jobs(settings)
    assert train_queue(settings, 1).endswith(".train.g1")


def test_reaper_fails_a_silent_job_out_of_attempts(tuned, store):
    settings = tuned(lease_timeout_seconds=5, max_attempts=1)
    job_id = submit(settings, store)
    with session_scope(settings.database_url) as session:
        claims.claim_job(session=session, job_id=job_id, worker_id="ghost", lease_timeout=5)
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    maintenance.reap_stale_jobs(settings)
    failed = job(settings, job_id)
    assert failed.status == "failed" and failed.error_code == "worker_lost"


def test_reaper_pauses_a_pausing_job_whose_worker_vanished(tuned, store):
    settings = tuned(lease_timeout_seconds=5)
    job_id = submit(settings, store)
    with session_scope(settings.database_url) as session:
        claims.claim_job(session=session, job_id=job_id, worker_id="ghost", lease_timeout=5)
        pausing.pause_job(session=session, team_id=TEAM, job_id=job_id)
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    assert job_id in maintenance.reap_stale_jobs(settings)
    paused = job(settings, job_id)
    assert paused.status == "paused" and paused.error_code is None
    assert "paused at its latest checkpoint" in events(settings, job_id)[-1].message


def test_attempts_that_ended_in_a_pause_do_not_use_the_retry_budget(tuned, store):
    settings = tuned(lease_timeout_seconds=5, max_attempts=2)
    job_id = submit(settings, store)

    def claim_and_go_silent() -> None:
        with session_scope(settings.database_url) as session:
            claims.claim_job(session=session, job_id=job_id, worker_id="ghost", lease_timeout=5)
            session.execute(
                update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60))
            )

    claim_and_go_silent()  # attempt 1 is paused
    with session_scope(settings.database_url) as session:
        pausing.pause_job(session=session, team_id=TEAM, job_id=job_id)
    maintenance.reap_stale_jobs(settings)
    with session_scope(settings.database_url) as session:
        pausing.resume_job(session=session, settings=settings, team_id=TEAM, job_id=job_id)
    claim_and_go_silent()  # attempt 2 is lost: the first failure, one of two
    maintenance.reap_stale_jobs(settings)
    assert (job(settings, job_id).status, job(settings, job_id).attempt) == ("queued", 2)
    claim_and_go_silent()  # attempt 3 is lost: the second failure
    maintenance.reap_stale_jobs(settings)
    failed = job(settings, job_id)
    assert failed.status == "failed" and "gave up after 2 attempts" in failed.error_message
