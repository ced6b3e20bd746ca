"""Webhooks: a team registers URLs to be told when its jobs finish; each finish becomes a delivery row.

Registration checks the URL with the outbound URL policy (shared/urlpolicy.py); delivery (worker/webhooks.py)
checks it again before every attempt. When a job reaches succeeded, failed or cancelled, `record_job_finished`
adds one `pending` delivery per active webhook of the job's team, in the transaction that changes the job's
status: the event is stored exactly when the status is, so a crash cannot lose it.

What a receiver gets (POST, `Content-Type: application/json`):

    {"id": "evt-…", "type": "job.succeeded" | "job.failed" | "job.cancelled",
     "created_at": "2026-…+00:00", "data": {"object": "job", "id": "ftjob-…", "status": …, …}}

with the headers

    Tuneforge-Delivery-Id: whdel-…          (the same on every retry of this delivery)
    Tuneforge-Event: job.succeeded
    Tuneforge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>

How a receiver verifies a delivery (see `verify_signature`):

1. Read the raw request body as bytes, before any JSON parsing (re-serialising changes the bytes).
2. Split the signature header on "," into `t=` and `v1=` parts (ignore parts it does not know; there may be
   several `v1=` while a secret is being rotated).
3. Refuse it if `t` is further than a tolerance (5 minutes suggested) from the receiver's clock: a captured
   request cannot be replayed later. Each attempt is signed afresh, so a retry carries a current `t`.
4. Compute HMAC-SHA256 with the webhook's secret (`whsec_…`, shown once at registration) as the key over
   `t` + "." + raw body, hex-encoded, and compare with `v1` in constant time (hmac.compare_digest).
5. Deliveries are at least once: de-duplicate with the Tuneforge-Delivery-Id header (or the body's `id`).

Answer any 2xx quickly; anything else (or no answer within the timeout) is retried with growing back-off.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.errors import Conflict, InvalidRequest, NotFound
from shared.models import Job, Webhook, WebhookDelivery, new_id, utcnow
from shared.sealing import seal, unseal
from shared.settings import Settings
from shared.states import TERMINAL, JobStatus
from shared.tenancy import TeamID
from shared.urlpolicy import OutboundPolicy, URLRefused

EVENTS: tuple[str, ...] = ("job.succeeded", "job.failed", "job.cancelled")
MAX_WEBHOOKS_PER_TEAM = 20
SIGNATURE_HEADER = "Tuneforge-Signature"
DELIVERY_HEADER = "Tuneforge-Delivery-Id"
EVENT_HEADER = "Tuneforge-Event"
DEFAULT_TOLERANCE_SECONDS = 300
SECRET_PURPOSE = "webhook-secret"


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """Returns the Tuneforge-Signature header value for `body`: `t=<unix>,v1=<hex HMAC-SHA256>`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """What a receiver does: True when `header` signs `body` with `secret` and its timestamp is within
    `tolerance_seconds` of `now` (which refuses replays of old requests)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def check_url(url: str, settings: Settings) -> str:
    """Applies the outbound URL policy to a webhook URL (InvalidRequest naming `url` says why not)."""
    try:
        OutboundPolicy.from_settings(settings, timeout=settings.webhook_timeout_seconds).check(url)
    except URLRefused as exc:
        raise InvalidRequest(f"{url!r} is refused: {exc.message}", param="url") from None
    return url


def create_webhook(
    *, session: Session, settings: Settings, team_id: TeamID, url: str, events: Sequence[str] | None = None
) -> tuple[Webhook, str]:
    """Registers a webhook for a team's job events (all of them by default). Returns it with its signing
    secret, which is stored sealed (shared/sealing.py) and shown once."""
    url = url.strip()
    chosen = list(dict.fromkeys(events)) if events is not None else list(EVENTS)
    unknown = [e for e in chosen if e not in EVENTS]
    if unknown or not chosen:
        raise InvalidRequest(
            f"events must be a non-empty list of {', '.join(EVENTS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            param="events",
        )
    check_url(url, settings)
    active = session.scalar(
        select(func.count())
        .select_from(Webhook)
        .where(Webhook.team_id == team_id, Webhook.disabled_at.is_(None))
    )
    if (active or 0) >= MAX_WEBHOOKS_PER_TEAM:
        raise Conflict(
            f"a team can have at most {MAX_WEBHOOKS_PER_TEAM} webhooks; delete one first", param="url"
        )
    webhook_id = new_id("wh")
    secret = f"whsec_{secrets.token_hex(24)}"
    webhook = Webhook(
        id=webhook_id,
        team_id=team_id,
        url=url,
        secret=seal(settings, secret, purpose=SECRET_PURPOSE, bound_to=webhook_id),
        events=chosen,
        created_at=utcnow(),
    )
    session.add(webhook)
    session.flush()
    return webhook, secret


def signing_secret(settings: Settings, webhook_id: str, stored: str) -> str:
    """The clear signing secret of a webhook, from its stored (sealed) form."""
    return unseal(settings, stored, purpose=SECRET_PURPOSE, bound_to=webhook_id)


def list_webhooks(*, session: Session, team_id: TeamID) -> Sequence[Webhook]:
    """Returns a team's active webhooks, oldest first."""
    return session.scalars(
        select(Webhook)
        .where(Webhook.team_id == team_id, Webhook.disabled_at.is_(None))
        .order_by(Webhook.created_at, Webhook.id)
    ).all()


def get_webhook(*, session: Session, team_id: TeamID, webhook_id: str) -> Webhook:
    """Returns a team's active webhook, or raises NotFound (also for another team's)."""
    webhook = session.scalar(
        select(Webhook).where(
            Webhook.id == webhook_id, Webhook.team_id == team_id, Webhook.disabled_at.is_(None)
        )
    )
    if webhook is None:
        raise NotFound(f"webhook {webhook_id} not found", param="webhook_id")
    return webhook


def delete_webhook(*, session: Session, team_id: TeamID, webhook_id: str) -> None:
    """Disables a webhook (its delivery history stays) and gives up its pending deliveries."""
    webhook = get_webhook(session=session, team_id=team_id, webhook_id=webhook_id)
    now = utcnow()
    webhook.disabled_at = now
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook.id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error="the webhook was deleted", next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    session.flush()


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_payload(row: Any) -> dict[str, Any]:
    """The `data` of a job event: the job as the API shows it, less its full spec."""
    return {
        "object": "job",
        "id": row.id,
        "status": row.status,
        "method": row.method,
        "base_model": row.base_model,
        "dataset": row.dataset_uri,
        "validation_dataset": row.validation_uri,
        "priority": row.priority,
        "metadata": row.user_metadata or {},
        "attempt": row.attempt,
        "error": {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
        "trainable_params": row.trainable_params,
        "total_params": row.total_params,
        "trained_tokens": row.trained_tokens,
        "result": row.result or {},
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
    }


def record_job_finished(*, session: Session, job_id: str, status: JobStatus) -> list[WebhookDelivery]:
    """Adds a pending delivery per active webhook of the job's team that wants this event, in the caller's
    transaction (called by `jobs.transition` whenever a job changes status; only terminal ones count)."""
    if status not in TERMINAL:
        return []
    event = f"job.{status.value}"
    # The team's webhooks first: most teams have none, and then the job's row is not needed.
    team_of_job = select(Job.team_id).where(Job.id == job_id).scalar_subquery()
    webhooks = [
        w
        for w in session.scalars(
            select(Webhook).where(Webhook.team_id == team_of_job, Webhook.disabled_at.is_(None))
        )
        if event in (w.events or EVENTS)
    ]
    if not webhooks:
        return []
    # Columns, not the Job entity: the status UPDATE that just ran bypassed any Job loaded in this session.
    row = session.execute(
        select(
            Job.id,
            Job.team_id,
            Job.status,
            Job.method,
            Job.base_model,
            Job.dataset_uri,
            Job.validation_uri,
            Job.priority,
            Job.user_metadata,
            Job.attempt,
            Job.error_code,
            Job.error_message,
            Job.trainable_params,
            Job.total_params,
            Job.trained_tokens,
            Job.result,
            Job.created_at,
            Job.updated_at,
            Job.started_at,
            Job.finished_at,
        ).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return []
    now = utcnow()
    payload = {"id": new_id("evt"), "type": event, "created_at": now.isoformat(), "data": job_payload(row)}
    deliveries = [
        WebhookDelivery(
            id=new_id("whdel"),
            webhook_id=webhook.id,
            job_id=job_id,
            event=event,
            payload=payload,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        for webhook in webhooks
    ]
    session.add_all(deliveries)
    session.flush()
    return deliveries


def list_deliveries(*, session: Session, team_id: TeamID, webhook_id: str) -> Sequence[WebhookDelivery]:
    """Returns a team's webhook's deliveries, newest first (at most 100)."""
    get_webhook(session=session, team_id=team_id, webhook_id=webhook_id)
    return session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(100)
    ).all()
