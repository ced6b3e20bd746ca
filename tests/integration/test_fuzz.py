"""Property-based fuzzing of every operation in the app's OpenAPI schema (schemathesis), in process over ASGI,
with a real team key, against the real PostgreSQL, Redis and S3 of the test run.

Bad input must be answered with a 4xx naming the problem, never with a 500. Each operation gets schemathesis'
deterministic coverage cases (boundaries, missing and mistyped fields, unexpected methods), the schema's
examples, and a fixed number of Hypothesis examples, positive and negative, derandomized with a fixed seed
so that every run sends the same requests. Path ids are sometimes swapped for ids of real resources of the
fuzzing team (a finished job with artifacts and a checkpoint, a job that has not started, an upload, its
results file, a plan, a webhook), and bodies for a real base model, uploaded file and webhook URL, so the
fuzzer gets past "not found". Every answer is checked: no 5xx, the documented schema, the app's error
envelope, and 405 with an `Allow` header for methods a path does not have.

Nothing is left out. The event stream (which ends only when its job does) gets real ids of the finished job
only, and every call is bounded anyway (5 events or 10 s, then the client cuts it).

Nothing the fuzzer creates reaches a worker: the app sends to queues of its own that no worker reads, and
at the end every job of the fuzzing team that has not finished is cancelled and its webhooks deleted; the
fixture checks that none of its jobs is in the workers' queues.

Two hand-written groups follow the fuzzer, for what it does not generate: a quiet event stream whose client
gives up, and text PostgreSQL cannot store (NUL, unpaired surrogates) or forged cursors.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance, unsupported_method
from sqlalchemy import select

from api.main import create_app
from shared import urlpolicy
from shared.db import session_scope
from shared.models import Job, UploadedFile
from shared.queue import queued_messages
from shared.schemas import JobSpec
from shared.services import jobs as job_service
from shared.states import TERMINAL
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl
from tests.integration.test_isolation import WEBHOOK_URL, TeamResources, retire_team, say, seed_team

SEED = 20_251_129
MAX_EXAMPLES = 25  # Hypothesis examples per operation in the fuzzing phase (coverage cases come on top)
CREATE_MAX_EXAMPLES = 100
# Every operation must have been called at least this often; the whole run, at least CASES_FLOOR times.
PER_OPERATION_FLOOR = 5  # an operation with no input gets few (the coverage phase's unexpected methods)
CASES_FLOOR = 1500
# The fuzz test; when it was selected, the fixture's final checks run even if it generated nothing.
FUZZ_TEST = "test_no_operation_answers_a_server_error"

CONFIG = {
    "seed": SEED,
    # Generation time depends on the machine's load; it must not fail a run.
    "suppress-health-check": ["too_slow"],
    "generation": {
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
    },
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    # The operations that create jobs take large bodies with cross-field rules: more examples there.
    "operations": [
        {
            "include-name": [f"POST {path}" for path in ("/v1/jobs", "/v1/plans", "/v1/fine_tuning/jobs")],
            "generation": {"max-examples": CREATE_MAX_EXAMPLES},
        }
    ],
    # The event stream of a job that has not finished does not end: the ASGI client keeps what came before
    # the limit or the timeout and cuts it there.
    "max-stream-events": 5,
    "request-timeout": 10,
}


def offline_resolver(host: str, port: int) -> list[str]:
    """Numeric hosts only: no DNS query leaves the machine for the webhook URLs the fuzzer makes up."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


@dataclass
class Fuzzing:
    app: FastAPI
    resources: TeamResources
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    phases: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.resources.key}"}


@pytest.fixture(scope="module")
def fuzzing(request, settings, store, tiny_model_dir, make_team) -> Iterator[Fuzzing]:
    """The app under test (with queues of its own and no wait for plans), a team with one of each
    resource, and the tally of what was sent; at the end, checks that the run was complete and that
    nothing it made can reach a worker."""
    isolated = settings.model_copy(
        update={"queue_prefix": f"{settings.queue_prefix}-fuzz", "plan_wait_seconds": 0.0}
    )
    team_id, key = make_team(f"fuzz-{secrets.token_hex(3)}", max_queued_jobs=100_000)
    app = create_app(isolated)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urlpolicy, "system_resolver", offline_resolver)
        try:
            with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
                resources = seed_team(isolated, store, client, team_id, key)
            state = Fuzzing(app=app, resources=resources)
            yield state
        finally:
            retire_team(settings, team_id)

    total = sum(state.calls.values())
    say(
        request,
        f"\nschemathesis {schemathesis.__version__}: {total} cases over {len(state.calls)} operations",
    )
    say(request, f"  statuses: {dict(sorted(state.statuses.items()))}; phases: {dict(state.phases)}")
    for label, count in sorted(state.calls.items()):
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(state.by_operation[label].items()))
        say(request, f"  {count:5d}  {label}  ({statuses})")
    assert callable(globals().get(FUZZ_TEST)), f"no test named {FUZZ_TEST} in this module"
    selected = any(
        item.path == request.path and getattr(item, "originalname", item.name) == FUZZ_TEST
        for item in request.session.items
    )
    if not selected:
        return  # the fuzz test was deselected: this module's other tests ran without it

    with session_scope(settings.database_url) as session:
        made = session.execute(select(Job.id, Job.status).where(Job.team_id == team_id)).all()
    waiting = queued_messages(settings)
    assert waiting is not None, "the workers' queues could not be read"
    reached = [job_id for job_id, _ in made if job_id in waiting]
    assert not reached, f"jobs of the fuzzer are in the workers' queues: {reached}"
    assert all(status in TERMINAL for _, status in made), made
    say(request, f"  {len(made)} jobs of the fuzzing team, none in the workers' queues, all ended")

    documented = {f"{m.upper()} {p}" for p, ops in app.openapi()["paths"].items() for m in ops}
    assert set(state.calls) == documented, documented ^ set(state.calls)
    thin = {label: n for label, n in state.calls.items() if n < PER_OPERATION_FLOOR}
    assert not thin, f"operations fuzzed fewer than {PER_OPERATION_FLOOR} times: {thin}"
    assert total >= CASES_FLOOR, f"{total} cases, expected at least {CASES_FLOOR}"
    assert not state.server_errors, state.server_errors


VALID_DATASET = to_jsonl(color_messages(6))
# The fields a minimal valid request of each creating operation needs.
BASES = {
    "/v1/jobs": ("base_model", "dataset"),
    "/v1/plans": ("base_model", "dataset"),
    "/v1/fine_tuning/jobs": ("model", "training_file"),
    "/v1/webhooks": ("url",),
}


def _with_real_ids(value: Any, ids: dict[str, str]) -> Any:
    """`value` with every field named like an id (at any depth) set to a real one of the fuzzing team."""
    if isinstance(value, dict):
        return {
            k: ids[k] if k in ids and isinstance(v, str) else _with_real_ids(v, ids) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_with_real_ids(v, ids) for v in value]
    return value


def _path_ids(resources: TeamResources) -> dict[str, list[Any]]:
    r = resources
    jobs = [r.job_id, r.finished_job_id]
    return {
        "job_id": jobs,
        "fine_tuning_job_id": jobs,
        "file_id": [r.file_id, r.results_file_id],
        "plan_id": [r.plan_id],
        "webhook_id": [r.webhook_id],
        "kind": list(r.artifacts),
        "name": [name for names in r.artifacts.values() for name in names],
        "step": [2],
    }


@pytest.fixture(scope="module")
def fuzz_schema(fuzzing: Fuzzing):
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzing.app, config=config)
    real = _path_ids(fuzzing.resources)
    ids = {
        "base_model": TINY_MODEL,
        "model": TINY_MODEL,
        "dataset": fuzzing.resources.file_id,
        "training_file": fuzzing.resources.file_id,
        "validation_dataset": fuzzing.resources.file_id,
        "validation_file": fuzzing.resources.file_id,
        "job_id": fuzzing.resources.finished_job_id,
        "url": WEBHOOK_URL,
    }
    finished_only = {"job_id": [fuzzing.resources.finished_job_id]}

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        if not isinstance(path_parameters, dict):
            return st.just(path_parameters)
        endless = context.operation is not None and context.operation.path.endswith("/events/stream")
        choices = finished_only if endless else real
        swapped = {
            name: st.sampled_from([value, *choices[name]]) if name in choices else st.just(value)
            for name, value in path_parameters.items()
        }
        return st.fixed_dictionaries(swapped)

    @schema.hook
    def flatmap_body(context, body):
        if not isinstance(body, dict):
            return st.just(body)
        if "file" in body:  # an upload: sometimes a valid dataset, so that the upload path runs to its end
            valid = {**body, "file": VALID_DATASET}
            return st.sampled_from([body, valid, {**valid, "purpose": "fine-tune"}])
        swapped = _with_real_ids(body, ids)
        base = {k: v for k, v in ids.items() if k in BASES.get(context.operation.path, ())}
        options = [st.just(body), st.just(swapped)]
        if base and swapped:  # a minimal valid request plus one generated field: that field's checks run
            options.append(st.sampled_from(sorted(swapped)).map(lambda key: {**base, key: swapped[key]}))
        return st.one_of(options)

    return schema


api = schemathesis.pytest.from_fixture("fuzz_schema")

# What the schema says of error answers is thin: 404, 409 and the OpenAI surface's 400 are not documented,
# and the documented 422 body (FastAPI's HTTPValidationError, no required field) is not the app's envelope,
# though it accepts it. Error answers are therefore also checked against the envelope the app promises.
NATIVE_ERROR_KEYS = {"code", "message", "param"}
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def errors_have_the_envelope(ctx, response, case) -> bool | None:
    if response.status_code < 400 or response.request.method == "HEAD":
        return True
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = json.loads(response.content)
    error = body.get("error")
    assert isinstance(error, dict), f"no error object: {body}"
    # The router answers a method no route has (405) before any OpenAI route runs: the native shape.
    openai = case.operation.path.startswith("/v1/fine_tuning") and response.status_code != 405
    expected = OPENAI_ERROR_KEYS if openai else NATIVE_ERROR_KEYS
    assert expected <= set(error), f"error keys {sorted(error)}, expected {sorted(expected)}"
    assert isinstance(error["message"], str) and error["message"], body
    return None


@pytest.fixture
def pytest9_nodeid(request):
    """schemathesis 4.32.5 runs a lazily loaded schema by reading and writing `node._nodeid`, which pytest 9
    no longer has (`nodeid` is a property over `_id`): give the node the attribute it expects."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@api.parametrize()
def test_no_operation_answers_a_server_error(case, fuzzing: Fuzzing, pytest9_nodeid):
    response = case.call(headers=fuzzing.headers)
    fuzzing.calls[case.operation.label] += 1
    fuzzing.statuses[response.status_code] += 1
    fuzzing.by_operation.setdefault(case.operation.label, Counter())[response.status_code] += 1
    fuzzing.phases[case.meta.phase.name.value if case.meta else "explicit"] += 1
    if response.status_code >= 500:
        fuzzing.server_errors.append(f"{case.operation.label} -> {response.status_code}")
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            response_schema_conformance,
            errors_have_the_envelope,
            unsupported_method,
        ],
        headers=fuzzing.headers,
    )


# What the fuzzer found, pinned: a change of the generator (or of the schema) must not lose these cases.
# JOB stands for the fuzzing team's finished job.
FOUND = [
    # An export's metadata key was checked only when the job spec was built in the handler: a 500.
    ("POST", "/v1/jobs/JOB/export", None, {"metadata": {"": "v"}}, 422),
    ("POST", "/v1/jobs/JOB/export", None, {"metadata": {f"k{i}": "v" for i in range(17)}}, 422),
    # An event id past the database's bigint: a 500.
    ("GET", "/v1/jobs/JOB/events", {"after": str(2**63)}, None, 422),
    # A method a path does not have: 405 without the `Allow` header RFC 9110 requires.
    ("TRACE", "/healthz", None, None, 405),
    ("PUT", "/v1/jobs/JOB", None, None, 405),
]


@pytest.mark.parametrize(("method", "path", "params", "body", "status"), FOUND)
def test_what_the_fuzzer_found_stays_fixed(fuzzing: Fuzzing, method, path, params, body, status):
    path = path.replace("JOB", fuzzing.resources.finished_job_id)
    with TestClient(fuzzing.app) as client:
        response = client.request(method, path, params=params, json=body, headers=fuzzing.headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    if status == 405:
        assert response.headers["allow"], response.headers


@pytest.mark.parametrize(
    "config", [{"r": "abc"}, {"r": 1e400}, {"target_modules": 5}, {"peft_type": "LORA", "r": [4]}]
)
def test_a_malformed_adapter_config_is_the_callers_error(fuzzing: Fuzzing, settings, config):
    """Found reading the code the fuzzer reached: an s3:// adapter source is any object in an allowed bucket,
    the caller's own upload included, and a malformed adapter_config.json there was a 500."""
    line = json.dumps({"text": "x", **config}).replace("Infinity", "1e400").encode() + b"\n"
    with TestClient(fuzzing.app, headers=fuzzing.headers) as client:
        upload = client.post("/v1/files", files={"file": ("adapter_config.json", line)})
        assert upload.status_code == 201, upload.text
        with session_scope(settings.database_url) as session:
            key = session.scalar(
                select(UploadedFile.storage_key).where(UploadedFile.id == upload.json()["id"])
            )
        source = f"s3://{settings.storage_bucket}/{key.rsplit('/', 1)[0]}"
        response = client.post("/v1/jobs", json={"method": "export", "export": {"source": {"uri": source}}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "export.source"


def test_a_quiet_event_stream_lets_its_client_go(fuzzing: Fuzzing, settings, store):
    """Found while bounding the fuzzer's calls to the event stream: for a job with no new events, the stream
    never handed control back to the server, so a client that gave up (here: a 2 s read timeout) was never
    let go, and its thread polled until the job ended."""
    spec = JobSpec.model_validate({"base_model": TINY_MODEL, "dataset": fuzzing.resources.file_id})
    with session_scope(settings.database_url) as session:
        job_id = job_service.create_job(
            session=session, settings=settings, store=store, team_id=fuzzing.resources.team_id, spec=spec
        ).id  # validating, never queued: it stays quiet (the fixture cancels it at the end)
    answer: dict[str, Any] = {}

    def listen() -> None:
        with asgi.get_client(fuzzing.app, max_stream_events=100) as client:
            response = client.get(f"/v1/jobs/{job_id}/events/stream", headers=fuzzing.headers, timeout=2)
            answer.update(status=response.status_code, body=response.content)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    listener.join(timeout=30)
    assert not listener.is_alive(), "the event stream of a quiet job held its client past the read timeout"
    assert answer["status"] == 200
    assert b"event: created" in answer["body"]


def _cursor(created: str, job_id: object) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, job_id]).encode()).decode().rstrip("=")


# Text the generator does not make (its strings have no NUL and encode as UTF-8) but any client can send:
# NUL characters and unpaired surrogates, which PostgreSQL can neither store nor compare, in the path, the
# query and the body; and forged cursors. FILE stands for the fuzzing team's uploaded file.
HOSTILE = [
    ("GET", "/v1/jobs/ftjob-%00", None, None),
    ("GET", "/v1/files/file-%00/content", None, None),
    ("DELETE", "/v1/webhooks/wh-%00", None, None),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00/events", None, None),
    ("GET", "/v1/files", {"purpose": "\x00"}, None),
    ("GET", "/v1/files", {"after": "file-\x00"}, None),
    ("GET", "/v1/jobs", {"cursor": _cursor("2026-01-01T00:00:00", "ftjob-x")}, None),
    ("GET", "/v1/jobs", {"cursor": _cursor("2026-01-01T00:00:00+00:00", 7)}, None),
    ("GET", "/v1/jobs", {"cursor": _cursor("2026-01-01T00:00:00+00:00", "ftjob-\x00")}, None),
    ("GET", "/v1/fine_tuning/jobs", {"metadata[k]": "\x00"}, None),
    ("GET", "/v1/fine_tuning/jobs", {"after": "ftjob-\x00"}, None),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "FILE", "metadata": {"k": "\x00"}}),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "FILE", "metadata": {"k": "\ud800"}}),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "FILE", "metadata": {"\x00": "v"}}),
    ("POST", "/v1/jobs", None, {"base_model": "\x00", "dataset": "FILE"}),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "file-\x00"}),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "s3://tuneforge-test/\x00"}),
    ("POST", "/v1/jobs", None, {"base_model": TINY_MODEL, "dataset": "file:///\x00"}),
    ("POST", "/v1/jobs", None, {"method": "merge", "merge": {"sources": [{"job_id": "\ud800"}] * 2}}),
    ("POST", "/v1/plans", None, {"base_model": TINY_MODEL, "dataset": "FILE", "metadata": {"k": "\x00"}}),
    ("POST", "/v1/fine_tuning/jobs", None, {"model": TINY_MODEL, "training_file": "FILE", "suffix": "a\x00"}),
    (
        "POST",
        "/v1/fine_tuning/jobs",
        None,
        {"model": TINY_MODEL, "training_file": "FILE", "metadata": {"k": "\ud800"}},
    ),
    ("POST", "/v1/webhooks", None, {"url": "https://93.184.216.34/\ud800"}),
    ("POST", "/v1/webhooks", None, {"url": "https://93.184.216.34/", "events": ["job.failed\x00"]}),
]


@pytest.mark.parametrize(("method", "path", "params", "body"), HOSTILE)
def test_text_the_database_cannot_store_is_refused(fuzzing: Fuzzing, method, path, params, body):
    # json.dumps escapes NUL and surrogates (\u0000, \ud800), as a client's JSON encoder would.
    content = (
        None if body is None else json.dumps(body).replace('"FILE"', json.dumps(fuzzing.resources.file_id))
    )
    headers = fuzzing.headers | {"Content-Type": "application/json"}
    with TestClient(fuzzing.app) as client:  # a server error raises here, with its traceback
        response = client.request(method, path, params=params, content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]
