"""Dry runs: the checks a job would get before queueing (dataset statistics, parameter counts, the memory
estimate, refusals), without the job."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Plan, new_id, utcnow
from shared.schemas import JobSpec
from shared.services.dispatch import send_plan_after_commit
from shared.services.jobs import check_spec
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.tenancy import TeamID


def create_plan(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> Plan:
    """Runs the synchronous checks (4xx on failure) and records a pending plan for a worker to complete."""
    checked = check_spec(session=session, settings=settings, store=store, team_id=team_id, spec=spec)
    plan = Plan(
        id=new_id("plan"),
        team_id=team_id,
        status="pending",
        spec={
            **checked.spec.model_dump(mode="json"),
            "dataset": checked.dataset,
            "validation_dataset": checked.validation_dataset,
        },
    )
    session.add(plan)
    session.flush()
    return plan


def request_plan(
    *, session: Session, settings: Settings, store: ObjectStore, team_id: TeamID, spec: JobSpec
) -> Plan:
    """Records a plan, sends it to a worker once committed, and waits up to `plan_wait_seconds` for the
    worker to complete it; returns the plan as it then is (still pending when the worker was slower)."""
    plan = create_plan(session=session, settings=settings, store=store, team_id=team_id, spec=spec)
    send_plan_after_commit(session, settings, plan.id)
    session.commit()
    deadline = time.monotonic() + settings.plan_wait_seconds
    while plan.status == "pending" and time.monotonic() < deadline:
        time.sleep(0.25)
        session.expire_all()
        plan = get_plan(session=session, team_id=team_id, plan_id=plan.id)
    return plan


def get_plan(*, session: Session, team_id: TeamID, plan_id: str) -> Plan:
    plan = session.scalar(select(Plan).where(Plan.id == plan_id, Plan.team_id == team_id))
    if plan is None:
        raise NotFound(f"plan {plan_id} not found", param="plan_id")
    return plan


def finish_plan(
    *,
    session: Session,
    plan_id: str,
    result: dict[str, Any] | None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    """Stores a worker's plan (status from the plan itself), or why it could not be made."""
    status = "failed" if result is None else str(result.get("status", "ready"))
    session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.status == "pending")
        .values(
            status=status,
            result=result,
            error_code=error_code,
            error_message=error_message,
            finished_at=utcnow(),
        )
    )
