"""End to end: the `tuneforge` user commands and the SDK against a real uvicorn API and Celery worker that
train the tiny Llama. The CLI runs in-process (typer's CliRunner), configured only through its environment."""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, to_jsonl
from tuneforge_sdk import Tuneforge, TuneforgeError

pytestmark = pytest.mark.e2e
JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")


@pytest.fixture
def cli(service, api_key):
    """Runs `tuneforge ARGS...` in-process; returns the click Result."""
    runner = CliRunner()
    env = {"TUNEFORGE_URL": service.base_url, "TUNEFORGE_API_KEY": api_key, "COLUMNS": "250"}

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=env)

    return invoke


@pytest.fixture
def sdk(service, api_key):
    with Tuneforge(service.base_url, api_key, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def finished_job(service, api_key, tmp_path_factory):
    """A job submitted with `tuneforge submit <local path> --max-steps 4 --follow`: (job id, CLI output)."""
    folder = tmp_path_factory.mktemp("cli-data")
    train = folder / "train.jsonl"
    train.write_bytes(to_jsonl(color_messages(16, seed=3)))
    result = CliRunner().invoke(
        app,
        [
            "submit",
            "--model",
            TINY_MODEL,
            "--dataset",
            str(train),
            "--max-steps",
            "4",
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--learning-rate",
            "0.005",
            "--max-seq-length",
            "256",
            "--metadata",
            "suite=cli",
            "--metadata",
            "owner=e2e",
            "--follow",
        ],
        env={"TUNEFORGE_URL": service.base_url, "TUNEFORGE_API_KEY": api_key, "COLUMNS": "250"},
    )
    assert result.exit_code == 0, (result.output, service.log("worker")[-3000:])
    job_id = JOB_ID.search(result.stdout).group(0)
    return job_id, result.stdout


def test_submit_uploads_a_local_dataset_and_follows_the_job(finished_job, sdk):
    job_id, output = finished_job
    assert re.search(r"uploaded .*train\.jsonl: 16 samples \(messages\) as file-[0-9a-f]{24}", output), output
    assert f"submitted job {job_id}" in output
    assert f"job {job_id} succeeded after 4 steps: train loss" in output
    job = sdk.get_job(job_id)
    assert job["status"] == "succeeded"
    assert job["metadata"] == {"suite": "cli", "owner": "e2e"}
    assert job["adapter"]["rank"] == 4 and job["hyperparameters"]["max_steps"] == 4
    assert job["dataset"].startswith("file-")


def test_list_status_and_events(finished_job, cli):
    job_id, _ = finished_job
    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert job_id in listed.stdout
    succeeded = cli("list", "--status", "succeeded", "--limit", "0", "--json")
    assert succeeded.exit_code == 0, succeeded.output
    assert job_id in [j["id"] for j in json.loads(succeeded.stdout)]
    assert all(j["status"] == "succeeded" for j in json.loads(succeeded.stdout))

    once = cli("status", job_id, "--once")
    assert once.exit_code == 0, once.output
    assert "succeeded (attempt 1)" in once.stdout
    assert "step 4/4" in once.stdout
    assert re.search(r"train loss\s+\d+\.\d{4} \(step 4\)", once.stdout), once.stdout
    assert "suite=cli" in once.stdout

    live = cli("status", job_id, "--interval", "0.2")  # a finished job: one update, then the summary
    assert live.exit_code == 0, live.output
    assert f"job {job_id} succeeded after 4 steps" in live.stdout

    events = cli("events", job_id)
    assert events.exit_code == 0, events.output
    assert re.search(r"\d\d:\d\d:\d\d info +created +job created \(lora\)", events.stdout), events.stdout
    assert "job succeeded after 4 steps" in events.stdout
    lines = cli("events", job_id, "--json").stdout.splitlines()
    statuses = [e["data"].get("status") for e in map(json.loads, lines) if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    first = json.loads(lines[0])["id"]
    after = cli("events", job_id, "--json", "--after", str(first)).stdout.splitlines()
    assert after == lines[1:]
    followed = cli("events", job_id, "--follow", "--json")  # the stream of an ended job ends at once
    assert followed.exit_code == 0, followed.output
    assert followed.stdout.splitlines() == lines


def stored_log(sdk, job_id: str) -> dict:
    """The job's latest log page once the worker has stored it (a few seconds after the job ends)."""
    deadline = time.monotonic() + 60
    while not (page := sdk.logs(job_id))["stored"]:
        assert time.monotonic() < deadline, page
        time.sleep(0.5)
    return page


def test_logs_of_the_training_processes(finished_job, cli, sdk):
    job_id, _ = finished_job
    page = stored_log(sdk, job_id)
    assert page["attempt"] == 1 and page["complete"] and not page["has_more"]
    # The training process logs JSON lines carrying the job and the attempt.
    records = [json.loads(line) for line in page["lines"] if line.startswith('{"time"')]
    assert records and all((r["job_id"], r["attempt"]) == (job_id, 1) for r in records)
    assert {"time", "level", "logger", "message", "pid"} <= set(records[0])

    printed = cli("logs", job_id)
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.splitlines() == page["lines"]
    tail = cli("logs", job_id, "--tail", "2")
    assert tail.stdout.splitlines() == page["lines"][-2:]
    followed = cli("logs", job_id, "--follow")  # a finished job: everything, then it returns
    assert followed.exit_code == 0 and followed.stdout.splitlines() == page["lines"]
    missing = cli("logs", job_id, "--attempt", "5")
    assert missing.exit_code == 1 and "no attempt 5" in missing.output


def test_follow_logs_while_the_job_trains(sdk, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(to_jsonl(color_messages(16, seed=4)))
    file_id = sdk.upload_file(train)["id"]
    job = sdk.create_job(
        {"base_model": TINY_MODEL, "dataset": file_id, "hyperparameters": {"max_steps": 20, "batch_size": 4}}
    )
    followed = list(sdk.follow_logs(job["id"]))  # from before the job starts until its log is complete
    assert sdk.get_job(job["id"])["status"] == "succeeded"
    assert {attempt for attempt, _ in followed} == {1}
    assert [line for _, line in followed] == stored_log(sdk, job["id"])["lines"]
    assert any(f'"job_id": "{job["id"]}"' in line for _, line in followed)


def test_download_is_verified(finished_job, cli, sdk, tmp_path):
    job_id, _ = finished_job
    result = cli("download", job_id, "--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "sha256 verified" in result.stdout
    folder = tmp_path / f"{job_id}-adapter"
    recorded = {a["name"]: a["sha256"] for a in sdk.artifacts(job_id)["data"] if a["kind"] == "adapter"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(recorded)
    for name, sha in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]

    again = cli("download", job_id, "--dest", str(tmp_path))
    assert again.exit_code == 1
    assert "already exists" in again.stderr
    assert cli("download", job_id, "--dest", str(tmp_path), "--force").exit_code == 0

    merged = cli("download", job_id, "--dest", str(tmp_path), "--kind", "merged")
    assert merged.exit_code == 1
    assert f"job {job_id} has no merged artifacts" in merged.stderr


def test_files_upload_and_list(cli, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What color is snow? ", "completion": "white"}\n' * 3)
    uploaded = cli("files", "upload", str(data))
    assert uploaded.exit_code == 0, uploaded.output
    file_id = re.search(r"file-[0-9a-f]{24}", uploaded.stdout).group(0)
    assert f"{file_id}: prompts.jsonl, 3 samples (prompt_completion)" in uploaded.stdout
    listed = cli("files", "list")
    assert listed.exit_code == 0 and file_id in listed.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    refused = cli("files", "upload", str(bad))
    assert refused.exit_code == 1
    assert "line 2" in refused.stderr and "Traceback" not in refused.output


def test_api_errors_exit_1_with_the_api_message(cli, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(color_messages(4)))
    unknown_model = cli(
        "submit", "-m", "no-such-model", "-d", str(data), "--max-steps", "1", "--max-seq-length", "256"
    )
    assert unknown_model.exit_code == 1
    assert "base_model" in unknown_model.stderr and "no-such-model" in unknown_model.stderr
    assert isinstance(unknown_model.exception, SystemExit)

    missing = cli("status", "ftjob-000000000000000000000000", "--once")
    assert missing.exit_code == 1
    assert "not_found" in missing.stderr and "Traceback" not in missing.output

    bad_rank = cli("submit", "-m", TINY_MODEL, "-d", str(data), "--rank", "5000")
    assert bad_rank.exit_code == 1
    assert "adapter.rank" in bad_rank.stderr


def test_wrong_key_is_a_401_with_a_hint(service):
    result = CliRunner().invoke(
        app, ["list", "--url", service.base_url, "--api-key", "tf_nope_nope"], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and "TUNEFORGE_API_KEY" in result.stderr


def test_cancel_a_long_job(cli, sdk, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(color_messages(32)))
    submitted = cli(
        "submit", "-q", "-m", TINY_MODEL, "-d", str(data), "--max-steps", "100000", "--max-seq-length", "256"
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    assert JOB_ID.fullmatch(job_id), submitted.stdout
    deadline = time.monotonic() + 120
    while not sdk.metrics(job_id)["train"] and time.monotonic() < deadline:
        time.sleep(0.25)
    assert sdk.get_job(job_id)["status"] == "running"

    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"job {job_id} cancelling" in cancelled.stdout

    live = cli("status", job_id, "--interval", "0.5", "--no-events")  # follows until it ends; not a success
    assert live.exit_code == 1, live.output
    assert f"job {job_id} cancelled" in live.stdout
    assert sdk.get_job(job_id)["status"] == "cancelled"

    again = cli("cancel", job_id)
    assert again.exit_code == 1
    assert "already cancelled" in again.stderr


def test_a_tampered_download_raises(sdk, settings, store, tmp_path):
    """The SDK refuses an adapter whose stored bytes no longer match their recorded sha256."""
    from shared.db import session_scope
    from shared.models import Artifact

    file_id = sdk.upload_file(_write(tmp_path / "train.jsonl", to_jsonl(color_messages(8))))["id"]
    job = sdk.create_job(
        {
            "base_model": TINY_MODEL,
            "dataset": file_id,
            "hyperparameters": {"max_steps": 2, "max_seq_length": 256},
        }
    )
    assert sdk.wait(job["id"], timeout=300, poll_interval=0.5)["status"] == "succeeded"
    with session_scope(settings.database_url) as session:
        key = session.scalar(
            select(Artifact.storage_key).where(
                Artifact.job_id == job["id"],
                Artifact.kind == "adapter",
                Artifact.name == "adapter_config.json",
            )
        )
        # The adapter's archive, stored with it (the SDK's first try reads it through a presigned URL).
        archive_key = session.scalar(
            select(Artifact.storage_key).where(Artifact.job_id == job["id"], Artifact.kind == "archive")
        )
    original = store.read_bytes(key)
    store.put_bytes(key, bytes([original[0] ^ 1]) + original[1:])  # the same size, other bytes
    assert store.read_bytes(key) != original
    archive = b"".join(store.iter_chunks(archive_key))
    store.put_bytes(archive_key, bytes(len(archive)))  # zeros: no tar archive at all

    client = Tuneforge(sdk.base_url, sdk.api_key, retries=2, backoff=0)
    with pytest.raises(TuneforgeError) as raised:
        client.download_adapter(job["id"], tmp_path / "out")
    # The stored archive is unreadable, so the SDK asks the API to stream the files; that archive ends short,
    # the API marks the file damaged, and the next retry is told so plainly.
    assert raised.value.code == "artifact_corrupted", raised.value
    assert list((tmp_path / "out").iterdir()) == []  # nothing unverified is left behind

    store.put_bytes(key, original)
    assert client.download_adapter(job["id"], tmp_path / "out").is_dir()  # the files, streamed
    store.put_bytes(archive_key, archive)
    assert client.download_adapter(job["id"], tmp_path / "out", overwrite=True).is_dir()  # the archive


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
