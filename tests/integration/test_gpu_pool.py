"""The GPU pool: which job a node claims (priority, then fair share, then age, among the jobs that fit its free
GPUs), reservations for big jobs, preemption, fairness over time, and a real node worker running several
attempts at once on disjoint GPUs. Claims run against a PostgreSQL database of this module's own, so no
other test's jobs take part."""

from __future__ import annotations

import random
import secrets
import threading
from collections import defaultdict
from datetime import datetime, timedelta

import psycopg
import pytest
from sqlalchemy import select, update

from shared.db import engine_for, session_scope
from shared.migrate import upgrade
from shared.models import PRIORITY_RANK, Attempt, Job, JobEvent, Node, Team, utcnow
from shared.schemas import JobSpec
from shared.services import claims, usage
from shared.services import jobs as job_service
from shared.services.claims import NodeCapacity
from shared.states import JobStatus
from tests.conftest import PG_ADMIN_URL, RUN_ID, TINY_MODEL

STEP = 10  # seconds of virtual time between two looks of the simulated node
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=utcnow().tzinfo)


@pytest.fixture(scope="module")
def pool(settings):
    """Settings on an empty database of this module's own (migrated by Alembic)."""
    name = f"tuneforge_pool_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield settings.model_copy(
        update={
            "database_url": url,
            "reservation_after_seconds": 60.0,
            "fair_share_claim_charge_seconds": 30.0,
        }
    )
    engine_for(url).dispose()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(pool):
    """An empty queue for each test."""
    with session_scope(pool.database_url) as session:
        for table in ("gpu_usage", "attempts", "job_events", "nodes", "jobs"):
            session.execute(Job.metadata.tables[table].delete())
        session.execute(update(Team).values(running_jobs=0, running_gpus=0))
    return pool


def team(settings, name: str, max_running: int | None = None) -> str:
    with session_scope(settings.database_url) as session:
        found = session.scalar(select(Team).where(Team.name == name))
        if found is None:
            found = Team(id=f"team-{secrets.token_hex(6)}", name=name, max_running_jobs=max_running)
            session.add(found)
        found.max_running_jobs = max_running
        return found.id


def queue(
    settings, team_id: str, *, gpus: int = 1, priority: str = "normal", at: datetime = T0, nodes: int = 1
) -> str:
    """A queued job as validation leaves it."""
    resources = {"gpus": gpus} if nodes == 1 else {"nodes": nodes, "gpus_per_node": gpus // nodes}
    spec = JobSpec(base_model=TINY_MODEL, dataset="file-x", priority=priority, resources=resources)
    job = Job(
        id=f"ftjob-{secrets.token_hex(12)}",
        team_id=team_id,
        status=JobStatus.queued.value,
        method=spec.method.value,
        base_model=TINY_MODEL,
        dataset_uri="file-x",
        spec=spec.model_dump(mode="json"),
        priority=priority,
        priority_rank=PRIORITY_RANK[priority],
        gpus=gpus,
        nodes=nodes,
        attempt=0,
        result={},
        created_at=at,
        updated_at=at,
    )
    with session_scope(settings.database_url) as session:
        session.add(job)
    return job.id


def node(name: str = "node-a", total: int = 4, busy: tuple[int, ...] = (), ray: bool = False) -> NodeCapacity:
    free = tuple(i for i in range(total) if i not in busy)
    return NodeCapacity(
        worker_id=name, total_gpus=total, free_gpus=free, host=f"{name}.test", ray_driver_free=ray
    )


def claim(settings, capacity: NodeCapacity, now: datetime = T0):
    with session_scope(settings.database_url) as session:
        return claims.claim_next(session=session, settings=settings, node=capacity, now=now)


def finish(settings, job_id: str, now: datetime) -> None:
    with session_scope(settings.database_url) as session:
        assert job_service.transition(
            session=session,
            job_id=job_id,
            to=JobStatus.succeeded,
            from_=frozenset({JobStatus.running}),
            now=now,
        )


def test_priority_first_then_age_among_jobs_that_fit(db):
    a = team(db, "alpha")
    low = queue(db, a, priority="low", at=T0)
    old = queue(db, a, at=T0 + timedelta(seconds=1))
    new = queue(db, a, at=T0 + timedelta(seconds=2))
    high = queue(db, a, priority="high", at=T0 + timedelta(seconds=3))
    big = queue(db, a, gpus=4, priority="high", at=T0 + timedelta(seconds=4))
    # Three of four GPUs free: the 4-GPU job cannot start, it has not waited long enough for a reservation.
    order = [claim(db, node(busy=(3,)), T0 + timedelta(seconds=10)).job_id for _ in range(3)]
    assert order == [high, old, new]
    assert claim(db, node(busy=(0, 1, 2, 3)), T0 + timedelta(seconds=10)) is None
    assert {low, big} == {j for j in _queued(db)}


def _queued(settings) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job.id).where(Job.status == JobStatus.queued.value)))


def test_a_claim_records_where_the_attempt_runs_and_holds_disjoint_gpus(db):
    a = team(db, "alpha")
    two = queue(db, a, gpus=2)
    one = queue(db, a, gpus=1, at=T0 + timedelta(seconds=1))
    first = claim(db, node(total=4))
    assert (first.job_id, first.gpu_indices, first.launcher) == (two, (0, 1), "torchrun")
    second = claim(db, node(total=4, busy=first.gpu_indices))
    assert (second.job_id, second.gpu_indices, second.launcher) == (one, (2,), "process")
    with session_scope(db.database_url) as session:
        rows = {r.job_id: r for r in session.scalars(select(Attempt))}
        event = session.scalar(select(JobEvent).where(JobEvent.job_id == two, JobEvent.type == "status"))
    assert rows[two].gpu_indices == [0, 1] and rows[two].host == "node-a.test" and rows[two].ended_at is None
    assert "attempt 1 started on node-a (node-a.test, GPUs 0, 1)" in event.message
    finish(db, two, T0 + timedelta(seconds=100))
    with session_scope(db.database_url) as session:
        ended = session.scalar(select(Attempt).where(Attempt.job_id == two))
    assert ended.ended_at is not None and ended.outcome == "succeeded"
    assert ended.charged_gpu_seconds == pytest.approx(2 * 100)


def test_a_heartbeat_charges_running_attempts_once_and_renews_only_live_leases(db):
    a = team(db, "alpha")
    two, one = queue(db, a, gpus=2), queue(db, a, at=T0 + timedelta(seconds=1))
    started = [claim(db, node(total=4), T0), claim(db, node(total=4, busy=(0, 1)), T0)]
    assert [c.job_id for c in started] == [two, one]
    leases = [(two, 1), (one, 1)]

    def beat_at(seconds: int) -> dict:
        with session_scope(db.database_url) as session:
            return claims.beat(
                session=session,
                node=node(total=4, busy=(0, 1, 2)),
                leases=leases,
                now=T0 + timedelta(seconds=seconds),
            )

    with session_scope(db.database_url) as session:
        states = claims.beat(session=session, node=node(total=4, busy=(0, 1, 2)), leases=[(one, 7)], now=T0)
    assert states[one].status is None  # attempt 7 does not hold the job: its lease is not renewed
    with session_scope(db.database_url) as session:
        changed_at = session.scalar(select(Job.updated_at).where(Job.id == two))
    states = beat_at(30)
    assert states[two].status is JobStatus.running and states[one].status is JobStatus.running
    assert states[one].preempt is False and states[one].status is JobStatus.running
    beat_at(30)  # the same moment again charges nothing more
    with session_scope(db.database_url) as session:
        assert usage.team_usage(session, window_seconds=3600, now=T0 + timedelta(seconds=30)) == {
            a: pytest.approx(3 * 30)
        }
        heartbeat = session.scalar(select(Job.heartbeat_at).where(Job.id == two))
        assert heartbeat == T0 + timedelta(seconds=30)
        # A renewed lease is not a change of the job: its answer (updated_at, ETag) stays as it was.
        assert session.scalar(select(Job.updated_at).where(Job.id == two)) == changed_at
        one_changed_at = session.scalar(select(Job.updated_at).where(Job.id == one))
        assert claims.renew(session=session, job_id=one, attempt=1, now=T0 + timedelta(seconds=31)).status
        assert session.scalar(select(Job.heartbeat_at).where(Job.id == one)) == T0 + timedelta(seconds=31)
        assert session.scalar(select(Job.updated_at).where(Job.id == one)) == one_changed_at
        assert session.get(Node, "node-a").busy_gpus == [0, 1, 2]
    beat_at(60)
    finish(db, two, T0 + timedelta(seconds=100))
    with session_scope(db.database_url) as session:
        charged = {r.job_id: r.charged_gpu_seconds for r in session.scalars(select(Attempt))}
        total = usage.team_usage(session, window_seconds=3600, now=T0 + timedelta(seconds=100))
    # The 2-GPU attempt: 100 s in all, whatever the beats charged on the way; the other up to its last beat.
    assert charged == {two: pytest.approx(200), one: pytest.approx(60)}
    assert total == {a: pytest.approx(260)}


def test_fair_share_goes_to_the_team_that_used_the_least(db):
    a, b = team(db, "alpha"), team(db, "beta")
    with session_scope(db.database_url) as session:
        usage.charge(session, a, 5000.0, T0 - timedelta(minutes=5))
    older_a = queue(db, a, at=T0)
    newer_b = queue(db, b, at=T0 + timedelta(seconds=30))
    assert claim(db, node(), T0 + timedelta(minutes=1)).job_id == newer_b
    # Usage outside the sliding window no longer counts: then age decides.
    c = team(db, "gamma")
    with session_scope(db.database_url) as session:
        usage.charge(session, c, 5000.0, T0 - timedelta(hours=3))
    later_c = queue(db, c, at=T0 + timedelta(seconds=10))
    assert claim(db, node(), T0 + timedelta(minutes=1)).job_id == later_c
    assert claim(db, node(), T0 + timedelta(minutes=1)).job_id == older_a


def test_a_burst_of_claims_is_spread_over_teams(db):
    teams = [team(db, name) for name in ("alpha", "beta", "gamma")]
    for i, t in enumerate(teams):
        for j in range(4):
            queue(db, t, at=T0 + timedelta(seconds=i * 10 + j))
    started = [claim(db, node(total=6, busy=tuple(range(k))), T0 + timedelta(minutes=1)) for k in range(6)]
    per_team = defaultdict(int)
    for c in started:
        per_team[c.team_id] += 1
    assert sorted(per_team.values()) == [2, 2, 2]


def test_a_team_at_its_running_limit_waits(db):
    capped, other = team(db, "capped", max_running=1), team(db, "other")
    first = queue(db, capped, at=T0)
    second = queue(db, capped, at=T0 + timedelta(seconds=1))
    theirs = queue(db, other, at=T0 + timedelta(seconds=2))
    assert claim(db, node()).job_id == first
    assert claim(db, node(busy=(0,))).job_id == theirs
    assert claim(db, node(busy=(0, 1))) is None
    finish(db, first, T0 + timedelta(seconds=5))
    assert claim(db, node(busy=(1,)), T0 + timedelta(seconds=6)).job_id == second


def test_a_big_job_gets_a_reservation_and_is_not_starved_by_small_ones(db):
    a, b = team(db, "alpha"), team(db, "beta")
    running = [queue(db, a, at=T0 + timedelta(seconds=i)) for i in range(3)]
    for i in range(3):
        assert claim(db, node(busy=tuple(range(i))), T0 + timedelta(seconds=5)).job_id == running[i]
    big = queue(db, b, gpus=4, at=T0 + timedelta(seconds=10))
    small = [queue(db, a, at=T0 + timedelta(seconds=20 + i)) for i in range(5)]
    # Before the big job has waited reservation_after_seconds, small jobs backfill the free GPU.
    backfilled = claim(db, node(busy=(0, 1, 2)), T0 + timedelta(seconds=30))
    assert backfilled.job_id == small[0]
    finish(db, running[0], T0 + timedelta(seconds=80))
    # Now it has waited: the node reserves itself for it and starts nothing else...
    assert claim(db, node(busy=(1, 2, 3)), T0 + timedelta(seconds=80)) is None
    with session_scope(db.database_url) as session:
        session.add(
            Node(
                id="node-a", host="h", total_gpus=4, busy_gpus=[1, 2, 3], started_at=T0, heartbeat_at=utcnow()
            )
        )
        assert session.get(Job, big).reserved_for == "node-a"
    # ...not even when another GPU frees up; another node may still backfill small jobs.
    finish(db, running[1], T0 + timedelta(seconds=90))
    assert claim(db, node(busy=(2, 3)), T0 + timedelta(seconds=90)) is None
    assert claim(db, node("node-b", total=2), T0 + timedelta(seconds=90)).job_id == small[1]
    for job_id in (running[2], backfilled.job_id):
        finish(db, job_id, T0 + timedelta(seconds=100))
    started = claim(db, node(), T0 + timedelta(seconds=100))
    assert (started.job_id, started.gpu_indices) == (big, (0, 1, 2, 3))


def test_preemption_makes_room_for_a_high_priority_job(db):
    settings = db.model_copy(update={"preemption": True, "reservation_after_seconds": 0.0})
    a, b = team(settings, "alpha"), team(settings, "beta")
    low = [queue(settings, a, priority="low", at=T0 + timedelta(seconds=i)) for i in range(2)]
    normal = queue(settings, a, at=T0 + timedelta(seconds=3))
    for i, job_id in enumerate([normal, *low]):  # priority first
        assert claim(settings, node(total=3, busy=tuple(range(i)))).job_id == job_id
    urgent = queue(settings, b, gpus=2, priority="high", at=T0 + timedelta(seconds=10))
    assert claim(settings, node(total=3, busy=(0, 1, 2)), T0 + timedelta(seconds=11)) is None
    with session_scope(settings.database_url) as session:
        asked = {
            j.id: j.preempt_requested_at
            for j in session.scalars(select(Job).where(Job.id.in_([*low, normal])))
        }
        events = {
            e.job_id: e.message for e in session.scalars(select(JobEvent).where(JobEvent.type == "preempted"))
        }
    # The two low-priority jobs (the youngest first) make room; the normal one keeps running.
    assert asked[low[0]] and asked[low[1]] and asked[normal] is None
    assert f"preempted for high-priority job {urgent}" in events[low[0]]
    assert "preempting 2 lower-priority job(s)" in events[urgent]
    # Their heartbeats tell them; they checkpoint and go back to the queue (the warm-shutdown path).
    with session_scope(settings.database_url) as session:
        state = claims.renew(session=session, job_id=low[0], attempt=1)
    assert state.preempt and state.status is JobStatus.running
    for job_id in low:
        with session_scope(settings.database_url) as session:
            assert job_service.transition(
                session=session, job_id=job_id, to=JobStatus.queued, attempt=1, now=T0 + timedelta(seconds=20)
            )
    started = claim(settings, node(total=3, busy=(2,)), T0 + timedelta(seconds=21))
    assert started.job_id == urgent


def test_jobs_spanning_nodes_go_to_a_node_that_can_drive_ray(db):
    a = team(db, "alpha")
    wide = queue(db, a, gpus=4, nodes=2)
    assert claim(db, node(total=1)) is None  # cannot drive a Ray job: not for this node
    started = claim(db, node(total=1, ray=True))
    assert (started.job_id, started.launcher, started.gpu_indices) == (wide, "ray", ())


def batch(settings, capacity: NodeCapacity, now: datetime = T0) -> list[claims.Claim]:
    with session_scope(settings.database_url) as session:
        return claims.claim_batch(session=session, settings=settings, node=capacity, now=now)


def test_a_batch_claim_fills_a_node_in_the_order_single_claims_would(db):
    teams = [team(db, name) for name in ("alpha", "beta", "gamma")]
    capped = team(db, "capped", max_running=1)
    for i, t in enumerate(teams):
        for j in range(4):
            queue(db, t, gpus=2 if (i, j) == (0, 0) else 1, at=T0 + timedelta(seconds=i * 10 + j))
    capped_jobs = [queue(db, capped, at=T0 - timedelta(minutes=5 - i)) for i in range(3)]
    started = batch(db, node(total=8, busy=(7,)), T0 + timedelta(minutes=1))
    # 7 free GPUs: filled with disjoint GPUs, the capped team once (its limit), the others spread evenly
    # (each pick charges its team for the GPUs it holds, as single claims one after another would).
    assert sum(c.gpus for c in started) == 7
    indices = [i for c in started for i in c.gpu_indices]
    assert sorted(indices) == list(range(7))
    per_team = defaultdict(int)
    for c in started:
        per_team[c.team_id] += c.gpus
    assert per_team[capped] == 1 and [c.job_id for c in started if c.team_id == capped] == capped_jobs[:1]
    assert sorted(per_team[t] for t in teams) == [2, 2, 2]
    with session_scope(db.database_url) as session:
        counts = {t.id: (t.running_jobs, t.running_gpus) for t in session.scalars(select(Team))}
        attempts = {a.job_id: a for a in session.scalars(select(Attempt).where(Attempt.ended_at.is_(None)))}
    assert counts[capped] == (1, 1)
    for t in teams:
        mine = [c for c in started if c.team_id == t]
        assert counts[t] == (len(mine), sum(c.gpus for c in mine))
    assert {c.job_id: list(c.gpu_indices) for c in started} == {j: a.gpu_indices for j, a in attempts.items()}
    # Nothing fits the one GPU left but a 1-GPU job; a batch of a full node starts nothing.
    assert [c.gpus for c in batch(db, node(total=8, busy=tuple(range(7))), T0 + timedelta(minutes=1))] == [1]
    assert batch(db, node(total=8, busy=tuple(range(8))), T0 + timedelta(minutes=1)) == []


def test_racing_batch_claims_take_each_job_once_and_never_overfill_a_node(db):
    teams = [team(db, f"batch-race-{i}", max_running=100) for i in range(3)]
    jobs = {
        queue(db, random.choice(teams), gpus=random.choice((1, 1, 2)), at=T0 + timedelta(milliseconds=i))
        for i in range(40)
    }
    won: list[claims.Claim] = []
    lock = threading.Lock()

    def node_claims(name: str) -> None:
        busy: tuple[int, ...] = ()
        for _ in range(6):
            got = batch(db, node(name, total=8, busy=busy), T0 + timedelta(minutes=1))
            taken = [i for c in got for i in c.gpu_indices]
            assert not set(taken) & set(busy) and len(taken) == len(set(taken))
            busy = (*busy, *taken)
            if len(busy) == 8:
                busy = ()  # the node's jobs ended (their GPUs are free again for this test's purpose)
            with lock:
                won.extend(got)

    threads = [threading.Thread(target=node_claims, args=(f"batcher-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(c.job_id for c in won) == sorted(jobs)  # every job once, none twice
    with session_scope(db.database_url) as session:
        assert len(session.scalars(select(Attempt)).all()) == len(jobs)


def test_racing_nodes_claim_each_job_once(db):
    teams = [team(db, f"race-{i}", max_running=100) for i in range(3)]
    jobs = {queue(db, random.choice(teams), at=T0 + timedelta(milliseconds=i)) for i in range(24)}
    won: list[str] = []
    lock = threading.Lock()

    def node_claims(name: str) -> None:
        for _ in range(12):
            got = claim(db, node(name, total=8), T0 + timedelta(minutes=1))
            if got is not None:
                with lock:
                    won.append(got.job_id)

    threads = [threading.Thread(target=node_claims, args=(f"racer-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(won) == sorted(jobs)  # every job once, none twice
    with session_scope(db.database_url) as session:
        assert (
            session.scalar(select(Attempt.job_id).group_by(Attempt.job_id).having(Attempt.job_id.is_(None)))
            is None
        )
        assert len(session.scalars(select(Attempt)).all()) == len(jobs)


def test_three_teams_share_four_gpus_fairly_and_a_four_gpu_job_starts_in_bounded_time(db):
    """Virtual time over the real claim and accounting code: 3 teams keep work queued (1- and 2-GPU jobs of
    20 to 90 s, a different mix per team) on one node of 4 GPUs for 20 minutes; after 8 minutes a fourth team
    submits a 4-GPU job into the stream of small ones. The node claims whenever GPUs are free and heartbeats
    every STEP seconds."""
    rng = random.Random(7)
    teams = {name: team(db, name) for name in ("alpha", "beta", "gamma")}
    # gpus, shortest and longest run (s), jobs: each team has more work than an equal share of 20 minutes.
    mix = {"alpha": (1, 20, 40, 100), "beta": (2, 40, 90, 40), "gamma": (1, 30, 90, 60)}
    duration: dict[str, float] = {}
    gpus_of: dict[str, int] = {}
    for name, t in teams.items():
        gpus, short, long, count = mix[name]
        for i in range(count):
            job_id = queue(db, t, gpus=gpus, at=T0 + timedelta(seconds=i * 0.01))
            duration[job_id], gpus_of[job_id] = rng.uniform(short, long), gpus
    team_of = {}
    start, end = T0 + timedelta(seconds=1), T0 + timedelta(minutes=20)
    big, big_submitted = None, T0 + timedelta(minutes=8)
    now, busy, ran = start, {}, []  # ran: (job, gpus, from, to)
    started_at: dict[str, datetime] = {}
    while now < end:
        if big is None and now >= big_submitted:
            big = queue(db, team(db, "delta"), gpus=4, at=now)
            duration[big], gpus_of[big] = 60.0, 4
        for job_id in {j for j in busy.values() if started_at[j] + timedelta(seconds=duration[j]) <= now}:
            finish(db, job_id, now)
            ran.append((job_id, started_at[job_id], now))
            busy = {g: j for g, j in busy.items() if j != job_id}
        while (got := claim(db, node(busy=tuple(busy)), now)) is not None:
            started_at[got.job_id], team_of[got.job_id] = now, got.team_id
            busy.update({g: got.job_id for g in got.gpu_indices})
        with session_scope(db.database_url) as session:  # the node's heartbeat charges what ran
            claims.beat(session=session, node=node(busy=tuple(busy)), leases=[], now=now)
        now += timedelta(seconds=STEP)
    assert len(_queued(db)) > 0  # every team still had work waiting at the end
    ran += [(j, started_at[j], end) for j in set(busy.values())]
    used = defaultdict(float)
    for job_id, since, until in ran:
        if job_id != big:
            used[team_of[job_id]] += gpus_of[job_id] * (until - since).total_seconds()
    shares = {name: used[t] / sum(used.values()) for name, t in teams.items()}
    print(f"GPU-second shares over 20 minutes: {shares}")
    for share in shares.values():
        assert abs(share - 1 / 3) <= 0.15 / 3, shares  # within ±15 % of an equal share
    waited = (started_at[big] - big_submitted).total_seconds()
    # It waits for its reservation (60 s), then at most for the longest running job (90 s) to drain the node.
    assert waited <= 60 + 90 + STEP, waited


# --------------------------------------------------------------------------------------- a real node worker


def submit_validated(settings, store, **hyperparameters) -> str:
    from tests.helpers import color_messages, to_jsonl, upload_dataset
    from worker.validation import validate_job

    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(16))).id
        job_id = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id="team-default",
            spec=JobSpec(
                base_model=TINY_MODEL, dataset=dataset, hyperparameters={"batch_size": 4, **hyperparameters}
            ),
        ).id
    assert validate_job(settings, job_id) is JobStatus.queued
    return job_id


def wait_for(condition, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def statuses(settings, job_ids) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())


def test_a_node_runs_jobs_side_by_side_on_disjoint_gpus_and_gets_them_back(db, store, tiny_model_dir):
    import subprocess

    from worker.node import NodeAgent

    settings = db.model_copy(update={"claim_poll_seconds": 0.2, "max_attempts": 1})
    jobs = [submit_validated(settings, store, max_steps=6) for _ in range(2)]
    agent = NodeAgent(settings, ["0", "1"]).start()
    try:
        wait_for(lambda: set(statuses(settings, jobs).values()) == {"succeeded"}, 240)
        with session_scope(settings.database_url) as session:
            attempts = list(session.scalars(select(Attempt).where(Attempt.job_id.in_(jobs))))
            node_row = session.get(Node, settings.worker_id)
        assert len(attempts) == 2 and all(len(a.gpu_indices) == 1 for a in attempts)
        # Two ran at the same time, each on its own GPU; no GPU was ever held by two attempts at once.
        overlapping = [
            (a, b)
            for a in attempts
            for b in attempts
            if a.id < b.id and a.started_at < b.ended_at and b.started_at < a.ended_at
        ]
        assert overlapping and all(a.gpu_indices != b.gpu_indices for a, b in overlapping)
        assert node_row.total_gpus == 2
        wait_for(lambda: agent.allocator.free() == (0, 1), 10)

        # kill -9 of a training process: the attempt ends, its GPU comes back.
        doomed = submit_validated(settings, store, max_steps=400)
        wait_for(
            lambda: statuses(settings, [doomed])[doomed] == "running" and agent.allocator.free() != (0, 1), 60
        )
        wait_for(
            lambda: (
                subprocess.run(
                    ["pkill", "-9", "-f", f"worker.launch .*tuneforge-{doomed}-"], check=False
                ).returncode
                == 0
            ),
            60,
        )
        wait_for(lambda: statuses(settings, [doomed])[doomed] == "failed", 60)
        wait_for(lambda: agent.allocator.free() == (0, 1), 10)
        with session_scope(settings.database_url) as session:
            ended = session.scalar(select(Attempt).where(Attempt.job_id == doomed))
        assert ended.ended_at is not None and ended.outcome == "failed"
    finally:
        agent.stop(timeout=30)
    with session_scope(settings.database_url) as session:
        assert session.get(Node, settings.worker_id) is None  # it left the pool


def test_the_job_shows_where_it_runs_and_while_it_waits_its_place_in_the_queue(db):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.services.auth import create_api_key

    a = team(db, "alpha")
    with session_scope(db.database_url) as session:
        _, key = create_api_key(session=session, settings=db, team_id=a, name="pool")
    first = queue(db, a, at=utcnow() - timedelta(minutes=5))
    second = queue(db, a, gpus=2, at=utcnow() - timedelta(minutes=4))
    urgent = queue(db, a, priority="high", at=utcnow() - timedelta(minutes=1))
    with TestClient(create_app(db), headers={"Authorization": f"Bearer {key}"}) as client:
        waiting = client.get(f"/v1/jobs/{second}").json()
        assert waiting["queue"] == {"position": 3, "gpus": 2, "nodes": 1} and waiting["placement"] is None
        assert client.get(f"/v1/jobs/{urgent}").json()["queue"]["position"] == 1
        started = claim(db, node("gpu-node-7", total=8, busy=(0, 1, 2)), utcnow())
        assert started.job_id == urgent
        running = client.get(f"/v1/jobs/{urgent}").json()
        assert running["queue"] is None
        assert running["placement"] == {
            "worker_id": "gpu-node-7",
            "host": "gpu-node-7.test",
            "gpu_indices": [3],
            "launcher": "process",
        }
        assert client.get(f"/v1/jobs/{first}").json()["queue"]["position"] == 1
        listed = {j["id"]: j for j in client.get("/v1/jobs").json()["data"]}
        assert listed[urgent]["placement"]["gpu_indices"] == [3] and listed[first]["queue"] is None
        [attempt] = client.get(f"/v1/jobs/{urgent}/attempts").json()["data"]
        assert attempt["number"] == 1 and attempt["host"] == "gpu-node-7.test" and attempt["ended_at"] is None
        other_team, other_key = team(db, "stranger"), None
        with session_scope(db.database_url) as session:
            _, other_key = create_api_key(session=session, settings=db, team_id=other_team, name="x")
        stranger = client.get(f"/v1/jobs/{urgent}/attempts", headers={"Authorization": f"Bearer {other_key}"})
        assert stranger.status_code == 404


def test_a_batch_claim_records_each_attempt_and_event_as_a_single_claim_would(db):
    # On PostgreSQL the batch's statement writes the attempts rows and their events itself: the GPU indices
    # handed out in claim order, the launcher and the event's words must be those claims.describe_start gives.
    a = team(db, "alpha")
    two = queue(db, a, gpus=2, at=T0)
    zero = queue(db, a, gpus=1, at=T0 + timedelta(seconds=1))
    wide = queue(db, a, gpus=4, nodes=2, at=T0 + timedelta(seconds=2))
    one = queue(db, team(db, "beta"), gpus=1, at=T0 + timedelta(seconds=3))  # a claim reads 3 jobs a team
    with session_scope(db.database_url) as session:
        job = session.get(Job, zero)
        job.spec = {**job.spec, "resources": {**job.spec["resources"], "zero_stage": 2}}
    capacity = node(total=8, busy=(0, 2, 5, 7), ray=True)
    started = batch(db, capacity, T0 + timedelta(seconds=10))
    launchers = {c.job_id: c.launcher for c in started}
    assert launchers == {two: "torchrun", zero: "torchrun", wide: "ray", one: "process"}
    # The free GPUs handed out in claim order, each job as many as it runs here (none for the Ray job).
    assert [i for c in started for i in c.gpu_indices] == [1, 3, 4, 6]
    assert {c.job_id: len(c.gpu_indices) for c in started} == {two: 2, zero: 1, wide: 0, one: 1}
    with session_scope(db.database_url) as session:
        specs = {job_id: spec for job_id, spec in session.execute(select(Job.id, Job.spec))}
        attempts = {r.job_id: r for r in session.scalars(select(Attempt))}
        events = {
            e.job_id: e
            for e in session.scalars(select(JobEvent).where(JobEvent.type == "status"))
            if e.data.get("status") == "running"
        }
    for c in started:
        launcher, message, data = claims.describe_start(
            c.attempt, c.gpus, c.nodes, specs[c.job_id], c.gpu_indices, capacity.worker_id, capacity.host
        )
        row = attempts[c.job_id]
        assert (row.number, row.worker_id, row.host, row.gpus, row.launcher) == (
            1,
            "node-a",
            "node-a.test",
            c.gpus,
            launcher,
        )
        assert row.gpu_indices == list(c.gpu_indices) and row.started_at == T0 + timedelta(seconds=10)
        assert row.ended_at is None and row.charged_gpu_seconds == 0 and row.log_bytes == 0
        event = events[c.job_id]
        assert (event.message, event.data, event.attempt, event.level) == (message, data, 1, "info")
    assert "driving a Ray Train job on 2 nodes x 2 GPUs" in events[wide].message
