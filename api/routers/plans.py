"""/v1/plans: a dry run of a job — the checks it would get before queueing, and what it would cost."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse, Response

from api.deps import CallerTeam, SessionDep, SettingsDep, StoreDep
from api.schemas import PlanOut
from shared.schemas import JobSpec
from shared.services import plans as plan_service

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post(
    "",
    response_model=PlanOut,
    responses={
        202: {"description": "the plan is still being made; poll its URL"},
        422: {"description": "refused"},
    },
)
def create_plan(
    spec: JobSpec,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CallerTeam,
) -> Response:
    """Plans a job without running it: dataset samples, token counts and truncation with the first sample
    rendered with its loss mask; trainable parameters (counted on the meta device, no weights loaded); the
    peak GPU memory estimate per GPU; and refusals of combinations known not to work (422)."""
    plan = plan_service.request_plan(session=session, settings=settings, store=store, team_id=team, spec=spec)
    out = PlanOut.of(plan)
    body = out.model_dump(mode="json")
    if plan.status == "pending":
        return JSONResponse(
            body, status_code=status.HTTP_202_ACCEPTED, headers={"Location": f"/v1/plans/{plan.id}"}
        )
    if plan.status == "refused":
        first = (plan.result or {}).get("refusals", [{}])[0]
        error = {
            "code": "refused_combination",
            "message": first.get("message", "refused"),
            "param": first.get("param"),
        }
        return JSONResponse({"error": error, "plan": body}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    return JSONResponse(body, status_code=status.HTTP_200_OK)


@router.get("/{plan_id}", response_model=PlanOut)
def get_plan(plan_id: str, session: SessionDep, team: CallerTeam) -> PlanOut:
    """Returns a plan (pending, ready, refused or failed)."""
    return PlanOut.of(plan_service.get_plan(session=session, team_id=team, plan_id=plan_id))
