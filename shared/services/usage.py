"""GPU-seconds per team, the currency of fair share.

Each attempt holds its GPUs from its claim until it ends (an `attempts` row with no `ended_at`). Its team is
charged for the time it runs, by its node's heartbeats (every CHARGE_EVERY_SECONDS of it) and when it ends;
charges land in per-minute buckets (`gpu_usage`), and a team's usage is their sum over the sliding window. The claim ranks teams by that usage
plus `fair_share_claim_charge_seconds` for every GPU the team holds now (`teams.running_gpus`), so that a
burst of claims in one instant does not all go to one team.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import Float, bindparam, case, cast, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.models import Attempt, GpuUsage, Team, utcnow

# A heartbeat charges an attempt once it ran this long uncharged (an attempt's end charges the rest): each
# charge writes its team's minute bucket, a row every node running that team's jobs writes, so charging at
# every beat (1,000 nodes, every few seconds) would make the nodes queue for those rows. Fair share lags a
# running attempt's use by at most this much, against a window of an hour.
CHARGE_EVERY_SECONDS = 30.0


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


@cache
def charge_statement(postgres: bool) -> Any:
    """The upsert of a team's minute bucket, built once; bound: p_team, p_minute, p_seconds."""
    dialect = postgresql if postgres else sqlite
    statement = dialect.insert(GpuUsage).values(
        team_id=bindparam("p_team"), minute=bindparam("p_minute"), gpu_seconds=bindparam("p_seconds")
    )
    return statement.on_conflict_do_update(
        index_elements=[GpuUsage.team_id, GpuUsage.minute],
        set_={"gpu_seconds": GpuUsage.gpu_seconds + statement.excluded.gpu_seconds},
    )


def charge(session: Session, team_id: str, gpu_seconds: float, at: datetime) -> None:
    """Adds GPU-seconds to the team's bucket of the minute `at` falls in."""
    if gpu_seconds <= 0:
        return
    statement = charge_statement(session.get_bind().dialect.name == "postgresql")
    session.execute(statement, {"p_team": team_id, "p_minute": minute_of(at), "p_seconds": gpu_seconds})


def accrue(session: Session, attempt: Attempt, now: datetime, at_least: float = 0.0) -> None:
    """Charges the attempt's team for the GPU time it ran beyond what was charged already, when that is more
    than `at_least` seconds per GPU."""
    used = attempt.gpus * max(0.0, (now - attempt.started_at).total_seconds())
    owed = used - attempt.charged_gpu_seconds
    if owed > 0 and owed >= attempt.gpus * at_least:
        charge(session, attempt.team_id, owed, now)
        attempt.charged_gpu_seconds = used


def team_usage(session: Session, *, window_seconds: float, now: datetime | None = None) -> dict[str, float]:
    """GPU-seconds charged to each team over the sliding window ending now."""
    since = minute_of((now or utcnow()) - timedelta(seconds=window_seconds))
    rows = session.execute(
        select(GpuUsage.team_id, func.sum(GpuUsage.gpu_seconds))
        .where(GpuUsage.minute >= since)
        .group_by(GpuUsage.team_id)
    )
    return {team: float(total or 0.0) for team, total in rows}


@cache
def _charge_statement(closing: bool) -> Any:
    """On PostgreSQL, in one statement built once: the open attempts of one job (closing: bound p_job,
    p_outcome) or of one node (bound p_worker) are locked and charged up to p_now, their teams' buckets of
    minute p_minute get what they owed; closing also ends the attempt and drops its team's running counts."""
    whose = Attempt.job_id == bindparam("p_job") if closing else Attempt.worker_id == bindparam("p_worker")
    charged_rows, ctes = charge_ctes(whose, closing)
    statement = select(charged_rows.c.id)
    for cte in ctes:
        statement = statement.add_cte(cte)
    return statement


def charge_ctes(whose: Any, closing: bool) -> tuple[Any, list[Any]]:
    """The parts of the charging statement (PostgreSQL) for the open attempts `whose` selects: the CTE of the
    charged attempts (id, team_id, gpus, owed) and the data-modifying CTEs a statement must add (add_cte) for
    the buckets and, closing, the teams' running counts. Bound: p_now, p_minute and, closing, p_outcome."""
    now = bindparam("p_now", type_=Attempt.started_at.type)
    ran = func.greatest(0.0, func.extract("epoch", now - Attempt.started_at))
    # A beat takes (locks) only the attempts due a charge; an end takes its attempt whatever it owes.
    owing = (
        ()
        if closing
        else (Attempt.gpus * ran - Attempt.charged_gpu_seconds >= Attempt.gpus * CHARGE_EVERY_SECONDS,)
    )
    held = (
        select(
            Attempt.id,
            Attempt.charged_gpu_seconds.label("before"),
            cast(Attempt.gpus * ran, Float).label("used"),
        )
        .where(whose, Attempt.ended_at.is_(None), *owing)
        .with_for_update()
        .cte("held")
    )
    values: dict[str, Any] = {"charged_gpu_seconds": func.greatest(held.c.before, held.c.used)}
    if closing:
        values |= {"ended_at": now, "outcome": bindparam("p_outcome")}
    charged_rows = (
        update(Attempt)
        .where(Attempt.id == held.c.id)
        .values(**values)
        .returning(
            Attempt.id,
            Attempt.team_id,
            Attempt.gpus,
            (Attempt.charged_gpu_seconds - held.c.before).label("owed"),
        )
        .cte("charged_rows")
    )
    owed = (
        select(
            charged_rows.c.team_id,
            bindparam("p_minute", type_=GpuUsage.minute.type),
            func.sum(charged_rows.c.owed),
        )
        .where(charged_rows.c.owed > 0)
        .group_by(charged_rows.c.team_id)
        # Every charge takes its teams' buckets in the same order: two heartbeats charging the same teams
        # would otherwise each wait for a bucket the other inserted (a deadlock).
        .order_by(charged_rows.c.team_id)
    )
    upsert = postgresql.insert(GpuUsage).from_select(["team_id", "minute", "gpu_seconds"], owed)
    buckets = upsert.on_conflict_do_update(
        index_elements=[GpuUsage.team_id, GpuUsage.minute],
        set_={"gpu_seconds": GpuUsage.gpu_seconds + upsert.excluded.gpu_seconds},
    ).cte("buckets")
    ctes = [buckets]
    if closing:
        counted = (
            update(Team)
            .where(Team.id == charged_rows.c.team_id)
            .values(
                running_jobs=case((Team.running_jobs > 0, Team.running_jobs - 1), else_=0),
                running_gpus=case(
                    (Team.running_gpus > charged_rows.c.gpus, Team.running_gpus - charged_rows.c.gpus),
                    else_=0,
                ),
            )
            .cte("counted")
        )
        ctes.append(counted)
    return charged_rows, ctes


def accrue_node(session: Session, worker_id: str, now: datetime) -> None:
    """Charges the teams of the node's running attempts for the GPU time they ran beyond what was charged
    already, those that ran CHARGE_EVERY_SECONDS or more uncharged (each heartbeat)."""
    if session.get_bind().dialect.name == "postgresql":
        session.flush()  # the statement goes around the session: what it holds goes first
        params = {"p_worker": worker_id, "p_now": now, "p_minute": minute_of(now)}
        session.connection().execute(_charge_statement(False), params).all()
        expire_attempts(session, lambda a: a.worker_id == worker_id)
        return
    held = session.scalars(
        select(Attempt).where(Attempt.worker_id == worker_id, Attempt.ended_at.is_(None))
    ).all()
    for attempt in held:
        accrue(session, attempt, now, at_least=CHARGE_EVERY_SECONDS)


def expire_attempts(session: Session, which: Any) -> None:
    """Forgets what the session holds of attempts a statement around it changed (read again if used)."""
    for loaded in [o for o in session.identity_map.values() if isinstance(o, Attempt)]:
        if which(loaded):
            session.expire(loaded)


def close_attempt(session: Session, job_id: str, outcome: str, now: datetime | None = None) -> bool:
    """Ends the job's attempt that still holds GPUs (charging what it ran), if there is one: its GPUs are
    free from now on. Called with every move out of running, cancelling or pausing. Returns whether there
    was one."""
    now = now or utcnow()
    if session.get_bind().dialect.name == "postgresql":
        # One round trip: this runs at the end of every attempt.
        session.flush()  # the statement goes around the session: what it holds goes first
        params = {"p_job": job_id, "p_outcome": outcome, "p_now": now, "p_minute": minute_of(now)}
        closed = session.connection().execute(_charge_statement(True), params).first() is not None
        expire_attempts(session, lambda a: a.job_id == job_id)
        return closed
    held = session.scalar(
        select(Attempt).where(Attempt.job_id == job_id, Attempt.ended_at.is_(None)).with_for_update()
    )
    if held is None:
        return False
    accrue(session, held, now)
    held.ended_at = now
    held.outcome = outcome
    session.execute(
        update(Team)
        .where(Team.id == held.team_id)
        .values(
            running_jobs=case((Team.running_jobs > 0, Team.running_jobs - 1), else_=0),
            running_gpus=case((Team.running_gpus > held.gpus, Team.running_gpus - held.gpus), else_=0),
        )
    )
    session.flush()
    return True
