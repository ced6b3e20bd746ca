"""Chaos, bounded and in the suite: a worker killed with SIGKILL or stopped with SIGTERM mid-training, Redis
flushed while jobs wait, PostgreSQL restarted during a run, workers racing for one job. Real API, real
Celery workers, real Redis, PostgreSQL and S3; the figures are printed for the RELIABILITY notes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
import redis
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Checkpoint, Job, JobEvent
from shared.queue import TRAIN_TASK, enqueue, train_queue
from tests.conftest import TINY_MODEL, ServiceProcesses, make_settings
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e
CHAOS_REDIS_DB = 12  # flushed by one test: a database of its own


@pytest.fixture(scope="module")
def chaos(work_dir, pg_url, s3_server, tiny_model_dir, tmp_path_factory, api_key):
    settings = make_settings(
        work_dir=work_dir,
        pg_url=pg_url,
        redis_url=f"redis://127.0.0.1:6379/{CHAOS_REDIS_DB}",
        s3=s3_server,
        # Short enough for the test to see a lost worker within seconds, long enough that a loaded 2-core
        # machine never lets a healthy worker's lease lapse.
        lease_timeout_seconds=15,
        heartbeat_interval_seconds=0.5,
        maintenance_interval_seconds=1,
        resend_grace_seconds=2,
        retry_backoff_seconds=0.5,
        shutdown_grace_seconds=60,
    )
    redis.Redis.from_url(settings.broker_url).flushdb()
    procs = ServiceProcesses(settings, tmp_path_factory.mktemp("chaos-logs"))
    procs.start_api()
    client = httpx.Client(base_url=procs.base_url, timeout=60, headers={"Authorization": f"Bearer {api_key}"})
    try:
        yield settings, procs, client
    finally:
        client.close()
        procs.stop()
        redis.Redis.from_url(settings.broker_url).flushdb()


def submit(client: httpx.Client, steps: int, checkpoint_steps: int | None = None) -> str:
    dataset = client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(32)))}).json()["id"]
    hyper = {"max_steps": steps, "batch_size": 2} | (
        {"checkpoint_steps": checkpoint_steps} if checkpoint_steps else {}
    )
    response = client.post(
        "/v1/jobs", json={"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": hyper}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


def status(client, job_id) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def has_checkpoint(settings, job_id) -> bool:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id).limit(1)) is not None


def events(settings, job_id) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        session.expunge_all()
        return list(rows)


def training_processes(job_id: str) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-f", f"worker.launch .*tuneforge-{job_id}-"], capture_output=True, text=True
    )
    return found.stdout.split()


def test_a_worker_killed_with_sigkill_loses_nothing(chaos):
    settings, procs, client = chaos
    procs.start_worker("victim")
    job_id = submit(client, steps=150, checkpoint_steps=10)
    wait_for(lambda: has_checkpoint(settings, job_id), 180, "no checkpoint")
    procs.kill_hard("victim")
    # The training process dies with its worker (no orphan keeps the GPU).
    wait_for(lambda: not training_processes(job_id), 15, "the training process outlived its worker")
    procs.start_worker("rescuer")
    wait_for(lambda: status(client, job_id)["status"] in ("succeeded", "failed"), 300, "job did not finish")
    procs.stop("rescuer")
    job = status(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    messages = [e.message for e in events(settings, job_id)]
    assert any("stopped heartbeating" in m for m in messages)
    assert any(m.startswith("resuming from checkpoint-") for m in messages)
    steps = [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["train"]]
    assert steps == list(range(1, 151))
    print(f"\n[chaos] SIGKILL: kills survived 1/1, jobs lost 0, attempts {job['attempt']}")


def test_a_worker_stopped_with_sigterm_checkpoints_and_hands_the_job_back(chaos):
    settings, procs, client = chaos
    procs.start_worker("leaver")
    job_id = submit(client, steps=150, checkpoint_steps=50)
    wait_for(lambda: len(client.get(f"/v1/jobs/{job_id}/metrics").json()["train"]) >= 5, 180, "no progress")
    procs.stop("leaver", sig=signal.SIGTERM)
    job = status(client, job_id)
    assert job["status"] == "queued", job
    messages = [e.message for e in events(settings, job_id)]
    assert any("shutting down" in m for m in messages)
    procs.start_worker("successor")
    wait_for(lambda: status(client, job_id)["status"] in ("succeeded", "failed"), 300, "job did not finish")
    procs.stop("successor")
    assert status(client, job_id)["status"] == "succeeded"
    assert any(
        m.startswith("resuming from checkpoint-") for m in (e.message for e in events(settings, job_id))
    )
    print("\n[chaos] SIGTERM: job handed back with a checkpoint and resumed; jobs lost 0")


def test_flushing_redis_while_jobs_wait_loses_no_job(chaos):
    settings, procs, client = chaos
    jobs = [submit(client, steps=3) for _ in range(3)]
    broker = redis.Redis.from_url(settings.broker_url)
    assert broker.dbsize() > 0
    broker.flushdb()  # every queued message is gone; the database still knows the jobs
    procs.start_worker("after-flush")
    wait_for(
        lambda: all(status(client, j)["status"] in ("succeeded", "failed") for j in jobs),
        300,
        "jobs did not run",
    )
    procs.stop("after-flush")
    finished = [status(client, j)["status"] for j in jobs]
    assert finished == ["succeeded"] * 3
    print(f"\n[chaos] Redis FLUSHDB with {len(jobs)} jobs waiting: jobs lost 0")


def test_racing_workers_run_one_attempt(chaos):
    settings, procs, client = chaos
    procs.start_worker("racer-a")
    procs.start_worker("racer-b")
    job_id = submit(client, steps=20)
    wait_for(lambda: status(client, job_id)["status"] != "validating", 60, "not validated")
    with session_scope(settings.database_url) as session:
        priority = session.get(Job, job_id).priority
    # The broker delivers the same job twice more, whatever state it is in by now.
    for _ in range(2):
        assert enqueue(settings, TRAIN_TASK, job_id, train_queue(settings, 1), priority)
    wait_for(lambda: status(client, job_id)["status"] in ("succeeded", "failed"), 300, "job did not finish")
    procs.stop("racer-a")
    procs.stop("racer-b")
    started = [
        e for e in events(settings, job_id) if e.type == "status" and e.data.get("status") == "running"
    ]
    assert status(client, job_id)["status"] == "succeeded"
    history = [(e.attempt, e.message) for e in events(settings, job_id)]
    assert len(started) == 1 and status(client, job_id)["attempt"] == 1, history
    print("\n[chaos] racing workers: duplicate concurrent attempts 0")


@pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None, reason="needs the machine's PostgreSQL cluster tools"
)
def test_restarting_postgres_during_a_run(chaos):
    _, procs, client = chaos
    procs.start_worker("steady")
    job_id = submit(client, steps=120, checkpoint_steps=40)
    wait_for(lambda: len(client.get(f"/v1/jobs/{job_id}/metrics").json()["train"]) >= 5, 180, "no progress")
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True, timeout=120
    )
    wait_for(lambda: status_or_none(client, job_id) in ("succeeded", "failed"), 300, "job did not finish")
    procs.stop("steady")
    job = status(client, job_id)
    assert job["status"] == "succeeded", job
    steps = [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["train"]]
    assert steps == list(range(1, 121)), "metrics were lost while the database restarted"
    print(
        f"\n[chaos] PostgreSQL restart mid-run: job succeeded, attempts {job['attempt']}, metric points lost 0"
    )


def status_or_none(client, job_id) -> str | None:
    try:
        response = client.get(f"/v1/jobs/{job_id}")
    except httpx.TransportError:
        return None
    return response.json()["status"] if response.status_code == 200 else None
