"""/v1/webhooks: URLs told (signed POSTs) when the team's jobs succeed, fail or are cancelled.

How a receiver verifies a delivery is documented in shared/services/webhooks.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerTeam, SessionDep, SettingsDep
from shared.models import Webhook, WebhookDelivery
from shared.services import webhooks as webhook_service

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

Event = Literal["job.succeeded", "job.failed", "job.cancelled"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http(s) URL; it must pass the outbound URL policy")
    events: list[Event] | None = Field(
        None, min_length=1, description="events to send; default: all job events"
    )


class WebhookOut(BaseModel):
    object: Literal["webhook"] = "webhook"
    id: str
    url: str
    events: list[str]
    created_at: datetime

    @classmethod
    def of(cls, webhook: Webhook) -> WebhookOut:
        return cls(id=webhook.id, url=webhook.url, events=list(webhook.events), created_at=webhook.created_at)


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="signing secret (HMAC-SHA256 key of Tuneforge-Signature); shown only in this answer"
    )


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookOut]


class DeliveryOut(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str
    webhook_id: str
    job_id: str
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, d: WebhookDelivery) -> DeliveryOut:
        return cls(
            id=d.id,
            webhook_id=d.webhook_id,
            job_id=d.job_id,
            event=d.event,
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
        )


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated)
def create_webhook(
    body: WebhookCreate, session: SessionDep, settings: SettingsDep, team: CallerTeam
) -> WebhookCreated:
    """Registers a webhook; the answer shows its signing secret, once."""
    webhook, secret = webhook_service.create_webhook(
        session=session, settings=settings, team_id=team, url=body.url, events=body.events
    )
    session.commit()  # on an error the session closes uncommitted (api/deps.py)
    return WebhookCreated(**WebhookOut.of(webhook).model_dump(), secret=secret)


@router.get("", response_model=WebhookList)
def list_webhooks(session: SessionDep, team: CallerTeam) -> WebhookList:
    """Lists the team's webhooks (without their secrets)."""
    return WebhookList(
        data=[WebhookOut.of(w) for w in webhook_service.list_webhooks(session=session, team_id=team)]
    )


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(webhook_id: str, session: SessionDep, team: CallerTeam) -> DeliveryList:
    """Lists a webhook's latest deliveries (at most 100, newest first) with their attempts and last error."""
    rows = webhook_service.list_deliveries(session=session, team_id=team, webhook_id=webhook_id)
    return DeliveryList(data=[DeliveryOut.of(d) for d in rows])


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_webhook(webhook_id: str, session: SessionDep, team: CallerTeam) -> Response:
    """Deletes a webhook; its pending deliveries are given up."""
    webhook_service.delete_webhook(session=session, team_id=team, webhook_id=webhook_id)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
