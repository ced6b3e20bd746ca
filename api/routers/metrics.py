"""/metrics for Prometheus: what the database and the broker say at scrape time, so every API replica
reports the same numbers."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import case, func, select

from shared.errors import NotFound, Unauthorized
from shared.models import Job, utcnow
from shared.queue import queue_depths
from shared.settings import Settings
from shared.states import TERMINAL, JobStatus

router = APIRouter(tags=["operations"])
DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0)


class TuneforgeCollector:
    """Reads jobs and queues when Prometheus scrapes."""

    def __init__(self, settings: Settings, session_factory) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            failures = session.execute(
                select(Job.error_code, func.count())
                .where(Job.status == JobStatus.failed.value)
                .group_by(Job.error_code)
            ).all()
            bucket_counts = session.execute(
                select(
                    *[
                        func.sum(case((Job.runtime_seconds <= bound, 1), else_=0))
                        for bound in DURATION_BUCKETS
                    ],
                    func.count(),
                    func.coalesce(func.sum(Job.runtime_seconds), 0.0),
                ).where(Job.status.in_([s.value for s in TERMINAL]), Job.started_at.is_not(None))
            ).one()
            heartbeats = session.execute(
                select(Job.id, Job.heartbeat_at).where(
                    Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value])
                )
            ).all()

        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "tuneforge_running_jobs", "Jobs running or being cancelled", value=len(heartbeats)
        )
        depth = GaugeMetricFamily(
            "tuneforge_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        for queue, count in sorted(queue_depths(self.settings).items()):
            depth.add_metric([queue], count)
        yield depth
        failed = CounterMetricFamily("tuneforge_job_failures", "Failed jobs by error code", labels=["code"])
        for code, count in failures:
            failed.add_metric([code or "unknown"], count)
        yield failed
        *cumulative, total, total_seconds = bucket_counts
        histogram = HistogramMetricFamily(
            "tuneforge_job_run_seconds", "Run time of finished jobs, all attempts together"
        )
        buckets = [
            (str(bound), int(count or 0)) for bound, count in zip(DURATION_BUCKETS, cumulative, strict=True)
        ]
        histogram.add_metric([], [*buckets, ("+Inf", int(total))], float(total_seconds))
        yield histogram
        now = utcnow()
        ages = GaugeMetricFamily(
            "tuneforge_heartbeat_age_seconds",
            "Seconds since each running job's worker last checked in",
            labels=["job_id"],
        )
        for job_id, beat in heartbeats:
            ages.add_metric([job_id], (now - beat).total_seconds() if beat else float("inf"))
        yield ages


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics; needs `Authorization: Bearer <TUNEFORGE_METRICS_TOKEN>`."""
    settings: Settings = request.app.state.settings
    if settings.metrics_token is None:
        raise NotFound("metrics are off; set TUNEFORGE_METRICS_TOKEN to serve them", param="metrics")
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.encode(), settings.metrics_token.get_secret_value().encode()
    ):
        raise Unauthorized("send the metrics token as `Authorization: Bearer <token>`", param="authorization")
    registry = CollectorRegistry()
    registry.register(TuneforgeCollector(settings, request.app.state.session_factory))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
