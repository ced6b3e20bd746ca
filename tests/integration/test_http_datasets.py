"""http(s) datasets: off by default; when on, checked by the outbound URL policy at submission (422 naming the
field) and again by the worker at download, every redirect hop included, with a size and a time limit. The
dataset server runs on 127.0.0.1; the test-only loopback allowance lets the policy reach it, and a resolver
that never leaves the machine replaces DNS."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from shared import urlpolicy
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job, JobEvent
from shared.settings import Settings
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl
from tests.unit.test_urlpolicy import LocalServer
from worker.assets import AssetCache
from worker.validation import validate_job

PUBLIC_NAME = "datasets.example.test"  # a public-looking name, resolved to the local server below
DATA = to_jsonl(color_messages(12))


def offline_resolver(host: str, port: int) -> list[str]:
    if host in (PUBLIC_NAME, "localhost"):
        return ["127.0.0.1"]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


@pytest.fixture(autouse=True)
def _no_dns(monkeypatch):
    monkeypatch.setattr(urlpolicy, "system_resolver", offline_resolver)


@pytest.fixture
def data_server() -> Iterator[LocalServer]:
    server = LocalServer()
    server.routes["/colors.jsonl"] = lambda seen: (200, {"Content-Type": "application/jsonl"}, DATA)
    server.routes["/streamed.jsonl"] = lambda seen: (200, {"X-No-Length": "1"}, DATA)
    server.routes["/moved"] = lambda seen: (302, {"Location": "/colors.jsonl"}, b"")
    server.routes["/to-metadata"] = lambda seen: (
        302,
        {"Location": "http://169.254.169.254/latest/meta-data/iam/"},
        b"",
    )
    server.routes["/to-private"] = lambda seen: (307, {"Location": "http://[::ffff:10.0.0.1]/x.jsonl"}, b"")
    server.routes["/loop"] = lambda seen: (302, {"Location": "/loop"}, b"")
    server.routes["/gone.jsonl"] = lambda seen: (404, {}, b"not here")
    yield server
    server.close()


@pytest.fixture
def enabled(settings: Settings) -> Settings:
    return settings.model_copy(update={"allow_http_datasets": True, "outbound_allow_loopback": True})


@contextmanager
def client(settings: Settings, key: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def submit(c: TestClient, dataset: str, **extra):
    return c.post(
        "/v1/jobs",
        json={"base_model": TINY_MODEL, "dataset": dataset, "hyperparameters": {"max_steps": 5}} | extra,
    )


def download(settings: Settings, url: str, param: str = "dataset"):
    from shared.storage import make_store

    with session_scope(settings.database_url) as session:
        return AssetCache(settings, make_store(settings)).dataset_file(
            url, session=session, team_id="team-default", param=param
        )


def test_refused_by_default(api_client, data_server):
    response = submit(api_client, data_server.url("/colors.jsonl", host=PUBLIC_NAME))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "dataset"
    assert "http(s) datasets are disabled" in error["message"]
    assert "TUNEFORGE_ALLOW_HTTP_DATASETS" in error["message"]
    assert data_server.seen == []


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("http://169.254.169.254/latest/data.jsonl", "169.254.169.254 is a link-local address"),
        ("http://[fd00:ec2::254]/data.jsonl", "fd00:ec2::254 is a private"),
        ("http://2130706433/data.jsonl", "127.0.0.1 is a loopback address"),
        ("http://localhost/data.jsonl", "localhost resolves to 127.0.0.1; 127.0.0.1 is a loopback address"),
        ("http://10.0.0.8/data.jsonl", "10.0.0.8 is a private address"),
        ("https://user:pw@93.184.216.34/data.jsonl", "credentials in the URL"),
    ],
)
def test_enabled_the_policy_applies_at_submission(make_team, settings, dataset, message):
    # Enabled, without the loopback allowance.
    _, key = make_team()
    with client(settings.model_copy(update={"allow_http_datasets": True}), key) as c:
        response = submit(c, dataset)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "dataset"
        assert message in error["message"]
        response = submit(c, f"https://93.184.216.34/x.jsonl?{time.time()}", validation_dataset=dataset)
        assert response.status_code == 422
        assert response.json()["error"]["param"] == "validation_dataset"


def test_enabled_and_passing_the_policy_the_job_validates(make_team, enabled, data_server, tiny_model_dir):
    _, key = make_team()
    url = data_server.url("/colors.jsonl", host=PUBLIC_NAME)
    with client(enabled, key) as c:
        response = submit(c, url)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        assert response.json()["dataset"] == url
        assert data_server.seen == []  # submission checks the URL; it does not download
        try:
            assert validate_job(enabled, job_id) == "queued"
            with session_scope(enabled.database_url) as session:
                events = session.scalars(
                    select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.type == "dataset")
                ).all()
            assert events == ["dataset: 12 valid samples in messages format"]
            [seen] = data_server.seen
            assert seen.headers["Host"] == f"{PUBLIC_NAME}:{data_server.port}"
        finally:
            c.post(f"/v1/jobs/{job_id}/cancel")
    with session_scope(enabled.database_url) as session:
        assert session.get(Job, job_id).status == "cancelled"


def test_download_follows_allowed_redirects(enabled, data_server):
    for path in ("/colors.jsonl", "/moved", "/streamed.jsonl"):
        assert download(enabled, data_server.url(path, host=PUBLIC_NAME)).read_bytes() == DATA


@pytest.mark.parametrize(
    ("path", "code", "message"),
    [
        ("/to-metadata", JobErrorCode.dataset_not_found, "169.254.169.254 is a link-local address"),
        ("/to-private", JobErrorCode.dataset_not_found, "IPv4-mapped address of 10.0.0.1, a private address"),
        ("/loop", JobErrorCode.storage_error, "stopped after 3 redirects"),
        ("/gone.jsonl", JobErrorCode.dataset_not_found, "answered HTTP 404"),
    ],
)
def test_download_refusals(enabled, data_server, path, code, message):
    with pytest.raises(JobFailure) as info:
        download(enabled, data_server.url(path, host=PUBLIC_NAME))
    assert info.value.code == code
    assert info.value.message.startswith("dataset: ")
    assert message in info.value.message


def test_the_worker_checks_the_url_again(enabled, data_server):
    url = data_server.url("/colors.jsonl")
    with pytest.raises(JobFailure, match=r"127\.0\.0\.1 is a loopback address"):
        download(enabled.model_copy(update={"outbound_allow_loopback": False}), url)
    with pytest.raises(JobFailure, match="http\\(s\\) datasets are disabled"):
        download(enabled.model_copy(update={"allow_http_datasets": False}), url)
    assert data_server.seen == []


def test_size_and_time_limits(enabled, data_server, tmp_path):
    small = enabled.model_copy(update={"max_upload_bytes": 100})
    for path in ("/colors.jsonl", "/streamed.jsonl"):  # declared length, then counted while streaming
        with pytest.raises(JobFailure) as info:
            download(small, data_server.url(path))
        assert info.value.code == JobErrorCode.invalid_dataset
        assert "the 100 bytes allowed" in info.value.message

    def slow(seen):
        time.sleep(1.5)
        return 200, {}, DATA

    data_server.routes["/slow.jsonl"] = slow
    impatient = enabled.model_copy(update={"outbound_timeout_seconds": 0.3})
    with pytest.raises(JobFailure) as info:
        download(impatient, data_server.url("/slow.jsonl"))
    assert info.value.code == JobErrorCode.storage_error
    assert "did not answer in time" in info.value.message
    hurried = enabled.model_copy(update={"http_dataset_timeout_seconds": 1e-6})
    with pytest.raises(JobFailure, match="took more than") as info:
        download(hurried, data_server.url("/streamed.jsonl"))
    assert info.value.code == JobErrorCode.storage_error
    leftovers = list((enabled.cache_dir / "datasets").glob(".download-*"))
    assert leftovers == []
