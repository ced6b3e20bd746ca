"""/metrics for Prometheus: what the database and the broker say at scrape time, so every API replica
reports the same numbers."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from shared.errors import NotFound, Unauthorized
from shared.models import utcnow
from shared.queue import queue_depths
from shared.services import operations
from shared.services.operations import DURATION_BUCKETS
from shared.settings import Settings
from shared.states import JobStatus

router = APIRouter(tags=["operations"])


class TuneforgeCollector:
    """Reads jobs and queues when Prometheus scrapes."""

    def __init__(self, settings: Settings, session_factory) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            stats = operations.job_statistics(session=session)
        by_status = stats.by_status
        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "tuneforge_running_jobs", "Jobs running or being cancelled", value=len(stats.heartbeats)
        )
        depth = GaugeMetricFamily(
            "tuneforge_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        for queue, count in sorted(queue_depths(self.settings).items()):
            depth.add_metric([queue], count)
        yield depth
        failed = CounterMetricFamily("tuneforge_job_failures", "Failed jobs by error code", labels=["code"])
        for code, count in stats.failures:
            failed.add_metric([code or "unknown"], count)
        yield failed
        histogram = HistogramMetricFamily(
            "tuneforge_job_run_seconds", "Run time of finished jobs, all attempts together"
        )
        buckets = [
            (str(bound), count) for bound, count in zip(DURATION_BUCKETS, stats.runtime_buckets, strict=True)
        ]
        histogram.add_metric([], [*buckets, ("+Inf", stats.finished)], stats.finished_seconds)
        yield histogram
        now = utcnow()
        ages = GaugeMetricFamily(
            "tuneforge_heartbeat_age_seconds",
            "Seconds since each running job's worker last checked in",
            labels=["job_id"],
        )
        for job_id, beat in stats.heartbeats:
            ages.add_metric([job_id], (now - beat).total_seconds() if beat else float("inf"))
        yield ages
        gpus = GaugeMetricFamily(
            "tuneforge_node_gpus",
            "GPUs of each node worker, busy or free",
            labels=["worker", "host", "state"],
        )
        node_ages = GaugeMetricFamily(
            "tuneforge_node_heartbeat_age_seconds",
            "Seconds since each node worker last checked in (a stale one holds no GPUs: its jobs are reaped)",
            labels=["worker", "host"],
        )
        for worker_id, host, total, busy, beat in stats.nodes:
            gpus.add_metric([worker_id, host, "busy"], busy)
            gpus.add_metric([worker_id, host, "free"], total - busy)
            node_ages.add_metric([worker_id, host], (now - beat).total_seconds())
        yield gpus
        yield node_ages


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
