"""Webhook delivery, run by every worker's maintenance loop (see shared/services/webhooks.py for the payload,
the signature and how a receiver checks it).

Several workers may run this at once. A delivery is claimed by a compare-and-swap UPDATE (same `attempts`,
still pending and due) that counts the attempt and pushes `next_attempt_at` past the time one delivery can
take; on PostgreSQL the candidates are first selected with FOR UPDATE SKIP LOCKED, so workers do not even
contend for the same rows. A worker that dies mid-delivery leaves the row pending: it is due again when that
lease runs out (deliveries are at least once). The result is written only if the row still carries this
attempt's number.

A 2xx answer marks the delivery `delivered`. Anything else — another status, a timeout, a refused URL (the
outbound policy checks the URL again before every attempt) — schedules a retry after
min(backoff_max, backoff_base * 2**(attempts-1)) seconds, until webhook_max_attempts, then marks the
delivery `failed` with the last error.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from shared.db import session_scope
from shared.models import Webhook, WebhookDelivery, utcnow
from shared.sealing import SealError
from shared.services.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    sign,
    signing_secret,
)
from shared.settings import Settings
from shared.urlpolicy import OutboundError, OutboundPolicy, open_url

log = logging.getLogger(__name__)

BATCH = 16
THREADS = 8
ERROR_SNIPPET = 300


@dataclass(frozen=True)
class Claimed:
    id: str
    attempt: int
    url: str
    webhook_id: str
    secret: str  # as stored: sealed
    event: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    error: str | None


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt."""
    base = settings.webhook_backoff_base_seconds
    return min(settings.webhook_backoff_max_seconds, base * 2 ** max(attempts - 1, 0))


def lease_seconds(settings: Settings) -> float:
    """How long a claimed delivery stays hidden from other workers: longer than a round of sends takes."""
    per_send = 3 * settings.webhook_timeout_seconds * (settings.outbound_max_redirects + 1)
    return per_send * -(-BATCH // THREADS) + 60


def claim_due(settings: Settings, *, now: datetime | None = None, limit: int = BATCH) -> list[Claimed]:
    """Claims up to `limit` due deliveries of active webhooks for this worker (one attempt each)."""
    now = now or utcnow()
    lease_until = now + timedelta(seconds=lease_seconds(settings))
    due = or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now)
    claimed: list[Claimed] = []
    with session_scope(settings.database_url) as session:
        query = (
            select(
                WebhookDelivery.id,
                WebhookDelivery.attempts,
                WebhookDelivery.event,
                WebhookDelivery.payload,
                Webhook.url,
                Webhook.id.label("webhook_id"),
                Webhook.secret,
            )
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.status == "pending", due, Webhook.disabled_at.is_(None))
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
        for row in session.execute(query).all():
            result = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == row.id,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.attempts == row.attempts,
                    due,
                )
                .values(attempts=row.attempts + 1, next_attempt_at=lease_until)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                claimed.append(
                    Claimed(
                        row.id,
                        row.attempts + 1,
                        row.url,
                        row.webhook_id,
                        row.secret,
                        row.event,
                        dict(row.payload),
                    )
                )
    return claimed


def send(settings: Settings, delivery: Claimed) -> Outcome:
    """Makes one attempt: POSTs the signed event through the outbound URL policy."""
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    try:
        secret = signing_secret(settings, delivery.webhook_id, delivery.secret)
    except SealError as exc:
        return Outcome(False, None, str(exc))
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, body),
        DELIVERY_HEADER: delivery.id,
        EVENT_HEADER: delivery.event,
    }
    policy = OutboundPolicy.from_settings(settings, timeout=settings.webhook_timeout_seconds)
    try:
        with open_url("POST", delivery.url, policy=policy, headers=headers, content=body) as response:
            if 200 <= response.status_code < 300:
                return Outcome(True, response.status_code, None)
            snippet = b""
            for chunk in response.iter_bytes():
                snippet += chunk
                if len(snippet) >= ERROR_SNIPPET:
                    break
            text = snippet[:ERROR_SNIPPET].decode("utf-8", "replace").strip()
            return Outcome(
                False, response.status_code, f"HTTP {response.status_code}" + (f": {text}" if text else "")
            )
    except OutboundError as exc:  # URLRefused included: the URL is checked again before every attempt
        return Outcome(False, None, exc.message)
    except Exception as exc:  # never let one receiver break the round
        log.warning("webhook delivery %s failed unexpectedly", delivery.id, exc_info=True)
        return Outcome(False, None, f"{type(exc).__name__}: {exc}")


def record(settings: Settings, delivery: Claimed, outcome: Outcome) -> str:
    """Writes an attempt's result (only if the row is still this attempt's); returns the new status."""
    now = utcnow()
    values: dict[str, Any] = {"last_status_code": outcome.status_code}
    if outcome.ok:
        values |= {"status": "delivered", "delivered_at": now, "next_attempt_at": None, "last_error": None}
    elif delivery.attempt >= settings.webhook_max_attempts:
        values |= {
            "status": "failed",
            "next_attempt_at": None,
            "last_error": f"gave up after {delivery.attempt} attempts; last error: {outcome.error}",
        }
    else:
        wait = backoff_seconds(settings, delivery.attempt)
        values |= {"next_attempt_at": now + timedelta(seconds=wait), "last_error": outcome.error}
    with session_scope(settings.database_url) as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery.id,
                WebhookDelivery.attempts == delivery.attempt,
                WebhookDelivery.status == "pending",
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return values.get("status", "pending")


def _attempt(settings: Settings, delivery: Claimed) -> str:
    outcome = send(settings, delivery)
    status = record(settings, delivery, outcome)
    if not outcome.ok:
        log.info(
            "webhook delivery %s (%s) attempt %d: %s; now %s",
            delivery.id,
            delivery.event,
            delivery.attempt,
            outcome.error,
            status,
        )
    return status


def deliver_due_webhooks(
    settings: Settings, *, now: datetime | None = None, limit: int = BATCH
) -> dict[str, int]:
    """One round: claims due deliveries and attempts each once, several at a time. Returns how many ended
    delivered, pending (to retry) and failed."""
    claimed = claim_due(settings, now=now, limit=limit)
    counts = {"delivered": 0, "pending": 0, "failed": 0}
    if not claimed:
        return counts
    with ThreadPoolExecutor(max_workers=min(THREADS, len(claimed)), thread_name_prefix="webhook") as pool:
        for status in pool.map(lambda d: _attempt(settings, d), claimed):
            counts[status] += 1
    return counts
