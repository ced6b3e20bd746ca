"""/metrics: Prometheus text with queue depth, running jobs, run times, failures by code, heartbeat age."""

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import update

from api.main import create_app
from shared.db import session_scope
from shared.models import Job, utcnow
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl


def test_metrics_need_their_token_and_describe_the_jobs(settings, api_client):
    scraper = TestClient(create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-me")})))
    assert scraper.get("/metrics").status_code == 401
    assert scraper.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # Without a configured token the endpoint is off.
    assert TestClient(create_app(settings)).get("/metrics").status_code == 404

    dataset = api_client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))}).json()[
        "id"
    ]
    failed, running = (
        api_client.post("/v1/jobs", json={"base_model": TINY_MODEL, "dataset": dataset}).json()["id"]
        for _ in range(2)
    )
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == failed)
            .values(status="failed", error_code="out_of_memory", started_at=utcnow(), runtime_seconds=120.0)
        )
        session.execute(
            update(Job)
            .where(Job.id == running)
            .values(status="running", heartbeat_at=utcnow() - timedelta(seconds=42), attempt=1)
        )

    response = scraper.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("tuneforge_job_failures_total", (("code", "out_of_memory"),))] >= 1
    assert samples[("tuneforge_jobs", (("status", "running"),))] >= 1
    assert samples[("tuneforge_running_jobs", ())] >= 1
    age = samples[("tuneforge_heartbeat_age_seconds", (("job_id", running),))]
    assert 40 <= age < 120
    assert samples[("tuneforge_job_run_seconds_bucket", (("le", "300.0"),))] >= 1
    assert samples[("tuneforge_job_run_seconds_count", ())] >= 1
    assert any(name == "tuneforge_queue_depth" for name, _ in samples)


def test_metrics_show_each_node_s_busy_and_free_gpus(settings):
    from shared.services import claims
    from shared.services.claims import NodeCapacity

    node = NodeCapacity(worker_id="metrics-node", total_gpus=8, free_gpus=(0, 3, 4, 5, 6), host="gpu-17")
    with session_scope(settings.database_url) as session:
        claims.beat(session=session, node=node, leases=[])
    scraper = TestClient(create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-me")})))
    try:
        response = scraper.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(response.text)
            for s in f.samples
        }
        labels = (("host", "gpu-17"), ("worker", "metrics-node"))
        assert samples[("tuneforge_node_gpus", (*labels[:1], ("state", "busy"), labels[1]))] == 3
        assert samples[("tuneforge_node_gpus", (*labels[:1], ("state", "free"), labels[1]))] == 5
        assert samples[("tuneforge_node_heartbeat_age_seconds", labels)] < 60
    finally:
        with session_scope(settings.database_url) as session:
            claims.retire_node(session=session, worker_id="metrics-node")
