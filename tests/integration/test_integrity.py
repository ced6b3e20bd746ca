"""What a fault test found, each case as it failed then: damaged stored bytes served with 200, datasets that
broke validation, stale checkpoint uploads, silent storage stalls, a lock held through validation, error
shapes. Real PostgreSQL, Redis, S3 (SeaweedFS) and a real API server where HTTP framing matters."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import httpx
import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Artifact, Job, utcnow
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL, ServiceProcesses
from tests.helpers import color_messages, succeeded_job, to_jsonl, upload_dataset

SMALL = b"small adapter bytes " * 500
# Past the size the API checks whole before answering: this one is checked as it streams.
LARGE = os.urandom(17 * 2**20 + 12345)


def finished_job(settings, store, team_id: str, files: dict[str, bytes]) -> str:
    """A succeeded job of `team_id` whose adapter holds `files`, stored and recorded."""
    with session_scope(settings.database_url) as session:
        job = succeeded_job(session, settings, store, team_id)
        stored = [
            (name, store.put_bytes(f"artifacts/{team_id}/{job.id}/attempt-1/adapter/{name}", data))
            for name, data in files.items()
        ]
        artifact_service.record_artifacts(session=session, job=job, kind="adapter", stored=stored)
        return job.id


def flip_a_byte(store, key: str, at: int) -> None:
    """Rewrites the stored object with one byte changed (its record keeps the old sha256)."""
    data = bytearray(b"".join(store.iter_chunks(key)))
    data[at] ^= 0xFF
    store.put_bytes(key, bytes(data))


def storage_key(settings, job_id: str, name: str) -> str:
    with session_scope(settings.database_url) as session:
        return session.query(Artifact).filter_by(job_id=job_id, name=name).one().storage_key


def damaged_at(settings, job_id: str, name: str):
    with session_scope(settings.database_url) as session:
        return session.query(Artifact).filter_by(job_id=job_id, name=name).one().damaged_at


@pytest.fixture(scope="module")
def api_only(settings, tiny_model_dir, tmp_path_factory):
    """A real API server (uvicorn), for what HTTP framing decides: a body cut short of its Content-Length."""
    procs = ServiceProcesses(settings, tmp_path_factory.mktemp("integrity-api"))
    procs.start_api()
    try:
        yield procs
    finally:
        procs.stop()


def test_a_damaged_small_artifact_is_refused_before_any_byte(settings, store, make_team, api_only):
    team_id, key = make_team()
    job_id = finished_job(
        settings, store, team_id, {"adapter_model.safetensors": SMALL, "adapter_config.json": b"{}"}
    )
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors"
    streamed = {"redirect": "false"}  # through the API (the default on S3 is a redirect to storage)
    intact = httpx.get(url, headers=headers, params=streamed)
    assert intact.status_code == 200 and intact.content == SMALL

    flip_a_byte(store, storage_key(settings, job_id, "adapter_model.safetensors"), at=1000)
    answer = httpx.get(url, headers=headers, params=streamed)
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["code"] == "artifact_corrupted" and "damaged" in error["message"]
    assert answer.headers["x-should-retry"] == "false"
    assert damaged_at(settings, job_id, "adapter_model.safetensors") is not None
    # Marked: not served again in any form, a presigned redirect (asked for, or the default) included.
    assert httpx.get(url, headers=headers, params=streamed).status_code == 500
    for redirect in (
        httpx.get(url, headers=headers, params={"redirect": "true"}),
        httpx.get(url, headers=headers),
    ):
        assert redirect.status_code == 500 and redirect.json()["error"]["code"] == "artifact_corrupted"
    archive = httpx.get(f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter.tar", headers=headers)
    assert archive.status_code == 500 and archive.json()["error"]["code"] == "artifact_corrupted"
    # The intact file of the same job is still served.
    config = httpx.get(
        f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter/adapter_config.json",
        headers=headers,
        params=streamed,
    )
    assert config.status_code == 200 and config.content == b"{}"


def test_a_damaged_large_artifact_ends_short_so_every_client_sees_an_error(
    settings, store, make_team, api_only, tmp_path
):
    team_id, key = make_team()
    job_id = finished_job(settings, store, team_id, {"adapter_model.safetensors": LARGE})
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors?redirect=false"
    flip_a_byte(store, storage_key(settings, job_id, "adapter_model.safetensors"), at=len(LARGE) // 2)

    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", url, headers=headers, timeout=60) as response,
    ):
        assert response.status_code == 200  # the damage is found only once the bytes have passed
        assert int(response.headers["content-length"]) == len(LARGE)
        for chunk in response.iter_bytes():
            received += chunk
    assert len(received) < len(LARGE)  # the last chunk, checked after the digest, never left
    assert damaged_at(settings, job_id, "adapter_model.safetensors") is not None
    # The next request (a client's retry) gets the plain answer.
    again = httpx.get(url, headers=headers)
    assert again.status_code == 500 and again.json()["error"]["code"] == "artifact_corrupted"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_fails_on_a_damaged_large_artifact(settings, store, make_team, api_only, tmp_path):
    team_id, key = make_team()
    job_id = finished_job(settings, store, team_id, {"adapter_model.safetensors": LARGE})
    flip_a_byte(store, storage_key(settings, job_id, "adapter_model.safetensors"), at=100)
    out = tmp_path / "adapter_model.safetensors"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            str(out),
            "-H",
            f"Authorization: Bearer {key}",
            f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors?redirect=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 18, done.stderr  # CURLE_PARTIAL_FILE: fewer bytes than Content-Length
    assert hashlib.sha256(out.read_bytes()).hexdigest() != hashlib.sha256(LARGE).hexdigest()


def test_the_sdk_names_a_damaged_artifact(settings, store, make_team, api_only, tmp_path):
    from tuneforge_sdk import Tuneforge, TuneforgeError

    team_id, key = make_team()
    job_id = finished_job(
        settings, store, team_id, {"adapter_model.safetensors": LARGE, "adapter_config.json": b"{}"}
    )
    flip_a_byte(store, storage_key(settings, job_id, "adapter_model.safetensors"), at=7)
    with (
        Tuneforge(api_only.base_url, key, retries=2, backoff=0.05) as client,
        pytest.raises(TuneforgeError) as caught,
    ):
        client.download_adapter(job_id, tmp_path)
    assert caught.value.code == "artifact_corrupted", caught.value
    assert not (tmp_path / f"{job_id}-adapter").exists()
    assert damaged_at(settings, job_id, "adapter_model.safetensors") is not None


# ------------------------------------------------------------------------------- datasets that broke validation


MESSAGES_OK = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'


@pytest.mark.parametrize(
    ("good", "bad", "where", "problem"),
    [
        (b'{"text": "fine"}', b'{"text": "a\\u0000b"}', "'text'", "NUL"),
        (
            b'{"prompt": "q", "completion": "a"}',
            b'{"prompt": "q", "completion": "\\ud800"}',
            "'completion'",
            "unpaired",
        ),
        (
            MESSAGES_OK,
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\\udfff"}]}',
            "'messages.1.content'",
            "unpaired",
        ),
    ],
)
def test_uploads_refuse_text_the_model_or_database_cannot_take(api_client, good, bad, where, problem):
    response = api_client.post("/v1/files", files={"file": ("d.jsonl", good + b"\n" + bad + b"\n")})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_dataset"
    assert f"line 2: {where}" in error["message"] and problem in error["message"]


def test_a_stored_dataset_with_such_text_fails_validation_with_its_line(settings, store, tiny_model_dir):
    from worker.validation import validate_job

    store.put_bytes(
        "datasets/nul.jsonl",
        to_jsonl(color_messages(3))
        + b'{"messages": [{"role": "user", "content": "a\\u0000"}, {"role": "assistant", "content": "b"}]}\n',
    )
    with session_scope(settings.database_url) as session:
        job_id = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=TeamID("team-default"),
            spec=JobSpec(base_model=TINY_MODEL, dataset=f"s3://{settings.storage_bucket}/datasets/nul.jsonl"),
        ).id
    assert validate_job(settings, job_id) is JobStatus.failed
    with session_scope(settings.database_url) as session:
        failed = session.get(Job, job_id)
        assert failed.error_code == "invalid_dataset"
        assert "line 4: 'messages.0.content' contains a NUL character" in failed.error_message


def submitted_job(settings, store, **spec) -> str:
    with session_scope(settings.database_url) as session:
        dataset = (
            spec.pop("dataset", None)
            or upload_dataset(session, settings, store, to_jsonl(color_messages(16))).id
        )
        return job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=TeamID("team-default"),
            spec=JobSpec(base_model=TINY_MODEL, dataset=dataset, **spec),
        ).id


def job_row(settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def events_of(settings, job_id: str, type: str) -> list:
    with session_scope(settings.database_url) as session:
        events, _ = job_service.list_events(
            session=session, team_id=TeamID(job_row(settings, job_id).team_id), job_id=job_id, limit=500
        )
        return [e for e in events if e.type == type]


def test_validation_that_keeps_breaking_fails_after_its_tries_not_forever(
    settings, store, tiny_model_dir, tmp_path
):
    from worker import maintenance
    from worker.validation import validate_job

    job_id = submitted_job(settings, store, hyperparameters={"max_steps": 2})
    # A worker whose cache folder is a file: every check breaks with an error nobody planned for.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    broken = settings.model_copy(
        update={"cache_dir": blocked, "retry_backoff_seconds": 30.0, "max_validation_tries": 3}
    )

    assert validate_job(broken, job_id) is JobStatus.validating
    waiting = job_row(settings, job_id)
    assert waiting.validation_tries == 1 and waiting.not_before > utcnow()
    # During its back-off nothing runs it again: neither a second delivery nor the sweeper.
    assert validate_job(broken, job_id) is None
    assert job_id not in maintenance.resend_lost_jobs(settings)
    [warning] = events_of(settings, job_id, "validation")
    assert "validation try 1 of 3 broke (NotADirectoryError" in warning.message

    impatient = broken.model_copy(update={"retry_backoff_seconds": 0.0})
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    assert validate_job(impatient, job_id) is JobStatus.validating
    assert validate_job(impatient, job_id) is JobStatus.failed
    failed = job_row(settings, job_id)
    assert failed.error_code == "internal_error" and failed.validation_tries == 3
    assert "validation broke 3 times; the last error: NotADirectoryError" in failed.error_message


def test_a_validation_whose_worker_died_counts_as_a_try(settings, store, tiny_model_dir):
    from shared.services import validation as validation_service
    from worker.validation import validate_job

    job_id = submitted_job(settings, store)
    limited = settings.model_copy(update={"max_validation_tries": 2})
    for _ in range(2):  # two runs that took the lease and never finished (their worker was killed)
        with session_scope(settings.database_url) as session:
            assert validation_service.begin_validation(session=session, settings=limited, job_id=job_id)
            session.execute(update(Job).where(Job.id == job_id).values(not_before=None))  # the lease ran out
    assert validate_job(limited, job_id) is None
    failed = job_row(settings, job_id)
    assert failed.status == "failed" and failed.error_code == "internal_error"
    assert "validation did not finish after 2 tries" in failed.error_message


def test_validation_holds_no_row_lock_while_it_reads(settings, store, tiny_model_dir):
    import threading

    import psycopg

    from tests.unit.test_urlpolicy import LocalServer
    from worker.validation import validate_job

    release = threading.Event()
    server = LocalServer()

    def slow(seen):
        release.wait(30)
        return 200, {"Content-Type": "application/jsonl"}, to_jsonl(color_messages(8))

    server.routes["/slow.jsonl"] = slow
    enabled = settings.model_copy(update={"allow_http_datasets": True, "outbound_allow_loopback": True})
    try:
        job_id = submitted_job(
            enabled, store, dataset=server.url("/slow.jsonl"), hyperparameters={"max_steps": 2}
        )
        result: list = []
        runner = threading.Thread(target=lambda: result.append(validate_job(enabled, job_id)))
        runner.start()
        deadline = time.monotonic() + 30
        while not server.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.seen, "validation never asked for the dataset"
        # Mid-validation, the reaper, the sweeper or a cancel can take the row at once.
        with psycopg.connect(settings.database_url.replace("postgresql+psycopg", "postgresql")) as conn:
            conn.execute("SET lock_timeout = '1s'")
            conn.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE NOWAIT", (job_id,)).fetchone()
            conn.rollback()
        assert validate_job(enabled, job_id) is None  # a second delivery leaves it to the run under way
        release.set()
        runner.join(60)
        assert result == [JobStatus.queued]
    finally:
        release.set()
        server.close()


# ------------------------------------------------------------------------------ stale checkpoint uploads


def test_a_stale_attempts_checkpoint_upload_never_lands_on_a_recorded_one(settings, store, tmp_path):
    from shared.services import claims
    from worker.checkpoints import CheckpointUploader
    from worker.reporting import AttemptWriter

    job_id = submitted_job(settings, store)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued.value))
        assert claims.claim_job(session=session, job_id=job_id, worker_id="old", lease_timeout=30) == 1
    stale = AttemptWriter(settings, job_id, 1)
    with session_scope(settings.database_url) as session:  # the old worker vanished; another took over
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow().replace(year=2000)))
        assert claims.claim_job(session=session, job_id=job_id, worker_id="new", lease_timeout=30) == 2
    fresh = AttemptWriter(settings, job_id, 2)

    def folder(name: str, content: bytes):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(content)
        (path / "trainer_state.json").write_text('{"global_step": 10}')
        return path

    uploader = CheckpointUploader(store, fresh, "team-default")
    uploader.save(10, folder("new", b"new attempt's weights"), {})
    uploader.wait()
    # The old attempt's upload of the same step arrives after (it was mid-upload when its worker died).
    uploader = CheckpointUploader(store, stale, "team-default")
    uploader.save(10, folder("old", b"stale weights"), {})
    uploader.wait()
    assert stale.lost.is_set()

    with session_scope(settings.database_url) as session:
        checkpoint, files = artifact_service.latest_checkpoint(session=session, job_id=job_id)
    assert checkpoint.attempt == 2 and checkpoint.step == 10
    weights = next(f for f in files if f.name.endswith("adapter_model.safetensors"))
    assert b"".join(store.iter_chunks(weights.storage_key)) == b"new attempt's weights"
    assert hashlib.sha256(b"new attempt's weights").hexdigest() == weights.sha256
    assert "/attempt-2-" in weights.storage_key


# ------------------------------------------------------------------------ storage that never comes back


def test_storage_that_never_comes_back_fails_the_job_with_events_not_a_silent_stall(
    settings, store, tiny_model_dir
):
    from tests.conftest import free_port
    from worker import runner
    from worker.validation import validate_job

    job_id = submitted_job(settings, store, hyperparameters={"max_steps": 4, "checkpoint_steps": 2})
    assert validate_job(settings, job_id) is JobStatus.queued  # the dataset and model are now in the cache
    # Storage goes away for good: nothing listens where it was.
    gone = settings.model_copy(
        update={
            "s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
            "storage_patience_seconds": 3.0,
            "max_attempts": 2,
            "retry_backoff_seconds": 0.0,
        }
    )
    # Attempt 1 trains until its first checkpoint cannot be stored; another attempt is due.
    assert runner.run_job(gone, job_id) is JobStatus.queued
    waiting = job_row(settings, job_id)
    assert waiting.attempt == 1
    retries = events_of(settings, job_id, "storage")
    assert retries and all("object storage unreachable, retrying" in e.message for e in retries)
    assert retries[0].data["retry"] == 1 and retries[0].data["retries"] >= 2
    # Attempt 2 keeps no checkpoints; its result cannot be stored either, and it is the last one.
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    no_checkpoints = gone.model_copy(update={"checkpoint_steps": 1000})
    with session_scope(settings.database_url) as session:
        row = session.get(Job, job_id)
        row.spec = {**row.spec, "hyperparameters": {**row.spec["hyperparameters"], "checkpoint_steps": None}}
    assert runner.run_job(no_checkpoints, job_id) is JobStatus.failed
    failed = job_row(settings, job_id)
    assert failed.error_code == "storage_unavailable", failed.error_message
    assert (
        "could not store the result" in failed.error_message
        and "gave up after 2 attempts" in failed.error_message
    )
    assert len(events_of(settings, job_id, "storage")) > len(retries)


# --------------------------------------------------------------------------------------------- error shapes


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/fine_tuning/jobs"])
def test_a_body_nested_too_deeply_says_so(api_client, path):
    body = "[" * 10_000 + "]" * 10_000
    response = api_client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["param"] == "body"
    assert "nested too deeply" in error["message"]


def test_a_rewritten_metric_point_says_which_attempt_wrote_it_and_when(settings, store, api_client):
    job_id = submitted_job(settings, store)
    with session_scope(settings.database_url) as session:
        job_service.record_metric(
            session=session, job_id=job_id, attempt=1, split="train", step=3, values={"loss": 2.0}
        )
    first = api_client.get(f"/v1/jobs/{job_id}/metrics").json()["train"][0]
    assert first["attempt"] == 1
    time.sleep(0.01)
    with session_scope(settings.database_url) as session:  # a resumed attempt repeats step 3
        job_service.record_metric(
            session=session, job_id=job_id, attempt=2, split="train", step=3, values={"loss": 1.5}
        )
    [point] = api_client.get(f"/v1/jobs/{job_id}/metrics").json()["train"]
    assert point["attempt"] == 2 and point["loss"] == 1.5
    assert point["recorded_at"] > first["recorded_at"]


def test_an_artifact_restored_from_a_backup_is_served_again(settings, store, make_team, api_only):
    team_id, key = make_team()
    job_id = finished_job(settings, store, team_id, {"adapter_model.safetensors": SMALL})
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{api_only.base_url}/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors?redirect=false"
    stored_key = storage_key(settings, job_id, "adapter_model.safetensors")
    flip_a_byte(store, stored_key, at=3)
    assert httpx.get(url, headers=headers).status_code == 500
    assert httpx.get(url, headers=headers).status_code == 500  # still damaged: still refused
    store.put_bytes(stored_key, SMALL)  # an operator restores the object
    restored = httpx.get(url, headers=headers)
    assert restored.status_code == 200 and restored.content == SMALL
    assert damaged_at(settings, job_id, "adapter_model.safetensors") is None
