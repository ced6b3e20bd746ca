"""Claiming: which job runs next, decided in the database when a node has free GPUs, and the claim itself,
a compare-and-swap on the job's attempt number that lets exactly one worker run an attempt.

The order among the queued jobs that fit the node's free GPUs: priority first (high, normal, low), then fair
share (the team with the fewest GPU-seconds in the sliding window, shared/services/usage.py), then age. A
team at its running limit waits. The broker cannot see free GPUs or fairness; its messages only wake nodes.

Big jobs are not starved by a stream of small ones: once the best job that this node could ever hold has
waited `reservation_after_seconds` for more GPUs than are free, the node reserves itself for that job and
starts nothing else until enough of its GPUs are free (until then, smaller jobs backfill). With
`preemption` on, a reserved high-priority job also makes the lowest-priority running jobs on that node
checkpoint and go back to the queue.

Every node heartbeats its running attempts in one transaction (`beat`): the lease of each, the GPU-seconds
its team used since, and the node's free and busy GPUs (shown in /metrics).
"""

from __future__ import annotations

import heapq
import random
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Grouping

from shared.models import Attempt, GpuUsage, Job, JobEvent, Node, Team, utcnow
from shared.schemas import JobSpec
from shared.services.jobs import add_event, team_limits
from shared.services.usage import accrue_node, charge_ctes, close_attempt, expire_attempts, minute_of
from shared.settings import Settings
from shared.states import ACTIVE, JobStatus

# How many of each team's best queued jobs a claim looks at (more when some are locked by other claims).
CANDIDATES_PER_TEAM = 3
# How often a claim tries to take its candidates when other claims hold all of them at that moment.
TAKE_TRIES = 3


@dataclass(frozen=True)
class NodeCapacity:
    """A node as a claim sees it."""

    worker_id: str
    total_gpus: int
    free_gpus: tuple[int, ...]
    host: str = field(default_factory=socket.gethostname)
    # Whether this worker can drive one more Ray job now (jobs spanning several nodes run on Ray).
    ray_driver_free: bool = False


@dataclass(frozen=True)
class Claim:
    """An attempt that has just started: the job, its attempt number and the GPUs it holds on the node."""

    job_id: str
    team_id: str
    attempt: int
    gpus: int
    nodes: int
    gpu_indices: tuple[int, ...]
    launcher: str


@dataclass(frozen=True)
class LeaseState:
    """What a heartbeat found: the job's status (None: another attempt owns it), and whether a higher-priority
    job asked this one to make room."""

    status: JobStatus | None
    preempt: bool = False


def launcher_for(spec: JobSpec) -> str:
    """How an attempt's training starts: one process, torchrun's process group, or a Ray Train job."""
    resources = spec.resources
    return launcher_of(resources.nodes, resources.gpus, resources.zero_stage)


def launcher_of(nodes: int, gpus: int, zero_stage: int) -> str:
    """launcher_for, from the three numbers it depends on (a claim reads them without validating the spec)."""
    if nodes > 1:
        return "ray"
    return "torchrun" if gpus > 1 or zero_stage else "process"


class _Candidate(NamedTuple):  # a tuple: a claim builds dozens of these
    id: str
    team_id: str
    priority_rank: int
    created_at: datetime
    gpus: int
    nodes: int
    reserved_for: str | None
    used: float  # the team's GPU-seconds in the fair-share window
    held: int  # GPUs the team's running jobs hold now

    def share_key(self, charge_seconds: float) -> float:
        """What fair share ranks the team by: its usage in the window, plus a charge for every GPU it holds."""
        return self.used + self.held * charge_seconds


def _reservation_lapsed() -> Any:
    """Whether the node the job is reserved for has not beaten since p_stale (or is gone): a probe of the nodes'
    key for a reserved job only. (NOT IN or NOT EXISTS over the live nodes become a hashed subplan that reads
    every node's row on each claim.)"""
    beat_at = select(Node.heartbeat_at).where(Node.id == Job.reserved_for).scalar_subquery()
    return or_(beat_at.is_(None), beat_at < bindparam("p_stale"))


@cache
def _candidates_query(postgres: bool, ray_driver_free: bool) -> Any:
    """The candidates query, built once per shape (statement building costs more than running it); the
    moment, the node, its GPUs and the windows are bound parameters."""
    now, node_id = bindparam("p_now"), bindparam("p_node")
    fits = and_(Job.nodes == 1, Job.gpus <= bindparam("p_gpus"))
    if ray_driver_free:
        fits = or_(fits, Job.nodes > 1)
    conditions = (
        Job.status == JobStatus.queued.value,
        or_(Job.not_before.is_(None), Job.not_before <= now),
        fits,
        or_(Job.reserved_for.is_(None), Job.reserved_for == node_id, _reservation_lapsed()),
    )
    columns = (Job.id, Job.team_id, Job.priority_rank, Job.created_at, Job.gpus, Job.nodes, Job.reserved_for)
    order = (Job.priority_rank, Job.created_at, Job.id)
    used = (
        select(GpuUsage.team_id.label("team"), func.sum(GpuUsage.gpu_seconds).label("used"))
        .where(GpuUsage.minute >= bindparam("p_since"))
        .group_by(GpuUsage.team_id)
        .subquery()
    )
    if postgres:
        # Each team's best jobs from the (team, priority, age) index of queued jobs: a few index probes per
        # team, however many jobs wait.
        teams = select(Team.id.label("team"), Team.running_gpus.label("held")).subquery()
        best = (
            select(*columns)
            .where(Job.team_id == teams.c.team, *conditions)
            .order_by(*order)
            .limit(CANDIDATES_PER_TEAM)
            .lateral()
        )
        return (
            select(best, func.coalesce(used.c.used, 0.0), teams.c.held)
            .select_from(teams)
            .join(best, true())
            .outerjoin(used, used.c.team == teams.c.team)
        )
    ranked = (
        select(*columns, func.row_number().over(partition_by=Job.team_id, order_by=order).label("n"))
        .where(*conditions)
        .subquery()
    )
    return (
        select(*[ranked.c[c.key] for c in columns], func.coalesce(used.c.used, 0.0), Team.running_gpus)
        .join(Team, Team.id == ranked.c.team_id)
        .outerjoin(used, used.c.team == ranked.c.team_id)
        .where(ranked.c.n <= CANDIDATES_PER_TEAM)
    )


def _candidates(
    session: Session, settings: Settings, node: NodeCapacity, now: datetime, *, gpus_up_to: int
) -> list[_Candidate]:
    """Each team's best few queued jobs that a node with `gpus_up_to` GPUs (and a Ray driver, if free) could
    start, not reserved for another live node, with the team's usage: one query."""
    query = _candidates_query(session.get_bind().dialect.name == "postgresql", node.ray_driver_free)
    params = {
        "p_now": now,
        "p_node": node.worker_id,
        "p_gpus": gpus_up_to,
        "p_stale": now - timedelta(seconds=settings.lease_timeout_seconds),
        "p_since": minute_of(now - timedelta(seconds=settings.fair_share_window_seconds)),
    }
    rows = session.connection().execute(query, params)
    return [_Candidate(*row[:7], float(row[7]), int(row[8])) for row in rows]


def _ranked(candidates: Sequence[_Candidate], charge_seconds: float) -> list[_Candidate]:
    return sorted(
        candidates, key=lambda c: (c.priority_rank, c.share_key(charge_seconds), c.created_at, c.id)
    )


def claim_next(
    *, session: Session, settings: Settings, node: NodeCapacity, now: datetime | None = None
) -> Claim | None:
    """Starts an attempt of the best queued job that fits the node's free GPUs (see the module docstring), or
    returns None when none should start here now. The caller commits."""
    started = claim_batch(session=session, settings=settings, node=node, now=now, max_jobs=1)
    return started[0] if started else None


def claim_batch(
    *,
    session: Session,
    settings: Settings,
    node: NodeCapacity,
    now: datetime | None = None,
    max_jobs: int | None = None,
) -> list[Claim]:
    """Starts attempts of up to `max_jobs` queued jobs (default: as many as the free GPUs can hold) that fit the
    node's free GPUs together, in the order claiming one job at a time would start them (see the module
    docstring): one read of the candidates and one statement that takes them, however many. Returns the
    claims in that order, none when nothing should start here now. The caller commits."""
    now = now or utcnow()
    free = len(node.free_gpus)
    slots = free + (1 if node.ray_driver_free else 0)
    max_jobs = slots if max_jobs is None else min(max_jobs, slots)
    charge = settings.fair_share_claim_charge_seconds
    everything = _ranked(_candidates(session, settings, node, now, gpus_up_to=node.total_gpus), charge)
    reserved = [c for c in everything if c.reserved_for == node.worker_id]
    head = reserved[0] if reserved else (everything[0] if everything else None)
    if head is not None and head.nodes == 1 and head.gpus > free:
        waited = (now - head.created_at).total_seconds()
        if reserved or (
            waited >= settings.reservation_after_seconds and _reserve(session, settings, node, head, now)
        ):
            if settings.preemption and head.priority_rank == 0:
                _preempt_for(session, node, head, free, now)
            return []  # drain: the reserved job takes the GPUs as they free up
    fitting = [c for c in everything if c.nodes > 1 or c.gpus <= free]
    if len(fitting) < len(everything):  # more fitting jobs may wait behind the ones that do not fit
        known = {c.id for c in fitting}
        more = _candidates(session, settings, node, now, gpus_up_to=free)
        fitting = [*fitting, *(c for c in more if c.id not in known)]
    # A job this node reserved goes first once it fits.
    order = sorted(_claim_order(fitting, charge), key=lambda c: c.reserved_for != node.worker_id)
    return _take_all(session, settings, node, order, now, max_jobs=max_jobs)


def _claim_order(candidates: Sequence[_Candidate], charge_seconds: float) -> list[_Candidate]:
    """The order in which one claim after another would start these candidates, if each succeeded: after each
    pick its team holds that many more GPUs, which lowers the rank of its next job. At most one job that
    spans several nodes (a node drives one more Ray job at a time)."""
    by_team: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in sorted(candidates, key=lambda c: (c.priority_rank, c.created_at, c.id)):
        by_team[candidate.team_id].append(candidate)
    picked: dict[str, int] = defaultdict(int)  # GPUs each team's earlier picks hold

    def key(c: _Candidate) -> tuple[Any, ...]:
        return (c.priority_rank, c.used + (c.held + picked[c.team_id]) * charge_seconds, c.created_at, c.id)

    heap = [(key(jobs[0]), team) for team, jobs in by_team.items()]
    heapq.heapify(heap)
    order: list[_Candidate] = []
    spanning = False
    while heap:
        _, team = heapq.heappop(heap)
        best = by_team[team].pop(0)
        if best.nodes == 1 or not spanning:
            spanning = spanning or best.nodes > 1
            order.append(best)
            picked[team] += best.gpus
        if by_team[team]:
            heapq.heappush(heap, (key(by_team[team][0]), team))
    return order


@cache
def _reserve_statement(postgres: bool) -> Any:
    """A queued job reserved for a node unless a live node holds it, built once; bound p_job, p_node, p_now,
    p_stale. On PostgreSQL its event is written by the same statement (bound p_message, p_data), which
    returns the reserved job's id."""
    reserve = (
        update(Job)
        .where(
            Job.id == bindparam("p_job"),
            Job.status == JobStatus.queued.value,
            or_(Job.reserved_for.is_(None), _reservation_lapsed()),
        )
        .values(reserved_for=bindparam("p_node"), reserved_at=bindparam("p_now"))
    )
    if not postgres:
        return reserve
    reserved = reserve.returning(Job.id).cte("reserved")
    event = JobEvent.__table__.c
    return (
        insert(JobEvent)
        .from_select(
            ["job_id", "type", "message", "level", "attempt", "data", "created_at"],
            select(
                reserved.c.id,
                literal_column("'queue'"),
                bindparam("p_message", type_=event.message.type),
                literal_column("'info'"),
                literal_column("0"),
                bindparam("p_data", type_=event.data.type),
                bindparam("p_now", type_=event.created_at.type),
            ),
        )
        .returning(JobEvent.job_id)
    )


def _reserve(
    session: Session, settings: Settings, node: NodeCapacity, job: _Candidate, now: datetime
) -> bool:
    message = (
        f"{node.worker_id} holds its GPUs back for this job: it needs {job.gpus}, "
        f"{len(node.free_gpus)} of {node.total_gpus} are free there now"
    )
    data = {"reserved_for": node.worker_id, "gpus": job.gpus, "free": len(node.free_gpus)}
    params = {
        "p_job": job.id,
        "p_node": node.worker_id,
        "p_now": now,
        "p_stale": now - timedelta(seconds=settings.lease_timeout_seconds),
    }
    postgres = session.get_bind().dialect.name == "postgresql"
    statement = _reserve_statement(postgres)
    session.flush()  # the statement goes around the session: what it holds goes first
    for loaded in [o for o in session.identity_map.values() if isinstance(o, Job) and o.id == job.id]:
        session.expire(loaded)
    if postgres:  # one round trip
        params |= {"p_message": message, "p_data": data}
        return session.connection().execute(statement, params).first() is not None
    taken = session.connection().execute(statement, params).rowcount
    if taken:
        add_event(session=session, job_id=job.id, type="queue", message=message, data=data)
    return bool(taken)


def _preempt_for(session: Session, node: NodeCapacity, head: _Candidate, free: int, now: datetime) -> None:
    """Asks the lowest-priority running jobs on this node to checkpoint and make room for `head`."""
    running = session.execute(
        select(Job.id, Job.priority_rank, Attempt.gpus, Job.preempt_requested_at)
        .join(Attempt, and_(Attempt.job_id == Job.id, Attempt.ended_at.is_(None)))
        .where(Attempt.worker_id == node.worker_id, Job.status == JobStatus.running.value)
        .order_by(Job.priority_rank.desc(), Attempt.started_at.desc())
    ).all()
    freeing = free + sum(gpus for _, _, gpus, asked in running if asked is not None)
    victims = []
    for job_id, rank, gpus, asked in running:
        if freeing >= head.gpus or rank <= head.priority_rank:
            break
        if asked is None:
            victims.append(job_id)
            freeing += gpus
    if freeing < head.gpus:
        return  # even preempting every lower-priority job here would not make room
    for job_id in victims:
        session.execute(update(Job).where(Job.id == job_id).values(preempt_requested_at=now))
        add_event(
            session=session,
            job_id=job_id,
            type="preempted",
            level="warning",
            message=f"preempted for high-priority job {head.id}: checkpointing, then back to the queue",
            data={"for": head.id},
        )
    if victims:
        add_event(
            session=session,
            job_id=head.id,
            type="preempted",
            message=f"preempting {len(victims)} lower-priority job(s) on {node.worker_id} to make room: "
            + ", ".join(victims),
            data={"victims": victims},
        )


def _running_values(worker_id: Any, now: Any) -> dict[str, Any]:
    """What a job's row becomes when an attempt starts (values, or bound parameters)."""
    return {
        "status": JobStatus.running.value,
        "attempt": Job.attempt + 1,
        "worker_id": worker_id,
        "heartbeat_at": now,
        "started_at": func.coalesce(Job.started_at, now),
        "updated_at": now,
        "reserved_for": None,
        "reserved_at": None,
        "preempt_requested_at": None,
    }


STARTED = (Job.id, Job.team_id, Job.attempt, Job.gpus, Job.nodes, Job.spec)


@cache
def _take_statements(postgres: bool, enforce_limit: bool, record: bool = False) -> tuple[Any, ...]:
    """The statements of a take, built once (see _take). Bound: p_worker, p_now, p_limit, and on PostgreSQL
    p_ids (the candidates, in claim order), p_max (how many to take) and p_free (the node's free GPUs); on
    SQLite p_job, p_team and p_gpus (named apart from columns, which an UPDATE would set). On PostgreSQL with
    `record`, the statement also writes the attempts rows and their events (as _record_starts; bound p_host
    and p_free_ids, the free GPUs' indices handed out in claim order) and selects (id, team, attempt, gpus,
    nodes, GPU indices, launcher)."""
    now = bindparam("p_now")
    limit = func.coalesce(Team.max_running_jobs, bindparam("p_limit"))
    under = Team.running_jobs < limit if enforce_limit else true()
    waiting = and_(Job.status == JobStatus.queued.value, or_(Job.not_before.is_(None), Job.not_before <= now))
    running = _running_values(bindparam("p_worker"), now)
    if postgres:
        # The first p_max candidates, in the given order, whose job row and team row no other claim holds
        # right now (SKIP LOCKED: rows are locked as the sorted candidates come, so claims racing for the same
        # jobs each take the next ones instead of trying again); then, in that order, those that keep their
        # team within its running limit and, together, within the node's free GPUs.
        ranked = (
            func.unnest(bindparam("p_ids", type_=postgresql.ARRAY(String)))
            .table_valued("id", with_ordinality="n")
            .render_derived()
        )
        locked = (
            select(
                Job.id,
                Job.team_id,
                ranked.c.n,
                case((Job.nodes > 1, 0), else_=Job.gpus).label("local_gpus"),  # a Ray job runs elsewhere
                Team.running_jobs,
                limit.label("team_limit"),
            )
            .join(ranked, ranked.c.id == Job.id)
            .join(Team, Team.id == Job.team_id)
            .where(waiting, under)
            .order_by(ranked.c.n)
            .limit(bindparam("p_max"))
            .with_for_update(skip_locked=True, of=(Job, Team))
            .cte("locked")
        )
        within = locked
        if enforce_limit:
            counted_in = select(
                locked,
                (
                    locked.c.running_jobs
                    + func.row_number().over(partition_by=locked.c.team_id, order_by=locked.c.n)
                ).label("with_these"),
            ).subquery()
            within = select(counted_in).where(counted_in.c.with_these <= counted_in.c.team_limit).subquery()
        fits = select(
            within.c.id,
            within.c.local_gpus,
            func.sum(within.c.local_gpus).over(order_by=within.c.n).label("gpus_so_far"),
        ).subquery()
        chosen = select(fits).where(fits.c.gpus_so_far <= bindparam("p_free")).cte("chosen")
        started = (
            update(Job).where(Job.id == chosen.c.id).values(**running).returning(*STARTED).cte("started")
        )
        per_team = (
            select(started.c.team_id, func.count().label("jobs"), func.sum(started.c.gpus).label("gpus"))
            .group_by(started.c.team_id)
            .subquery()
        )
        counted = (
            update(Team)
            .where(Team.id == per_team.c.team_id)
            .values(
                running_jobs=Team.running_jobs + per_team.c.jobs,
                running_gpus=Team.running_gpus + per_team.c.gpus,
            )
            .cte("counted")
        )
        if not record:
            return (select(started).add_cte(counted),)
        placed = _placed(started, chosen)
        return (
            select(*(placed.c[name] for name in ("id", "team_id", "attempt", "gpus", "nodes")))
            .add_columns(placed.c.gpu_indices, placed.c.launcher)
            .add_cte(counted)
            .add_cte(_recorded_attempts(placed).cte("recorded_attempts"))
            .add_cte(_recorded_events(placed).cte("recorded_events")),
        )
    job_id, team_id, gpus = bindparam("p_job"), bindparam("p_team"), bindparam("p_gpus")
    return (
        update(Team)
        .where(Team.id == team_id, under)
        .values(running_jobs=Team.running_jobs + 1, running_gpus=Team.running_gpus + gpus),
        update(Job).where(Job.id == job_id, waiting).values(**running).returning(*STARTED),
        update(Team)
        .where(Team.id == team_id)
        .values(running_jobs=Team.running_jobs - 1, running_gpus=Team.running_gpus - gpus),
    )


def _placed(started: Any, chosen: Any) -> Any:
    """The started jobs with what _record_starts computes in Python: the GPU indices each gets (the free ones,
    p_free_ids, handed out in claim order; none for a job spanning nodes), its launcher (launcher_of) and where
    it runs, as its event says."""
    first = chosen.c.gpus_so_far - chosen.c.local_gpus + 1
    indices = Grouping(bindparam("p_free_ids", type_=postgresql.ARRAY(Integer)))[first : chosen.c.gpus_so_far]
    resources = started.c.spec

    def setting(name: str) -> Any:
        return cast(func.nullif(func.jsonb_extract_path_text(resources, "resources", name), "0"), Integer)

    launcher = case(
        (started.c.nodes > 1, literal_column("'ray'")),
        (or_(started.c.gpus > 1, setting("zero_stage").is_not(None)), literal_column("'torchrun'")),
        else_=literal_column("'process'"),
    )
    host = bindparam("p_host", type_=String)
    per_node = func.coalesce(setting("gpus_per_node"), started.c.gpus // started.c.nodes)
    where = case(
        (
            started.c.nodes > 1,
            host
            + ", driving a Ray Train job on "
            + cast(started.c.nodes, String)
            + " nodes x "
            + cast(per_node, String)
            + " GPUs",
        ),
        (chosen.c.local_gpus > 0, host + ", GPUs " + func.array_to_string(indices, ", ")),
        else_=host,
    )
    return (
        select(
            started,
            indices.label("gpu_indices"),
            launcher.label("launcher"),
            where.label("runs_on"),
        )
        .join(chosen, chosen.c.id == started.c.id)
        .cte("placed")
    )


def _recorded_attempts(placed: Any) -> Any:
    worker, now = bindparam("p_worker", type_=String), bindparam("p_now", type_=Attempt.started_at.type)
    columns = ["job_id", "team_id", "number", "worker_id", "host", "gpu_indices", "gpus", "launcher"]
    return insert(Attempt.__table__).from_select(
        [*columns, "started_at", "charged_gpu_seconds"],
        select(
            placed.c.id,
            placed.c.team_id,
            placed.c.attempt,
            worker,
            bindparam("p_host", type_=String),
            func.to_jsonb(placed.c.gpu_indices),
            placed.c.gpus,
            placed.c.launcher,
            now,
            literal_column("0.0"),
        ),
        include_defaults=False,  # the server's defaults for the rest (log_bytes, log_truncated)
    )


def _recorded_events(placed: Any) -> Any:
    worker, now = bindparam("p_worker", type_=String), bindparam("p_now", type_=JobEvent.created_at.type)
    message = (
        literal_column("'attempt '")
        + cast(placed.c.attempt, String)
        + " started on "
        + worker
        + " ("
        + placed.c.runs_on
        + ")"
    )
    data = func.jsonb_build_object(
        literal_column("'status'"),
        literal_column(f"'{JobStatus.running.value}'"),
        literal_column("'worker_id'"),
        worker,
        literal_column("'host'"),
        bindparam("p_host", type_=String),
        literal_column("'gpu_indices'"),
        func.to_jsonb(placed.c.gpu_indices),
        literal_column("'launcher'"),
        placed.c.launcher,
    )
    return insert(JobEvent.__table__).from_select(
        ["job_id", "attempt", "level", "type", "message", "data", "created_at"],
        select(
            placed.c.id,
            placed.c.attempt,
            literal_column("'info'"),
            literal_column("'status'"),
            message,
            data,
            now,
        ),
    )


def _take(
    session: Session,
    settings: Settings,
    candidates: Sequence[tuple[str, str, int, int]],
    worker_id: str,
    now: datetime,
    *,
    max_jobs: int,
    free_gpus: int,
    enforce_limit: bool = True,
    record_on: tuple[str, Sequence[int]] | None = None,
) -> list[Any]:
    """Starts the next attempts of up to `max_jobs` of the queued jobs `candidates` ((job, team, GPUs, nodes),
    in claim order) that together fit `free_gpus` (a job spanning several nodes uses none here), keep their
    team within its running limit, and that no other claim holds (nor their team) right now. Returns the
    started jobs' (id, team, attempt, gpus, nodes, spec) in claim order. On PostgreSQL with `record_on` (the
    node's host and free GPU indices), the same statement records the attempts (_take_statements) and the
    rows are (id, team, attempt, gpus, nodes, GPU indices, launcher)."""
    if not candidates or max_jobs <= 0:
        return []
    postgres = session.get_bind().dialect.name == "postgresql"
    statements = _take_statements(postgres, enforce_limit, postgres and record_on is not None)
    params = {"p_worker": worker_id, "p_now": now, "p_limit": settings.team_max_running_jobs}
    connection = session.connection()
    if postgres:
        # One round trip, however many jobs it takes and however many candidates other claims hold: the
        # picks, their moves to running and their teams' counts, together.
        params |= {"p_ids": [job_id for job_id, *_ in candidates], "p_max": max_jobs, "p_free": free_gpus}
        if record_on is not None:
            params |= {"p_host": record_on[0], "p_free_ids": list(record_on[1])}
        rows = connection.execute(statements[0], params).all()
        place = {job_id: i for i, (job_id, *_) in enumerate(candidates)}
        return sorted(rows, key=lambda row: place[row[0]])
    # SQLite runs one writer at a time: the same steps, one candidate after the other.
    count, start, uncount = statements
    taken: list[Any] = []
    for job_id, team_id, gpus, nodes in candidates:
        local = 0 if nodes > 1 else gpus
        if len(taken) >= max_jobs or local > free_gpus:
            continue
        one = params | {"p_job": job_id, "p_team": team_id, "p_gpus": gpus}
        if not connection.execute(count, one).rowcount:
            continue
        row = connection.execute(start, one).one_or_none()
        if row is None:
            connection.execute(uncount, one)
            continue
        taken.append(row)
        free_gpus -= local
    return taken


def _take_all(
    session: Session,
    settings: Settings,
    node: NodeCapacity,
    order: Sequence[_Candidate],
    now: datetime,
    *,
    max_jobs: int,
) -> list[Claim]:
    rows: list[Any] = []
    wanted = [(c.id, c.team_id, c.gpus, c.nodes) for c in order]
    for retry in range(TAKE_TRIES):
        rows = _take(
            session,
            settings,
            wanted,
            node.worker_id,
            now,
            max_jobs=max_jobs,
            free_gpus=len(node.free_gpus),
            record_on=(node.host, node.free_gpus),
        )
        if rows or not order or max_jobs <= 0 or retry == TAKE_TRIES - 1:
            break
        # Nothing taken although jobs wait: their rows or their teams' rows were held by other claims that
        # commit within milliseconds (or their teams are at their limits). Look again shortly.
        time.sleep(random.uniform(0.002, 0.008))
    if session.get_bind().dialect.name == "postgresql":  # the take recorded the attempts
        return [Claim(j, t, a, g, n, tuple(indices), launcher) for j, t, a, g, n, indices, launcher in rows]
    free = list(node.free_gpus)
    starts = []
    for job_id, team_id, attempt, gpus, nodes, spec in rows:
        indices: tuple[int, ...] = ()
        if nodes == 1:
            indices, free = tuple(free[:gpus]), free[gpus:]
        starts.append((job_id, team_id, attempt, gpus, nodes, spec, indices))
    return _record_starts(session, node.worker_id, node.host, starts, now)


@cache
def _start_statements(postgres: bool) -> tuple[Any, ...]:
    """The writes that record a started attempt, built once: its attempts row and the event saying where it
    runs (one statement on PostgreSQL)."""
    attempt = insert(Attempt).values(
        job_id=bindparam("p_job"),
        team_id=bindparam("p_team"),
        number=bindparam("p_number"),
        worker_id=bindparam("p_worker"),
        host=bindparam("p_host"),
        gpu_indices=bindparam("p_indices", type_=Attempt.gpu_indices.type),
        gpus=bindparam("p_gpus"),
        launcher=bindparam("p_launcher"),
        started_at=bindparam("p_now"),
        charged_gpu_seconds=0.0,
    )
    event = insert(JobEvent).values(
        job_id=bindparam("p_job"),
        attempt=bindparam("p_number"),
        level="info",
        type="status",
        message=bindparam("p_message"),
        data=bindparam("p_data", type_=JobEvent.data.type),
        created_at=bindparam("p_now"),
    )
    if postgres:
        return (event.add_cte(attempt.cte("started_attempt")),)
    return (attempt, event)


def describe_start(
    number: int,
    gpus: int,
    nodes: int,
    spec_values: dict[str, Any],
    gpu_indices: Sequence[int],
    worker_id: str,
    host: str,
) -> tuple[str, str, dict[str, Any]]:
    """A started attempt's launcher, and the message and data of its event. (A batch claim on PostgreSQL
    computes the same in its statement: _placed, _recorded_events.)"""
    # The stored spec is a validated JobSpec's dump: the few fields needed, without validating it again.
    resources = spec_values.get("resources") or {}
    launcher = launcher_of(nodes, gpus, resources.get("zero_stage") or 0)
    where = f"{host}, GPUs {', '.join(map(str, gpu_indices))}" if gpu_indices else host
    if launcher == "ray":
        per_node = resources.get("gpus_per_node") or gpus // nodes
        where = f"{host}, driving a Ray Train job on {nodes} nodes x {per_node} GPUs"
    data = {
        "status": JobStatus.running.value,
        "worker_id": worker_id,
        "host": host,
        "gpu_indices": list(gpu_indices),
        "launcher": launcher,
    }
    return launcher, f"attempt {number} started on {worker_id} ({where})", data


def _record_starts(
    session: Session,
    worker_id: str,
    host: str,
    starts: Sequence[tuple[str, str, int, int, int, dict[str, Any], tuple[int, ...]]],
    now: datetime,
    taken_over: bool = False,
) -> list[Claim]:
    """The attempts rows of attempts that just started ((job, team, number, gpus, nodes, spec, GPU indices)
    each; they hold their GPUs from now on: their teams are charged for them as they run) and the events
    saying where each runs, in one round trip."""
    claims, rows = [], []
    for job_id, team_id, number, gpus, nodes, spec_values, gpu_indices in starts:
        launcher, message, data = describe_start(
            number, gpus, nodes, spec_values, gpu_indices, worker_id, host
        )
        rows.append(
            {
                "p_job": job_id,
                "p_team": team_id,
                "p_number": number,
                "p_worker": worker_id,
                "p_host": host,
                "p_indices": list(gpu_indices),
                "p_gpus": gpus,
                "p_launcher": launcher,
                "p_now": now,
                "p_message": message + (" (the previous worker stopped heartbeating)" if taken_over else ""),
                "p_data": data,
            }
        )
        claims.append(Claim(job_id, team_id, number, gpus, nodes, gpu_indices, launcher))
    if rows:
        # Core statements (the ORM's bulk-insert path costs more than the inserts), all rows at once.
        connection = session.connection()
        for statement in _start_statements(session.get_bind().dialect.name == "postgresql"):
            connection.execute(statement, rows)
    return claims


def claim_job(
    *,
    session: Session,
    job_id: str,
    worker_id: str,
    lease_timeout: float,
    settings: Settings | None = None,
    host: str | None = None,
    gpu_indices: Sequence[int] = (),
) -> int | None:
    """Claims one given job for this worker: a queued one, or a running one whose worker stopped
    heartbeating. Returns the new attempt number, or None if the job is not this worker's to run. With
    `settings`, a team at its running limit waits (the job is tried again later)."""
    enforce_limit = settings is not None
    settings = settings or Settings()
    now = utcnow()
    host = host or socket.gethostname()
    job = session.get(Job, job_id)
    if job is None:
        return None
    indices = tuple(gpu_indices) or tuple(range(job.gpus if job.nodes == 1 else 0))
    if job.status == JobStatus.running:
        # Taking over from a worker that stopped heartbeating: the compare-and-swap on the attempt number.
        stale = now - timedelta(seconds=lease_timeout)
        row = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.attempt == job.attempt,
                Job.status == JobStatus.running.value,
                Job.heartbeat_at < stale,
            )
            .values(**_running_values(worker_id, now))
            .returning(*STARTED)
            .execution_options(synchronize_session=False)
        ).one_or_none()
        if row is None:
            return None
        close_attempt(session, job_id, "lost", now)
        session.execute(
            update(Team)
            .where(Team.id == job.team_id)
            .values(running_jobs=Team.running_jobs + 1, running_gpus=Team.running_gpus + job.gpus)
        )
        return _record_starts(session, worker_id, host, [(*row, indices)], now, taken_over=True)[0].attempt
    if job.status != JobStatus.queued or (job.not_before is not None and job.not_before > now):
        return None
    taken = _take(
        session,
        settings,
        [(job_id, job.team_id, job.gpus, job.nodes)],
        worker_id,
        now,
        max_jobs=1,
        free_gpus=job.gpus,
        enforce_limit=enforce_limit,
    )
    row = taken[0] if taken else None
    if row is None and enforce_limit:
        team = session.get(Team, job.team_id)
        at_limit = team is not None and team.running_jobs >= team_limits(session, settings, job.team_id)[0]
        if at_limit:  # the team waits: tried again later, so one team cannot take every worker
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued.value)
                .values(not_before=now + timedelta(seconds=settings.fairness_retry_seconds), enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
    if row is None:
        return None
    return _record_starts(session, worker_id, host, [(*row, indices)], now)[0].attempt


def heartbeat(*, session: Session, job_id: str, attempt: int) -> JobStatus | None:
    """Renews one attempt's lease; returns the job's status, or None if the attempt lost the job."""
    return renew(session=session, job_id=job_id, attempt=attempt).status


GENERIC_PLANS = text("SET LOCAL plan_cache_mode = force_generic_plan")

# A renewed lease is not a change to the job: its `updated_at` (which its answer shows, and which would otherwise
# be bumped by the column's onupdate) stays, so the answer and its ETag do not change at every heartbeat.
KEEP_UPDATED_AT = {"updated_at": Job.updated_at}


def renew(*, session: Session, job_id: str, attempt: int, now: datetime | None = None) -> LeaseState:
    """Renews one attempt's lease; returns what the heartbeat found (status, preemption asked)."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_([s.value for s in ACTIVE]))
        .values(heartbeat_at=now or utcnow(), **KEEP_UPDATED_AT)
        .returning(Job.status, Job.preempt_requested_at)
    ).one_or_none()
    if row is None:
        return LeaseState(None)
    return LeaseState(JobStatus(row[0]), preempt=row[1] is not None)


@cache
def _renew_all_statement() -> Any:
    """The leases of several (job, attempt) pairs renewed at once, built once; bound p_ids, p_attempts, p_now.
    Returns (job, status, preemption asked) for each lease that still holds its job."""
    leases = (
        func.unnest(
            bindparam("p_ids", type_=postgresql.ARRAY(String)),
            bindparam("p_attempts", type_=postgresql.ARRAY(Integer)),
        )
        .table_valued("id", "attempt")
        .render_derived()
    )
    return (
        update(Job)
        .where(
            Job.id == leases.c.id,
            Job.attempt == leases.c.attempt,
            # Checked on the rows found by key, never searched by the status index: with statistics taken
            # before a burst of claims (autovacuum analyzes later), the planner counts on one running job and
            # a beat would walk every running job's index entry for its few leases.
            Job.status.concat("").in_([s.value for s in ACTIVE]),
        )
        .values(heartbeat_at=bindparam("p_now"), **KEEP_UPDATED_AT)
        .returning(Job.id, Job.status, Job.preempt_requested_at)
    )


@cache
def _beat_statement() -> Any:
    """A node's heartbeat on PostgreSQL, one statement built once: its leases renewed (_renew_all_statement),
    its running attempts charged (usage.charge_ctes) and its row upserted. Bound: those of the renewal,
    p_minute, p_worker, p_host, p_total, p_busy, p_ray. Selects the renewal's rows."""
    renewed = _renew_all_statement().cte("renewed")
    node = Node.__table__.c
    row = {
        "id": bindparam("p_worker", type_=node.id.type),
        "host": bindparam("p_host", type_=node.host.type),
        "total_gpus": bindparam("p_total", type_=node.total_gpus.type),
        "busy_gpus": bindparam("p_busy", type_=node.busy_gpus.type),
        "ray_driver": bindparam("p_ray", type_=node.ray_driver.type),
        "started_at": bindparam("p_now", type_=node.started_at.type),
        "heartbeat_at": bindparam("p_now", type_=node.heartbeat_at.type),
    }
    upsert = postgresql.insert(Node).values(**row)
    upsert = upsert.on_conflict_do_update(
        index_elements=[Node.id],
        set_={
            k: upsert.excluded[k] for k in ("host", "total_gpus", "busy_gpus", "ray_driver", "heartbeat_at")
        },
    )
    statement = select(renewed.c.id, renewed.c.status, renewed.c.preempt_requested_at)
    statement = statement.add_cte(upsert.cte("node_row"))
    # The job rows first, then the attempts, as a job's move takes them (jobs.transition): the attempts are read
    # only once the renewal is done (an uncorrelated subquery runs first), or a beat and the end of one of its
    # jobs could each hold the row the other waits for.
    after_renewal = select(func.count()).select_from(renewed).scalar_subquery() >= 0
    for cte in charge_ctes(and_(Attempt.worker_id == bindparam("p_worker"), after_renewal), closing=False)[1]:
        statement = statement.add_cte(cte)
    return statement


def beat(
    *,
    session: Session,
    node: NodeCapacity,
    leases: Sequence[tuple[str, int]],
    ray_driver: bool = False,
    now: datetime | None = None,
) -> dict[str, LeaseState]:
    """A node's heartbeat: renews the lease of each (job, attempt) it runs, charges their teams for the GPU
    time used since the last beat, and records the node's free and busy GPUs. Returns each lease's state."""
    now = now or utcnow()
    busy = sorted(set(range(node.total_gpus)) - set(node.free_gpus))
    if session.get_bind().dialect.name == "postgresql":
        # One statement however many attempts the node runs (1,000 nodes beat every few seconds).
        session.flush()  # the statement goes around the session: what it holds goes first
        params = {
            "p_ids": [j for j, _ in leases],
            "p_attempts": [a for _, a in leases],
            "p_now": now,
            "p_minute": minute_of(now),
            "p_worker": node.worker_id,
            "p_host": node.host,
            "p_total": node.total_gpus,
            "p_busy": busy,
            "p_ray": ray_driver,
        }
        # The beat's plan does not depend on its values (keys, the node, the moment), yet PostgreSQL plans its
        # statement afresh at each call (0.8 ms, more than running it); a generic plan is made once per
        # connection. SET LOCAL: until the transaction ends (the node's beat is its transaction's last statement).
        session.connection().execute(GENERIC_PLANS)
        rows = session.connection().execute(_beat_statement(), params).all()
        expire_attempts(session, lambda a: a.worker_id == node.worker_id)
        states = {job_id: LeaseState(None) for job_id, _ in leases}
        states |= {
            job_id: LeaseState(JobStatus(status), preempt=asked is not None) for job_id, status, asked in rows
        }
        return states
    states = {
        job_id: renew(session=session, job_id=job_id, attempt=attempt, now=now) for job_id, attempt in leases
    }
    accrue_node(session, node.worker_id, now)
    record = session.get(Node, node.worker_id)
    if record is None:
        session.add(
            Node(
                id=node.worker_id,
                host=node.host,
                total_gpus=node.total_gpus,
                busy_gpus=busy,
                ray_driver=ray_driver,
                started_at=now,
                heartbeat_at=now,
            )
        )
    else:
        record.host, record.total_gpus, record.busy_gpus = node.host, node.total_gpus, busy
        record.ray_driver, record.heartbeat_at = ray_driver, now
    session.flush()
    return states


def retire_node(*, session: Session, worker_id: str) -> None:
    """Forgets a node that is shutting down (its reservations go to other nodes at once)."""
    session.execute(delete(Node).where(Node.id == worker_id))
    session.execute(
        update(Job)
        .where(Job.reserved_for == worker_id, Job.status == JobStatus.queued.value)
        .values(reserved_for=None, reserved_at=None)
    )


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: how many queued jobs come before it (by priority, then age) and what it
    waits for."""

    position: int
    gpus: int
    nodes: int
    free_gpus_largest_node: int | None
    reserved_for: str | None


def queue_place(*, session: Session, settings: Settings, job: Job) -> QueuePlace:
    """The queue position of a queued job and the GPUs it waits for."""
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status == JobStatus.queued.value,
            or_(
                Job.priority_rank < job.priority_rank,
                and_(Job.priority_rank == job.priority_rank, Job.created_at < job.created_at),
            ),
        )
    )
    stale = utcnow() - timedelta(seconds=settings.lease_timeout_seconds)
    nodes = session.execute(select(Node.total_gpus, Node.busy_gpus).where(Node.heartbeat_at >= stale)).all()
    largest = max((total - len(busy) for total, busy in nodes), default=None)
    return QueuePlace(int(ahead or 0) + 1, job.gpus, job.nodes, largest, job.reserved_for)


def held_gpus(*, session: Session, worker_id: str) -> list[Attempt]:
    """The attempts a worker holds GPUs for."""
    return list(
        session.scalars(select(Attempt).where(Attempt.worker_id == worker_id, Attempt.ended_at.is_(None)))
    )
