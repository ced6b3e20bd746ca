"""The GPU pool, measured (figures, not tests). Each section runs on a PostgreSQL database of its own.

    .venv/bin/python bench/pool.py --section makespan   # a node of 4 slots vs 1 slot, 8 real tiny jobs
    .venv/bin/python bench/pool.py --section fairness   # 3 teams on 4 GPUs, 30 virtual minutes
    .venv/bin/python bench/pool.py --section scale      # 1,000 simulated nodes x 8 slots, 100,000 queued jobs
    .venv/bin/python bench/pool.py                      # all three

makespan: the real node agent (worker/node.py) with 4 slots runs 8 one-slot jobs of about 20 steps of the tiny
  Llama; the concurrency over time comes from the attempts' start and end times; then the same 8 jobs on 1
  slot. On a machine without GPUs a slot is one training process, so the gain is bounded by the cores.
fairness: the real claim and accounting code in virtual time (as tests/integration/test_gpu_pool.py), longer.
scale: simulated node workers (no training) against one PostgreSQL holding 100,000 queued jobs of 20 teams. Each
  node claims as worker/node.py does (claims.claim_batch: as many jobs as fit its free slots, in one
  transaction), heartbeats its attempts every heartbeat_interval_seconds (claims.beat), and each claimed job
  "runs" for --job-seconds of real time and ends through the real state machine (jobs.transition). The nodes
  run in --processes processes of --threads threads (real nodes are separate machines; one process would
  measure its own GIL); each thread sleeps until its nodes' next moment (a job's end, a heartbeat, a claim)
  rather than polling them, and each job ends on its own. ANALYZE runs every 30 s, as autovacuum would.
  Reports the claims/s offered (slots / mean job seconds) and done, claim calls/s, call latency percentiles,
  ends/s, heartbeats/s and the teams' shares of the GPU-seconds their attempts held. On a 2-core machine the
  simulated nodes and PostgreSQL share the CPU; the nodes run at --nice 10, so PostgreSQL gets it first.

Each section ends with `name value` lines; the last lines of the run repeat them all.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import multiprocessing
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psycopg  # noqa: E402

PG_ADMIN = os.environ.get("TUNEFORGE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
FIGURES: list[tuple[str, float]] = []


def figure(name: str, value: float) -> None:
    FIGURES.append((name, value))
    print(f"{name} {value:g}", flush=True)


def fresh_database(name: str) -> str:
    from shared.migrate import upgrade

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    return url


def settings_for(url: str, home: Path, **values):
    from shared.settings import Settings

    return Settings(
        environment="test",
        home=home,
        database_url=url,
        broker_url=os.environ.get("TUNEFORGE_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
        storage_backend="local",
        queue_prefix=f"bench{secrets.token_hex(3)}",
        **values,
    )


def make_teams(settings, names: list[str], max_running: int = 100_000) -> dict[str, str]:
    from shared.db import session_scope
    from shared.models import Team

    ids = {}
    with session_scope(settings.database_url) as session:
        for name in names:
            team = Team(id=f"team-{secrets.token_hex(6)}", name=name, max_running_jobs=max_running)
            session.add(team)
            ids[name] = team.id
    return ids


# ------------------------------------------------------------------------------------------------ makespan


def makespan() -> None:
    from shared.db import session_scope
    from shared.models import Attempt, Job
    from shared.schemas import JobSpec
    from shared.services import jobs as job_service
    from shared.services.files import store_upload
    from shared.storage import make_store
    from tests.helpers import color_messages, corpus, to_jsonl
    from worker.node import NodeAgent
    from worker.training.toy_models import build_llama
    from worker.validation import validate_job

    home = Path(tempfile.mkdtemp(prefix="tuneforge-pool-bench-"))
    model = build_llama(home / "tiny-llama", corpus=corpus())
    url = fresh_database("tuneforge_bench_makespan")
    settings = settings_for(
        url,
        home,
        cache_dir=home / "cache",
        models={"tiny": {"location": f"file://{model}"}},
        claim_poll_seconds=0.2,
        heartbeat_interval_seconds=1.0,
    )
    store = make_store(settings)
    store.ensure_bucket()

    def submit(count: int) -> list[str]:
        ids = []
        for _ in range(count):
            with session_scope(url) as session:
                import io

                upload = store_upload(
                    session=session,
                    settings=settings,
                    store=store,
                    team_id="team-default",
                    filename="d.jsonl",
                    purpose="fine-tune",
                    source=io.BytesIO(to_jsonl(color_messages(32))),
                )
                spec = JobSpec(
                    base_model="tiny", dataset=upload.id, hyperparameters={"max_steps": 20, "batch_size": 4}
                )
                ids.append(
                    job_service.create_job(
                        session=session, settings=settings, store=store, team_id="team-default", spec=spec
                    ).id
                )
            assert validate_job(settings, ids[-1]).value == "queued"
        return ids

    def run(slots: int) -> tuple[float, int, list[int]]:
        jobs = submit(8)
        agent = NodeAgent(settings, [str(i) for i in range(slots)]).start()
        try:
            while True:
                with session_scope(url) as session:
                    done = session.query(Job).filter(Job.id.in_(jobs), Job.status == "succeeded").count()
                if done == len(jobs):
                    break
                time.sleep(0.5)
        finally:
            agent.stop(timeout=60)
        with session_scope(url) as session:
            attempts = [
                (a.started_at, a.ended_at) for a in session.query(Attempt).filter(Attempt.job_id.in_(jobs))
            ]
        start, end = min(a for a, _ in attempts), max(b for _, b in attempts)
        timeline = []
        moment = start
        while moment <= end:
            timeline.append(sum(1 for a, b in attempts if a <= moment < b))
            moment += timedelta(seconds=1)
        return (end - start).total_seconds(), max(timeline), timeline

    four, most, timeline = run(4)
    print("running at once, second by second (4 slots):", " ".join(map(str, timeline)), flush=True)
    one, _, _ = run(1)
    figure("makespan_4_slots_s", round(four, 1))
    figure("makespan_1_slot_s", round(one, 1))
    figure("makespan_speedup", round(one / four, 2))
    figure("max_running_at_once", most)
    figure("mean_running_at_once_4_slots", round(statistics.mean(timeline), 2))


# ------------------------------------------------------------------------------------------------ fairness


def fairness(minutes: int = 30) -> None:
    from shared.db import session_scope
    from shared.models import PRIORITY_RANK, Job
    from shared.schemas import JobSpec
    from shared.services import claims
    from shared.services import jobs as job_service
    from shared.services.claims import NodeCapacity
    from shared.states import JobStatus

    url = fresh_database("tuneforge_bench_fairness")
    settings = settings_for(url, Path(tempfile.mkdtemp()))
    teams = make_teams(settings, ["alpha", "beta", "gamma"])
    rng = random.Random(3)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    mix = {"alpha": (1, 20, 40, 200), "beta": (2, 40, 90, 80), "gamma": (1, 30, 90, 120)}
    duration, gpus_of, team_of = {}, {}, {}
    with session_scope(url) as session:
        for name, team_id in teams.items():
            gpus, short, long, count = mix[name]
            for i in range(count):
                spec = JobSpec(base_model="tiny", dataset="file-x", resources={"gpus": gpus})
                job = Job(
                    id=f"ftjob-{secrets.token_hex(12)}",
                    team_id=team_id,
                    status="queued",
                    method="lora",
                    base_model="tiny",
                    spec=spec.model_dump(mode="json"),
                    priority="normal",
                    priority_rank=PRIORITY_RANK["normal"],
                    gpus=gpus,
                    nodes=1,
                    attempt=0,
                    result={},
                    created_at=t0 + timedelta(milliseconds=i),
                )
                session.add(job)
                duration[job.id], gpus_of[job.id], team_of[job.id] = rng.uniform(short, long), gpus, name
    now, end, busy, started, used = (
        t0 + timedelta(seconds=1),
        t0 + timedelta(minutes=minutes),
        {},
        {},
        defaultdict(float),
    )
    while now < end:
        for job_id in {j for j in busy.values() if started[j] + timedelta(seconds=duration[j]) <= now}:
            with session_scope(url) as session:
                job_service.transition(session=session, job_id=job_id, to=JobStatus.succeeded, now=now)
            used[team_of[job_id]] += gpus_of[job_id] * (now - started[job_id]).total_seconds()
            busy = {g: j for g, j in busy.items() if j != job_id}
        while True:
            node = NodeCapacity("bench-node", 4, tuple(g for g in range(4) if g not in busy), host="bench")
            with session_scope(url) as session:
                got = claims.claim_next(session=session, settings=settings, node=node, now=now)
            if got is None:
                break
            started[got.job_id] = now
            busy.update({g: got.job_id for g in got.gpu_indices})
        with session_scope(url) as session:
            claims.beat(
                session=session, node=NodeCapacity("bench-node", 4, (), host="bench"), leases=[], now=now
            )
        now += timedelta(seconds=5)
    for job_id in set(busy.values()):
        used[team_of[job_id]] += gpus_of[job_id] * (end - started[job_id]).total_seconds()
    total = sum(used.values())
    for name in teams:
        figure(f"fair_share_{name}", round(used[name] / total, 4))
    figure("fair_share_max_deviation_pct", round(max(abs(used[n] / total - 1 / 3) * 300 for n in teams), 2))


# --------------------------------------------------------------------------------------------------- scale


def scale(
    nodes: int = 1000,
    slots: int = 8,
    queued: int = 100_000,
    teams_count: int = 20,
    seconds: float = 45,
    processes: int = 4,
    threads: int = 6,
    job_seconds: tuple[float, float] = (6.0, 12.0),
    warmup: float = 15.0,
    nice: int = 10,
) -> None:
    from sqlalchemy import text

    from shared.db import engine_for, session_scope
    from shared.schemas import JobSpec

    url = fresh_database("tuneforge_bench_claims")
    settings = settings_for(url, Path(tempfile.mkdtemp()))
    teams = list(make_teams(settings, [f"team{i:02d}" for i in range(teams_count)]).values())
    spec = JobSpec(base_model="tiny", dataset="file-x").model_dump(mode="json")
    started = time.perf_counter()
    engine = engine_for(url)
    with engine.begin() as conn:
        # 100,000 queued jobs, spread over the teams, 1-GPU and a few 2- and 4-GPU ones, some high priority.
        raw = conn.connection.dbapi_connection
        with (
            raw.cursor() as cursor,
            cursor.copy(
                "COPY jobs (id, team_id, status, method, base_model, spec, priority, priority_rank, gpus, nodes, "
                "attempt, runtime_seconds, result, metadata, created_at, updated_at, validation_tries) FROM STDIN"
            ) as copy,
        ):
            rng = random.Random(1)
            base = datetime.now(UTC) - timedelta(hours=1)
            import json as _json

            spec_text = _json.dumps(spec)
            for i in range(queued):
                priority = "high" if rng.random() < 0.02 else "normal"
                gpus = rng.choice((1, 1, 1, 1, 1, 1, 2, 4))
                moment = base + timedelta(milliseconds=i)
                copy.write_row(
                    (
                        f"ftjob-{i:024x}",
                        teams[i % teams_count],
                        "queued",
                        "lora",
                        "tiny",
                        spec_text,
                        priority,
                        0 if priority == "high" else 1,
                        gpus,
                        1,
                        0,
                        0.0,
                        "{}",
                        "{}",
                        moment,
                        moment,
                        0,
                    )
                )
        conn.execute(text("ANALYZE"))
    print(f"loaded {queued} queued jobs in {time.perf_counter() - started:.1f}s", flush=True)

    # The simulated nodes run in several processes (each a few threads, one connection pool), as real nodes
    # are separate machines: one process would measure its own GIL, not the claims.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    node_ids = [f"sim-node-{i:04d}" for i in range(nodes)]
    begin_at = time.time() + 8.0  # every process starts claiming at the same moment, after its imports
    workers = [
        context.Process(
            target=_claim_process,
            args=(
                url,
                str(settings.home),
                node_ids[i::processes],
                slots,
                threads,
                begin_at,
                seconds,
            ),
            kwargs={"results": results, "job_seconds": job_seconds, "nice": nice},
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    # Autovacuum is off on these machines; where it runs, it analyzes a table once a tenth of its rows changed
    # (every 20-40 s here). This stands in for it, so that the plans are those of a database whose statistics
    # know how many jobs run (they were taken with every job queued). Its CPU counts as PostgreSQL's.
    analyzing = threading.Event()

    def analyze_now_and_then() -> None:
        moments = itertools.chain((begin_at + 5.0,), itertools.count(begin_at + warmup, 30.0))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for moment in moments:
                if analyzing.wait(max(0.0, moment - time.time())):
                    return
                conn.execute(text("ANALYZE jobs, attempts, teams, nodes, gpu_usage"))

    analyzer = threading.Thread(target=analyze_now_and_then, daemon=True)
    analyzer.start()
    # CPU spent in the steady window by this database's PostgreSQL backends and by the simulated nodes.
    time.sleep(max(0.0, begin_at + warmup - time.time()))
    cpu_before = _cpu_seconds(url.rsplit("/", 1)[1], [w.pid for w in workers])
    time.sleep(max(0.0, begin_at + seconds - 0.3 - time.time()))
    cpu_after = _cpu_seconds(url.rsplit("/", 1)[1], [w.pid for w in workers])
    calls: list[tuple[float, float, int]] = []  # (seconds since the start, latency, jobs claimed)
    claimed: dict[str, int] = defaultdict(int)
    ended = beats = errors = 0
    for _ in workers:
        # A process that broke (its traceback is above) would leave this waiting forever: give up instead.
        mine, teams_claimed, finished, beaten, failures = results.get(timeout=seconds + 120)
        calls.extend(mine)
        ended += finished
        beats += beaten
        errors += failures
        for team, count in teams_claimed.items():
            claimed[team] += count
    for worker in workers:
        worker.join()
    analyzing.set()
    analyzer.join()
    # The first `warmup` seconds fill an empty pool (a burst of 1,000 nodes claiming at once); the steady
    # state after it claims as fast as jobs end.
    steady = sorted(latency for at, latency, _ in calls if at >= warmup)
    per_second: dict[int, int] = defaultdict(int)
    for at, _, jobs in calls:
        per_second[int(at)] += jobs
    with session_scope(url) as session:
        # What each team's attempts held, ended or still running (the buckets lag running attempts by up to
        # usage.CHARGE_EVERY_SECONDS, which is most of a short run).
        held = text(
            "SELECT team_id, sum(gpus * extract(epoch FROM coalesce(ended_at, now()) - started_at)) "
            "FROM attempts GROUP BY team_id"
        )
        shares = {team: float(seconds) for team, seconds in session.execute(held)}
    total = sum(shares.values()) or 1.0
    window = seconds - warmup
    figure("offered_claims_per_s", round(nodes * slots / statistics.mean(job_seconds), 1))
    figure("claims_per_s", round(sum(jobs for at, _, jobs in calls if at >= warmup) / window, 1))
    figure("claim_calls_per_s", round(len(steady) / window, 1))
    figure("claim_p50_ms", round(1000 * steady[len(steady) // 2], 2))
    figure("claim_p99_ms", round(1000 * steady[int(len(steady) * 0.99)], 2))
    figure("burst_claims_per_s", max(per_second.values()))
    steady_jobs = sum(jobs for at, _, jobs in calls if at >= warmup - 0.3) or 1
    figure("pg_cpu_ms_per_claim", round(1000 * (cpu_after[0] - cpu_before[0]) / steady_jobs, 3))
    figure("nodes_cpu_ms_per_claim", round(1000 * (cpu_after[1] - cpu_before[1]) / steady_jobs, 3))
    figure("scale_ends_per_s", round(ended / seconds, 1))
    figure("scale_heartbeats_per_s", round(beats / seconds, 1))
    figure("scale_failed_operations", errors)  # claims, ends and heartbeats that raised (a deadlock, say)
    figure(
        "scale_teams_share_max_deviation_pct",
        round(max(abs(v / total - 1 / teams_count) * 100 * teams_count for v in shares.values()), 2),
    )
    figure("scale_queued_jobs", queued)
    figure("scale_nodes", nodes)


def _cpu_seconds(database: str, pids: list[int]) -> tuple[float, float]:
    """CPU seconds used so far by the PostgreSQL backends serving `database` and by processes `pids` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: str) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    backends = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command.startswith("postgres:") and f" {database} " in command:
                backends += used(entry.name)
    return backends, sum(used(str(pid)) for pid in pids)


def _claim_process(
    url: str,
    home: str,
    node_ids: list[str],
    slots: int,
    threads_count: int,
    begin_at: float,
    seconds: float,
    *,
    results,
    job_seconds: tuple[float, float],
    nice: int,
) -> None:
    """One process of simulated nodes: each node claims through the real claim code whenever it has free slots,
    and each claimed job "runs" for a few seconds, then ends through the real state machine."""
    sys.path.insert(0, str(ROOT))
    from shared.db import session_scope
    from shared.services import claims
    from shared.services import jobs as job_service
    from shared.services.claims import NodeCapacity
    from shared.states import JobStatus

    settings = settings_for(url, Path(home))
    # Real nodes are other machines: here the simulated ones yield the CPU to PostgreSQL, whose backends would
    # otherwise be descheduled while holding the row locks other claims wait for.
    os.nice(nice)
    calls: list[tuple[float, float, int]] = []
    claimed: dict[str, int] = defaultdict(int)
    ended, beats, errors = [0], [0], [0]
    lock = threading.Lock()

    def failed(what: str) -> None:
        """Counts a failed operation; the first few are shown with their error."""
        with lock:
            errors[0] += 1
            if errors[0] <= 3:
                print(f"{what} failed: {traceback.format_exc(limit=1)}", file=sys.stderr, flush=True)

    time.sleep(max(0.0, begin_at - time.time()))
    start = time.monotonic()
    start_perf = time.perf_counter()
    stop = start + seconds

    def driver(mine: list[str]) -> None:
        # Each thread drives its nodes from a queue of their next moments (a job's end, a heartbeat, a claim)
        # and sleeps until the next one: polling every node in turn would spend the CPU that the nodes' own
        # claims, ends and heartbeats need (real nodes are separate machines).
        rng = random.Random()
        interval = settings.heartbeat_interval_seconds
        # gpu -> (job, attempt), per node; the events: (when, order, kind, node, job or None).
        busy: dict[str, dict[int, tuple[str, int]]] = {name: {} for name in mine}
        claim_due: dict[str, float] = {}  # each node's next claim, when one is due
        events: list[tuple[float, int, str, str, str | None]] = []
        order = itertools.count()
        now = time.monotonic()

        def claim_at(name: str, at: float) -> None:
            if at < claim_due.get(name, float("inf")):  # an earlier claim replaces a later one
                claim_due[name] = at
                heapq.heappush(events, (at, next(order), "claim", name, None))

        for name in mine:
            claim_at(name, now)
            heapq.heappush(events, (now + rng.uniform(0, interval), next(order), "beat", name, None))

        while events:
            at, _, kind, name, job_id = heapq.heappop(events)
            now = time.monotonic()
            if at > now:
                time.sleep(min(at, stop) - now)
            if time.monotonic() >= stop:
                return
            if kind == "end":
                try:
                    with session_scope(url) as session:
                        job_service.transition(session=session, job_id=job_id, to=JobStatus.succeeded)
                except Exception:  # as the worker does: report the end again shortly
                    failed(f"the end of {job_id}")
                    heapq.heappush(events, (time.monotonic() + 0.05, next(order), "end", name, job_id))
                    continue
                busy[name] = {g: v for g, v in busy[name].items() if v[0] != job_id}
                with lock:
                    ended[0] += 1
                # As worker/node.py: claim again at once when a job ends.
                claim_at(name, time.monotonic())
            elif kind == "beat":
                free = tuple(g for g in range(slots) if g not in busy[name])
                try:
                    with session_scope(url) as session:
                        claims.beat(
                            session=session,
                            node=NodeCapacity(name, slots, free, host=name),
                            leases=sorted(set(busy[name].values())),
                        )
                except Exception:  # as the node does: the next beat tries again (leases have slack)
                    failed(f"a heartbeat of {name}")
                heapq.heappush(events, (time.monotonic() + interval, next(order), "beat", name, None))
                with lock:
                    beats[0] += 1
            else:
                if claim_due.get(name) != at:
                    continue  # replaced by an earlier claim
                del claim_due[name]
                free = tuple(g for g in range(slots) if g not in busy[name])
                if not free:
                    continue  # a job's end claims again
                began = time.perf_counter()
                try:
                    with session_scope(url) as session:
                        # As worker/node.py does: as many jobs as fit the free slots, in one transaction.
                        got = claims.claim_batch(
                            session=session,
                            settings=settings,
                            node=NodeCapacity(name, slots, free, host=name),
                        )
                except Exception:  # as the node does: look again at the next wake-up
                    failed(f"a claim of {name}")
                    claim_at(name, time.monotonic() + settings.claim_poll_seconds)
                    continue
                took = time.perf_counter() - began
                for claim in got:
                    busy[name].update({g: (claim.job_id, claim.attempt) for g in claim.gpu_indices})
                    ends = time.monotonic() + rng.uniform(*job_seconds)
                    heapq.heappush(events, (ends, next(order), "end", name, claim.job_id))
                # As worker/node.py: after a claim that started jobs, claim again at once while GPUs are free;
                # after one that found nothing, wait for the poll interval (there are no broker wake-ups here).
                if not got:
                    claim_at(name, time.monotonic() + settings.claim_poll_seconds)
                elif len(busy[name]) < slots:
                    claim_at(name, time.monotonic())
                with lock:
                    calls.append((began - start_perf, took, len(got)))
                    for claim in got:
                        claimed[claim.team_id] += 1

    threads = [
        threading.Thread(target=driver, args=(node_ids[i::threads_count],)) for i in range(threads_count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((calls, dict(claimed), ended[0], beats[0], errors[0]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--section", choices=["makespan", "fairness", "scale", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long the scale section claims")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=4, help="processes of simulated nodes (scale)")
    parser.add_argument("--threads", type=int, default=6, help="claiming threads per process (scale)")
    parser.add_argument(
        "--job-seconds",
        default="6:12",
        help="how long a simulated job runs, min:max seconds (scale); 6-12 s on 8,000 slots offers about 890 "
        "claims/s once the pool is full (offered_claims_per_s); longer jobs measure claims below saturation",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        help="niceness of the simulated nodes' processes (scale): they leave the CPU to PostgreSQL first",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=15.0,
        help="seconds of filling the empty pool left out of the steady figures",
    )
    args = parser.parse_args()
    if args.section in ("makespan", "all"):
        makespan()
    if args.section in ("fairness", "all"):
        fairness()
    if args.section in ("scale", "all"):
        low, high = (float(x) for x in args.job_seconds.split(":"))
        scale(
            nodes=args.nodes,
            queued=args.queued,
            seconds=args.seconds,
            processes=args.processes,
            threads=args.threads,
            job_seconds=(low, high),
            warmup=args.warmup,
            nice=args.nice,
        )
    print()
    for name, value in FIGURES:
        print(f"{name} {value:g}")


if __name__ == "__main__":
    main()
