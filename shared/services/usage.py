"""GPU-seconds per team, the currency of fair share.

Each attempt holds its GPUs from its claim until it ends (an `attempts` row with no `ended_at`). Its team is
charged `fair_share_claim_charge_seconds` per GPU at the claim (so a burst of claims in one instant does not
all go to one team), then for the time it actually runs beyond that, as its node heartbeats and when it
ends. Charges land in per-minute buckets (`gpu_usage`); a team's usage is their sum over the sliding window.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.models import Attempt, GpuUsage, utcnow


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def charge(session: Session, team_id: str, gpu_seconds: float, at: datetime) -> None:
    """Adds GPU-seconds to the team's bucket of the minute `at` falls in."""
    if gpu_seconds <= 0:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(GpuUsage).values(
        team_id=team_id, minute=minute_of(at), gpu_seconds=gpu_seconds
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[GpuUsage.team_id, GpuUsage.minute],
            set_={"gpu_seconds": GpuUsage.gpu_seconds + statement.excluded.gpu_seconds},
        )
    )


def accrue(session: Session, attempt: Attempt, now: datetime) -> None:
    """Charges the attempt's team for the GPU time it ran beyond what was charged already."""
    used = attempt.gpus * max(0.0, (now - attempt.started_at).total_seconds())
    owed = used - attempt.charged_gpu_seconds
    if owed > 0:
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


def close_attempt(session: Session, job_id: str, outcome: str, now: datetime | None = None) -> Attempt | None:
    """Ends the job's attempt that still holds GPUs (charging what it ran), if there is one: its GPUs are
    free from now on. Called with every move out of running or cancelling."""
    now = now or utcnow()
    held = session.scalar(
        select(Attempt).where(Attempt.job_id == job_id, Attempt.ended_at.is_(None)).with_for_update()
    )
    if held is None:
        return None
    accrue(session, held, now)
    held.ended_at = now
    held.outcome = outcome
    session.flush()
    return held
