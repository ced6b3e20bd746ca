"""What the web console reads, on real PostgreSQL, Redis and S3: a training job's progress and estimated finish,
metric points on the job's server-sent events, each bad line of a refused upload, a job's evaluation (404 until
it has one, and for another team), jobs naming experiment trackers, and the console's and the API docs' pages
served with their assets by the API itself (no CDN, no inline script)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from shared.db import session_scope
from shared.models import Artifact, Job, JobMetric
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset


@pytest.fixture
def team(settings, tiny_model_dir, make_team, store):
    """A client of a team of its own (on a deployment with an MLflow server named), with a dataset."""
    team_id, key = make_team()
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(8)), team_id=team_id).id
    deployment = settings.model_copy(
        update={"mlflow_tracking_uri": "http://127.0.0.1:9", "wandb_mode": "offline"}
    )
    with TestClient(create_app(deployment), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, team_id, dataset


def submit(client, dataset: str, **extra) -> dict:
    body = {"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 40}} | extra
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_training_job_shows_its_step_total_and_estimated_finish(team, settings):
    client, _, dataset = team
    job = submit(client, dataset)
    assert job["progress"] is None
    started = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running", attempt=2))
        # Attempt 1 logged steps 1-4 long ago; attempt 2 resumed at step 3 and logs a step every 2 s.
        for step in range(1, 5):
            session.add(
                JobMetric(
                    job_id=job["id"],
                    attempt=1,
                    split="train",
                    step=step,
                    loss=2.0,
                    created_at=started - timedelta(hours=1),
                )
            )
        session.flush()
        session.execute(
            update(JobMetric)
            .where(JobMetric.job_id == job["id"], JobMetric.step >= 3)
            .values(attempt=2, created_at=started)
        )
        for step in range(5, 11):
            session.add(
                JobMetric(
                    job_id=job["id"],
                    attempt=2,
                    split="train",
                    step=step,
                    loss=1.0,
                    epoch=step / 8,
                    created_at=started + timedelta(seconds=2 * (step - 3)),
                )
            )
    progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
    assert progress["step"] == 10 and progress["total_steps"] == 40 and progress["fraction"] == 0.25
    # 2 s a step over the current attempt's steps 3-10; 30 steps left.
    finish = datetime.fromisoformat(progress["estimated_finish"])
    assert finish == started + timedelta(seconds=14) + timedelta(seconds=60)
    listed = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
    assert [j["progress"] for j in listed if j["id"] == job["id"]] == [progress]

    # An epoch-based job: the total from the latest step's epoch (10 steps = 1.25 of 3 epochs).
    with session_scope(settings.database_url) as session:
        stored = session.get(Job, job["id"])
        stored.spec = {
            **stored.spec,
            "hyperparameters": {**stored.spec["hyperparameters"], "max_steps": None, "epochs": 3},
        }
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["total_steps"] == 24
    # Once it ends, no progress is read.
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="cancelled"))
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"] is None


def test_the_event_stream_carries_the_metric_points_when_asked(team, settings):
    client, _, dataset = team
    job = submit(client, dataset)
    with session_scope(settings.database_url) as session:
        for step in (1, 2, 3):
            session.add(JobMetric(job_id=job["id"], attempt=1, split="train", step=step, loss=1.0 / step))
        session.add(JobMetric(job_id=job["id"], attempt=1, split="eval", step=3, loss=0.7))
    client.post(f"/v1/jobs/{job['id']}/cancel")

    def stream(**params) -> list[tuple[str, dict]]:
        with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", params=params) as response:
            text = response.read().decode()
        blocks = [b for b in text.split("\n\n") if b.startswith(("event:", "id:"))]
        found = []
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            found.append((fields["event"], json.loads(fields["data"])))
        return found

    with_points = stream(metrics="true")
    points = [(d["split"], d["step"], d["loss"]) for kind, d in with_points if kind == "metric"]
    assert points == [("train", 1, 1.0), ("train", 2, 0.5), ("train", 3, 1 / 3), ("eval", 3, 0.7)]
    assert with_points[-1][0] == "end"
    assert "metric" not in [kind for kind, _ in stream()]


def test_a_refused_upload_names_each_bad_line(team):
    client, _, _ = team
    bad = b'{"text": "ok"}\n{"txt": "typo"}\n{"text": "ok"}\n{broken\n'
    response = client.post("/v1/files", files={"file": ("bad.jsonl", bad)})
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "invalid_dataset" and body["error"]["param"] == "file"
    assert [(d["line"], d["param"]) for d in body["details"]] == [(2, "file"), (4, "file")]
    assert "invalid JSON" in body["details"][1]["message"]


def test_the_evaluation_is_404_until_stored_and_for_other_teams(team, settings, store, make_team):
    client, team_id, dataset = team
    job = submit(client, dataset)
    assert client.get(f"/v1/jobs/{job['id']}/evaluation").status_code == 404
    document = {
        "base_model": TINY_MODEL,
        "max_new_tokens": 8,
        "perplexity": {"before": 9.0, "after": 3.0, "samples": 2},
        "samples": [
            {"source": "eval_prompts", "prompt": "hi", "reference": None, "base": "b", "adapter": "a"}
        ],
    }
    data = json.dumps(document).encode()
    stored = store.put_bytes(f"artifacts/{team_id}/{job['id']}/attempt-1/evaluation/samples.json", data)
    with session_scope(settings.database_url) as session:
        session.add(
            Artifact(
                job_id=job["id"],
                team_id=team_id,
                kind="evaluation",
                name="samples.json",
                storage_key=stored.key,
                size_bytes=stored.size,
                sha256=stored.sha256,
            )
        )
    answer = client.get(f"/v1/jobs/{job['id']}/evaluation").json()
    assert answer["samples"] == document["samples"] and answer["perplexity"] == document["perplexity"]
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    _, other_key = make_team()
    other = client.get(f"/v1/jobs/{job['id']}/evaluation", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 404


def test_jobs_name_their_trackers_in_openais_shape(team, settings, tiny_model_dir, api_key):
    client, _, dataset = team
    integrations = [
        {"type": "wandb", "wandb": {"project": "support-bot", "tags": ["v1"]}},
        {"type": "mlflow", "mlflow": {"experiment": "support-bot"}},
    ]
    job = submit(client, dataset, integrations=integrations)
    assert [i["type"] for i in job["integrations"]] == ["wandb", "mlflow"]
    assert job["integrations"][0]["wandb"]["tags"] == ["v1"]
    twice = client.post(
        "/v1/jobs",
        json={
            "base_model": TINY_MODEL,
            "dataset": dataset,
            "integrations": [{"type": "mlflow"}, {"type": "mlflow"}],
        },
    )
    assert (twice.status_code, twice.json()["error"]["param"]) == (422, "integrations.1.type")
    merge = client.post(
        "/v1/jobs",
        json={
            "method": "merge",
            "integrations": [{"type": "mlflow"}],
            "merge": {"sources": [{"job_id": "a"}, {"job_id": "b"}]},
        },
    )
    assert (merge.status_code, merge.json()["error"]["param"]) == (422, "integrations")
    # A deployment without an MLflow server refuses the integration, naming it.
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {api_key}"}) as plain:
        refused = plain.post(
            "/v1/jobs",
            json={"base_model": TINY_MODEL, "dataset": "file-x", "integrations": [{"type": "mlflow"}]},
        )
    assert (refused.status_code, refused.json()["error"]["param"]) == (422, "integrations.0")


def test_the_console_and_the_api_docs_are_served_by_the_api(team):
    client, _, _ = team
    page = client.get("/ui")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "default-src 'none'" in policy
    )
    html = page.text
    # No inline script or style, and nothing from another origin.
    assert (
        not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and "<style" not in html and "style=" not in html
    )
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
    assert assets and all(client.get(path).status_code == 200 for path in assets)
    assert "http" not in html.replace('"/', "")
    script = client.get("/ui/assets/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert (
        client.get("/ui/assets/app.js", headers={"If-None-Match": script.headers["etag"]}).status_code == 304
    )
    for path in ("/docs", "/redoc"):
        docs = client.get(path)
        assert docs.status_code == 200
        urls = re.findall(r'(?:src|href|url)\s*[=:]\s*["\']([^"\']+)["\']', docs.text)
        assert urls and not [u for u in urls if "://" in u], urls
        assert all(client.get(u).status_code == 200 for u in urls if u.startswith("/docs-assets/"))
