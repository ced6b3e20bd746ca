"""Team isolation, route by route: team A's key on team B's resources answers 404 on every endpoint that
takes a resource id, and no list shows team B's ids to team A.

The routes come from the app itself (so a new route is covered as soon as it exists, or fails the test if it
takes an id the matrix cannot fill). Team B gets one of each resource, written through the services and the
object store (no worker runs here): an uploaded file, a training job that has not started, a finished job
with adapter artifacts, a checkpoint, metrics and events (so its OpenAI results file exists), a plan, and a
webhook with a delivery. Every call with A's key has a control call with B's key that must reach the
resource, so a 404 for A means "not yours", never "wrong URL".

Also: every list (every GET route without a path id) is read by both teams, and neither sees the other's
ids; team B's ids in team A's bodies and cursors are refused as unknown. Naming another team's stored
objects by their s3:// storage key is refused too.

Nothing here reaches a worker: the app sends to queues of its own, and every job that has not finished is
cancelled at teardown (so no sweeper re-sends it).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from api.main import create_app
from shared.db import session_scope
from shared.models import Checkpoint, Job, UploadedFile, Webhook, WebhookDelivery, new_id, utcnow
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.services import plans as plan_service
from shared.services import webhooks as webhook_service
from shared.settings import Settings
from shared.states import TERMINAL, JobStatus
from shared.storage import ObjectStore
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl

# A public address written as a literal: the URL policy accepts it without a DNS query. Nothing is ever
# sent to it (the seeded delivery is already `delivered`, and the webhooks are deleted at teardown).
WEBHOOK_URL = "https://93.184.216.34/tuneforge-isolation"
CHECKPOINT_STEP = 2
CHECKPOINT_PREFIX = f"step-{CHECKPOINT_STEP:08d}"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT_FILES = (
    f"{CHECKPOINT_PREFIX}/adapter_model.safetensors",
    f"{CHECKPOINT_PREFIX}/trainer_state.json",
)


@dataclass
class TeamResources:
    """One of each resource of a team, with the ids a route's path parameters take."""

    team_id: str
    key: str
    file_id: str
    job_id: str  # a training job that has not started (validating; never sent to a broker)
    finished_job_id: str  # a succeeded training job with artifacts, a checkpoint and metrics
    results_file_id: str  # the finished job's OpenAI results file (made on request, never stored)
    plan_id: str
    webhook_id: str
    delivery_id: str
    artifacts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> names

    @property
    def ids(self) -> set[str]:
        """Every id of this team that must never appear in another team's answers."""
        return {
            self.file_id,
            self.job_id,
            self.finished_job_id,
            self.results_file_id,
            self.plan_id,
            self.webhook_id,
            self.delivery_id,
        }


def _training_spec(file_id: str, **metadata: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": TINY_MODEL,
            "dataset": file_id,
            "adapter": {"rank": 4, "target_modules": "attention"},
            "hyperparameters": {"max_steps": 4},
            "metadata": metadata,
        }
    )


def seed_team(
    settings: Settings,
    store: ObjectStore,
    client: TestClient,
    team_id: str,
    key: str,
    headers: dict[str, str] | None = None,
) -> TeamResources:
    """Creates one of each resource for `team_id` (uploading the file through `client`). Nothing is queued."""
    upload = client.post(
        "/v1/files", files={"file": ("colors.jsonl", to_jsonl(color_messages(8)))}, headers=headers
    )
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]

    with session_scope(settings.database_url) as session:
        pending = job_service.create_job(
            session=session, settings=settings, store=store, team_id=team_id, spec=_training_spec(file_id)
        )
        finished = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=team_id,
            spec=_training_spec(file_id, role="finished"),
        )
        job_id, finished_id = pending.id, finished.id
        plan = plan_service.create_plan(
            session=session, settings=settings, store=store, team_id=team_id, spec=_training_spec(file_id)
        )
        plan_id = plan.id

    # The finished job: what a worker leaves behind, written directly (no training here).
    adapter_config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
        "use_rslora": False,
        "base_model_name_or_path": TINY_MODEL,
    }
    contents = {
        "adapter_config.json": json.dumps(adapter_config).encode(),
        "adapter_model.safetensors": secrets.token_bytes(256),
        f"{CHECKPOINT_PREFIX}/adapter_model.safetensors": secrets.token_bytes(128),
        f"{CHECKPOINT_PREFIX}/trainer_state.json": b'{"global_step": 2}',
    }
    # Where a worker puts them (worker/runner.py, worker/reporting.py).
    keys = {name: f"artifacts/{team_id}/{finished_id}/attempt-1/adapter/{name}" for name in ADAPTER_FILES}
    keys |= {name: f"artifacts/{team_id}/{finished_id}/checkpoints/{name}" for name in CHECKPOINT_FILES}
    stored = {name: store.put_bytes(keys[name], data) for name, data in contents.items()}
    samples = {"samples": [{"prompt": "sky?", "base": "grey", "adapter": "blue", "source": "eval_prompts"}]}
    evaluation = store.put_bytes(
        f"artifacts/{team_id}/{finished_id}/attempt-1/evaluation/samples.json", json.dumps(samples).encode()
    )
    now = utcnow()
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == finished_id)
            .values(
                status=JobStatus.succeeded.value,
                attempt=1,
                started_at=now,
                finished_at=now,
                trained_tokens=1234,
                trainable_params=5678,
                total_params=100_000,
                result={"train_loss": 0.5},
            )
        )
        row = session.get(Job, finished_id)
        artifact_service.record_artifacts(
            session=session, job=row, kind="adapter", stored=[(n, stored[n]) for n in ADAPTER_FILES]
        )
        artifact_service.record_artifacts(
            session=session, job=row, kind="checkpoint", stored=[(n, stored[n]) for n in CHECKPOINT_FILES]
        )
        artifact_service.record_artifacts(
            session=session, job=row, kind="evaluation", stored=[("samples.json", evaluation)]
        )
        session.add(
            Checkpoint(
                job_id=finished_id,
                attempt=1,
                step=CHECKPOINT_STEP,
                prefix=CHECKPOINT_PREFIX,
                num_files=len(CHECKPOINT_FILES),
                size_bytes=sum(stored[n].size for n in CHECKPOINT_FILES),
                metrics={"loss": 0.7},
            )
        )
        for step in (1, 2, 3, 4):
            job_service.record_metric(
                session=session,
                job_id=finished_id,
                attempt=1,
                split="train",
                step=step,
                values={
                    "loss": 1.0 / step,
                    "learning_rate": 2e-4,
                    "epoch": step / 4,
                    "num_tokens": 100 * step,
                },
            )
        job_service.record_metric(
            session=session, job_id=finished_id, attempt=1, split="eval", step=2, values={"loss": 0.8}
        )
        job_service.add_event(
            session=session,
            job_id=finished_id,
            type="status",
            message="job is succeeded",
            attempt=1,
            data={"status": "succeeded"},
        )

        webhook, _ = webhook_service.create_webhook(
            session=session, settings=settings, team_id=team_id, url=WEBHOOK_URL, events=None
        )
        delivery = WebhookDelivery(
            id=new_id("whdel"),
            webhook_id=webhook.id,
            job_id=finished_id,
            event="job.succeeded",
            payload={"id": "evt-isolation", "type": "job.succeeded", "data": {"id": finished_id}},
            status="delivered",
            attempts=1,
            last_status_code=200,
            delivered_at=now,
        )
        session.add(delivery)
        webhook_id, delivery_id = webhook.id, delivery.id

    return TeamResources(
        team_id=team_id,
        key=key,
        file_id=file_id,
        job_id=job_id,
        finished_job_id=finished_id,
        results_file_id="file-results-" + finished_id.removeprefix("ftjob-"),
        plan_id=plan_id,
        webhook_id=webhook_id,
        delivery_id=delivery_id,
        artifacts={"adapter": ADAPTER_FILES, "checkpoint": CHECKPOINT_FILES, "evaluation": ("samples.json",)},
    )


def retire_team(settings: Settings, team_id: str) -> None:
    """Leaves nothing of a team for later tests' workers: its webhooks are deleted (their pending deliveries
    given up) and every job that has not finished is cancelled, so no sweeper re-sends it to a broker."""
    with session_scope(settings.database_url) as session:
        for hook_id in session.scalars(
            select(Webhook.id).where(Webhook.team_id == team_id, Webhook.disabled_at.is_(None))
        ).all():
            webhook_service.delete_webhook(session=session, team_id=team_id, webhook_id=hook_id)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.team_id == team_id, Job.status.not_in([s.value for s in TERMINAL]))
            .values(status=JobStatus.cancelled.value, finished_at=utcnow(), enqueued_at=None)
        )


def say(request: pytest.FixtureRequest, text: str) -> None:
    """Prints past pytest's output capture, so that the tally shows in every run."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        print(text)


# ------------------------------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Binding:
    """Values for a route's path parameters that name one of team B's resources."""

    label: str
    values: dict[str, str]


def bindings_for(params: frozenset[str], b: TeamResources) -> list[Binding] | None:
    """Every way to fill `params` with team B's resources, or None when the matrix cannot fill them."""
    jobs = [("job", b.job_id), ("finished job", b.finished_job_id)]
    if params == {"job_id"} or params == {"fine_tuning_job_id"}:
        (name,) = params
        return [Binding(label, {name: value}) for label, value in jobs]
    if params == {"file_id"}:
        return [
            Binding("file", {"file_id": b.file_id}),
            Binding("results file", {"file_id": b.results_file_id}),
        ]
    if params == {"plan_id"}:
        return [Binding("plan", {"plan_id": b.plan_id})]
    if params == {"webhook_id"}:
        return [Binding("webhook", {"webhook_id": b.webhook_id})]
    if params == {"job_id", "step"}:
        return [Binding("checkpoint", {"job_id": b.finished_job_id, "step": str(CHECKPOINT_STEP)})]
    if params == {"job_id", "kind"}:
        return [
            Binding(f"{kind} archive", {"job_id": b.finished_job_id, "kind": kind}) for kind in b.artifacts
        ]
    if params == {"job_id", "kind", "name"}:
        return [
            Binding(f"{kind} file {name}", {"job_id": b.finished_job_id, "kind": kind, "name": name})
            for kind, names in b.artifacts.items()
            for name in names
        ]
    return None


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # e.g. /v1/jobs/{job_id}/artifacts/{kind}/{name:path}
    name: str
    params: frozenset[str]

    def url(self, values: dict[str, str]) -> str:
        return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values[m.group(1)], self.path)

    @property
    def changes_state(self) -> bool:
        return self.method not in ("GET", "HEAD")


def app_routes(app) -> list[Route]:
    """Every method and path the app serves, from its router (documented or not)."""
    routes = []
    for context in iter_route_contexts(app.routes):
        if isinstance(context.route, Mount) and isinstance(context.route.app, StaticFiles):
            continue  # the console's and the API docs' scripts and styles: the same files for everyone
        path = context.path
        methods = sorted((context.methods or set()) - {"HEAD"})
        assert path and methods, f"a route the matrix does not understand: {context!r}"
        params = frozenset(re.findall(r"\{(\w+)(?::\w+)?\}", path))
        routes.extend(Route(method, path, context.name or "", params) for method in methods)
    return routes


# Bodies for the routes that take one; each names only the caller's own things, so that a 404 can come
# only from the path's id.
BODIES: dict[str, dict[str, Any]] = {"export_job": {"dtype": "float16"}}
# Control calls made for the finished job only: the event stream ends only when its job does, and a job has an
# evaluation only once it finished.
FINISHED_ONLY = {"stream_events", "get_evaluation"}
# (routes with ids, calls with another team's key) today: fewer means that routes or resources were skipped.
MATRIX_FLOOR = (21, 40)


def call(client: TestClient, route: Route, url: str, key: str):
    # A download's 307 to a presigned URL is its answer: the test client could not reach storage anyway.
    return client.request(
        route.method,
        url,
        headers={"Authorization": f"Bearer {key}"},
        json=BODIES.get(route.name),
        follow_redirects=False,
    )


def leaked(text: str, ids: set[str]) -> list[str]:
    return sorted(i for i in ids if i in text)


@pytest.fixture
def teams(
    settings, store, tiny_model_dir, make_team
) -> Iterator[tuple[TestClient, TeamResources, TeamResources]]:
    """Fresh teams A and B, each with one of each resource, and a client that sends no key by itself. Jobs
    the calls create go to queues of their own, which no worker reads."""
    isolated = settings.model_copy(
        update={"queue_prefix": f"{settings.queue_prefix}-isolation", "plan_wait_seconds": 0.0}
    )
    a_id, a_key = make_team(f"isolation-a-{secrets.token_hex(3)}")
    b_id, b_key = make_team(f"isolation-b-{secrets.token_hex(3)}")
    with TestClient(create_app(isolated)) as client:
        try:
            a = seed_team(isolated, store, client, a_id, a_key, headers={"Authorization": f"Bearer {a_key}"})
            b = seed_team(isolated, store, client, b_id, b_key, headers={"Authorization": f"Bearer {b_key}"})
            yield client, a, b
        finally:
            retire_team(settings, a_id)
            retire_team(settings, b_id)


def test_another_teams_resources_are_404_on_every_route(teams, request):
    client, a, b = teams
    routes = app_routes(client.app)
    with_ids = [r for r in routes if r.params]
    unfillable = [f"{r.method} {r.path}" for r in with_ids if bindings_for(r.params, b) is None]
    assert not unfillable, f"routes take ids the isolation matrix cannot fill (add a resource): {unfillable}"

    checked: list[tuple[Route, Binding]] = []
    problems: list[str] = []
    # Reads first, then the calls that would change a resource (team A's must change nothing).
    for route in sorted(with_ids, key=lambda r: (r.changes_state, r.path, r.method)):
        for binding in bindings_for(route.params, b) or []:
            url = route.url(binding.values)
            answer = call(client, route, url, a.key)
            where = f"{route.method} {url} ({binding.label})"
            if answer.status_code != 404:
                problems.append(f"{where}: team A got {answer.status_code}: {answer.text[:300]}")
            if found := leaked(answer.text, b.ids - set(binding.values.values())):
                problems.append(f"{where}: team A's answer names team B's {found}")
            checked.append((route, binding))

    # Team A's calls changed nothing of team B's, and made nothing from it.
    as_b = {"Authorization": f"Bearer {b.key}"}
    assert client.get(f"/v1/jobs/{b.job_id}", headers=as_b).json()["status"] == "validating"
    assert client.get(f"/v1/files/{b.file_id}", headers=as_b).status_code == 200
    assert [w["id"] for w in client.get("/v1/webhooks", headers=as_b).json()["data"]] == [b.webhook_id]
    a_jobs = client.get(
        "/v1/jobs", params={"limit": 100}, headers={"Authorization": f"Bearer {a.key}"}
    ).json()
    assert {j["id"] for j in a_jobs["data"]} == {a.job_id, a.finished_job_id}

    # Controls: the same calls with team B's key reach the resource, so A's 404 is not a wrong URL. The
    # calls that change state come last (deleting the file last of all).
    for route, binding in sorted(checked, key=lambda rb: (rb[0].changes_state, rb[0].name == "delete_file")):
        if route.name in FINISHED_ONLY and binding.values.get("job_id") != b.finished_job_id:
            continue
        url = route.url(binding.values)
        answer = call(client, route, url, b.key)
        # 409 (cancel a finished job, delete a file a job reads) and 422 (export a job that has not
        # finished) also show that the resource was found.
        if answer.status_code >= 500 or answer.status_code in (401, 403, 404, 405):
            problems.append(
                f"control {route.method} {url} ({binding.label}): team B got {answer.status_code}"
            )

    covered = sorted({f"{r.method} {r.path}" for r, _ in checked})
    say(
        request,
        f"\nisolation matrix: {len(covered)} routes with ids x team B's resources = {len(checked)} calls",
    )
    for line in covered:
        say(request, f"  {line}")
    assert not problems, "\n".join(problems)
    assert len(covered) == len(with_ids)
    assert len(covered) >= MATRIX_FLOOR[0] and len(checked) >= MATRIX_FLOOR[1], (len(covered), len(checked))


# What each team's own lists must show of its own resources (the control of the leak check).
OWN_IN_LISTS: dict[str, Callable[[TeamResources], set[str]]] = {
    "/v1/files": lambda t: {t.file_id},
    "/v1/jobs": lambda t: {t.job_id, t.finished_job_id},
    "/v1/fine_tuning/jobs": lambda t: {t.job_id, t.finished_job_id},
    "/v1/webhooks": lambda t: {t.webhook_id},
}


def test_lists_never_show_another_teams_ids(teams, request):
    client, a, b = teams
    lists = [r for r in app_routes(client.app) if r.method == "GET" and not r.params]
    assert set(OWN_IN_LISTS) <= {r.path for r in lists}
    for route in lists:
        for team, other in ((a, b), (b, a)):
            answer = client.get(
                route.path, params={"limit": 100}, headers={"Authorization": f"Bearer {team.key}"}
            )
            assert answer.status_code < 500, (route.path, answer.text)
            assert not leaked(answer.text, other.ids), f"GET {route.path} shows another team's ids"
            if route.path in OWN_IN_LISTS:
                assert answer.status_code == 200, (route.path, answer.text)
                assert OWN_IN_LISTS[route.path](team) <= set(leaked(answer.text, team.ids)), route.path
    say(request, f"\nlists checked both ways ({len(lists)}): {', '.join(sorted(r.path for r in lists))}")


def test_another_teams_ids_cannot_be_used_in_a_request(teams):
    """Ids of team B in team A's bodies and cursors are refused as unknown (4xx), never used."""
    client, a, b = teams
    as_a = {"Authorization": f"Bearer {a.key}"}
    own = {"base_model": TINY_MODEL, "dataset": a.file_id, "hyperparameters": {"max_steps": 1}}
    requests: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]] = [
        ("POST", "/v1/jobs", own | {"dataset": b.file_id}, None),
        ("POST", "/v1/jobs", own | {"validation_dataset": b.file_id}, None),
        (
            "POST",
            "/v1/jobs",
            {"method": "merge", "merge": {"sources": [{"job_id": b.finished_job_id}] * 2}},
            None,
        ),
        ("POST", "/v1/jobs", {"method": "export", "export": {"source": {"job_id": b.finished_job_id}}}, None),
        (
            "POST",
            "/v1/jobs",
            own
            | {
                "method": "fusion",
                "fusion": {"sources": [{"job_id": a.finished_job_id}, {"job_id": b.finished_job_id}]},
                "hyperparameters": None,
            },
            None,
        ),
        ("POST", "/v1/plans", own | {"dataset": b.file_id}, None),
        ("POST", "/v1/fine_tuning/jobs", {"model": TINY_MODEL, "training_file": b.file_id}, None),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"model": TINY_MODEL, "training_file": a.file_id, "validation_file": b.file_id},
            None,
        ),
        ("GET", "/v1/files", None, {"after": b.file_id}),
        ("GET", "/v1/fine_tuning/jobs", None, {"after": b.job_id}),
    ]
    for method, path, body, params in requests:
        answer = client.request(method, path, json=body, params=params, headers=as_a)
        assert 400 <= answer.status_code < 500 and answer.status_code != 403, (
            method,
            path,
            body,
            answer.text,
        )
        sent = json.dumps([body, params])
        assert not leaked(answer.text, {i for i in b.ids if i not in sent}), (path, answer.text)


def test_another_teams_objects_cannot_be_named_by_storage_key(teams, settings):
    client, a, b = teams
    as_a = {"Authorization": f"Bearer {a.key}"}
    with session_scope(settings.database_url) as session:
        upload_key = session.scalar(select(UploadedFile.storage_key).where(UploadedFile.id == b.file_id))
    bucket = settings.storage_bucket
    adapter = f"s3://{bucket}/artifacts/{b.team_id}/{b.finished_job_id}/attempt-1/adapter"
    answers = [
        client.post(
            "/v1/jobs",
            json={"base_model": TINY_MODEL, "dataset": f"s3://{bucket}/{upload_key}"},
            headers=as_a,
        ),
        client.post(
            "/v1/jobs", json={"method": "export", "export": {"source": {"uri": adapter}}}, headers=as_a
        ),
    ]
    assert [r.status_code for r in answers] == [422, 422], [r.text for r in answers]
