"""Claims, leases and fenced writes on real PostgreSQL: one attempt owns a job at a time."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job, utcnow
from shared.schemas import JobSpec
from shared.services import claims
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset

TEAM = TeamID(DEFAULT_TEAM_ID)


@pytest.fixture
def queued_job(settings, store) -> str:

    with session_scope(settings.database_url) as session:
        upload = upload_dataset(session, settings, store, to_jsonl(color_messages(4)))
        spec = JobSpec(base_model=TINY_MODEL, dataset=upload.id)
        job = job_service.create_job(session=session, settings=settings, store=store, team_id=TEAM, spec=spec)
        assert job_service.transition(session=session, job_id=job.id, to=JobStatus.queued)
        return job.id


def claim(settings, job_id, worker="w", lease=30.0):
    with session_scope(settings.database_url) as session:
        return claims.claim_job(session=session, job_id=job_id, worker_id=worker, lease_timeout=lease)


def status_of(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_racing_workers_get_one_attempt(settings, queued_job):
    results: list[int | None] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(claim(settings, queued_job, worker=f"w{i}"))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r is None) == [1] + [None] * 7
    job = status_of(settings, queued_job)
    assert job.status == "running" and job.attempt == 1


def test_a_redelivered_message_does_not_run_a_healthy_job_twice(settings, queued_job):
    assert claim(settings, queued_job) == 1
    # The broker's visibility timeout hands the same message to another worker while the first still beats.
    assert claim(settings, queued_job, worker="other") is None


def test_a_stale_lease_is_taken_over_and_the_old_attempt_fenced(settings, queued_job):
    assert claim(settings, queued_job, worker="first") == 1
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == queued_job).values(heartbeat_at=utcnow() - timedelta(seconds=120))
        )
    assert claim(settings, queued_job, worker="second", lease=60) == 2
    with session_scope(settings.database_url) as session:
        # The first worker comes back: its heartbeat and its finishing write are refused.
        assert claims.heartbeat(session=session, job_id=queued_job, attempt=1) is None
        assert not job_service.transition(
            session=session, job_id=queued_job, to=JobStatus.succeeded, attempt=1
        )
        assert claims.heartbeat(session=session, job_id=queued_job, attempt=2) is JobStatus.running
    assert status_of(settings, queued_job).status == "running"


def test_cancel_of_a_running_job_goes_through_cancelling(settings, queued_job):
    assert claim(settings, queued_job) == 1
    with session_scope(settings.database_url) as session:
        job = job_service.cancel_job(session=session, team_id=TEAM, job_id=queued_job)
        assert job.status == "cancelling"
        assert claims.heartbeat(session=session, job_id=queued_job, attempt=1) is JobStatus.cancelling
        assert job_service.transition(session=session, job_id=queued_job, to=JobStatus.cancelled, attempt=1)
    assert status_of(settings, queued_job).finished_at is not None


def test_another_teams_job_is_not_found(settings, queued_job):
    from shared.errors import NotFound

    with session_scope(settings.database_url) as session, pytest.raises(NotFound):
        job_service.get_job(session=session, team_id=TeamID("team-other"), job_id=queued_job)


def test_metrics_of_a_repeated_step_are_overwritten(settings, queued_job):
    with session_scope(settings.database_url) as session:
        for attempt, loss in ((1, 2.0), (2, 1.5)):
            job_service.record_metric(
                session=session,
                job_id=queued_job,
                attempt=attempt,
                split="train",
                step=3,
                values={"loss": loss},
            )
        curves = job_service.get_metrics(session=session, team_id=TEAM, job_id=queued_job)
    assert [(m.step, m.loss, m.attempt) for m in curves["train"]] == [(3, 1.5, 2)]
