"""End to end: the embedded default as a user starts it. `tuneforge up` (the API and two workers on SQLite, the
folder broker and local storage in a fresh TUNEFORGE_HOME), `tuneforge models import` of the tiny Llama, then a
dataset uploaded, a job trained and its adapter downloaded over HTTP, each file checked against its sha256."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from cli import demo
from cli.local_service import free_port, start_cli_process, stop_process, wait_ready
from tests.conftest import ROOT
from tests.helpers import color_messages, corpus, to_jsonl
from tuneforge_sdk import Tuneforge

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama-embedded"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pids(log: Path) -> list[int]:
    """The pids `tuneforge up` printed for its two workers, once it has."""
    found = re.search(r"workers started \(pids (\d+), (\d+)\)", log.read_text(errors="replace"))
    return [int(found.group(1)), int(found.group(2))] if found else []


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`tuneforge up` in a fresh TUNEFORGE_HOME, with nothing but that home and a port configured: (base URL,
    home, environment). Stopping it must stop its workers too."""
    home = tmp_path_factory.mktemp("embedded") / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env |= {"TUNEFORGE_HOME": str(home), "TUNEFORGE_API_PORT": str(port)}
    log = home.parent / "up.log"
    proc = start_cli_process(["up"], env=env, log_path=log, cwd=ROOT)
    pids: list[int] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=180, process=proc)
        pids = worker_pids(log)
        assert len(pids) == 2 and all(map(alive, pids)), log.read_text()
        yield f"http://127.0.0.1:{port}", home, env
        stop_process(proc, timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]
        # `up` stops its workers (each in a session of its own) on its way out.
        assert not any(map(alive, pids)), log.read_text()[-3000:]
    finally:
        stop_process(proc, timeout=5, sig=signal.SIGKILL)
        for pid in filter(alive, pids):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_up_trains_a_job_and_serves_its_verified_adapter(embedded, tmp_path, capsys):
    from worker.training.toy_models import build_llama

    base_url, home, env = embedded
    key = (home / "api-key").read_text().strip()
    assert (home / "tuneforge.db").is_file() and (home / "broker").is_dir()

    folder = build_llama(tmp_path / "model", corpus=corpus())
    imported = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "import", MODEL, str(folder), "--description", "tiny"],
        env=env | {"COLUMNS": "250"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert f"registered {MODEL} at s3://tuneforge/models/{MODEL}" in imported.stdout
    stored_model = home / "storage" / "tuneforge" / "models" / MODEL
    assert (stored_model / "config.json").read_bytes() == (folder / "config.json").read_bytes()

    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(color_messages(16, seed=5)))
    with Tuneforge(base_url, key, timeout=60) as tf:
        models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert MODEL in [m["id"] for m in models["data"]]  # the running API reads the registry file
        upload = tf.upload_file(data)
        assert (upload["num_samples"], upload["format"]) == (16, "messages")
        job = tf.create_job(
            {
                "base_model": MODEL,
                "dataset": upload["id"],
                "adapter": {"rank": 4},
                "hyperparameters": {"max_steps": 3, "batch_size": 4, "max_seq_length": 128},
            }
        )
        done = tf.wait(job["id"], timeout=300, poll_interval=0.5)
        assert done["status"] == "succeeded", done
        # The demo's own progress display and download on the real service (the job has ended: one pass).
        assert demo._follow(tf, job["id"], steps=3)["status"] == "succeeded"
        adapter_dir = demo._download_adapter(tf, job["id"], tmp_path / "downloads")
        recorded = {a["name"]: a for a in tf.artifacts(job["id"])["data"] if a["kind"] == "adapter"}

    shown = capsys.readouterr().out
    assert shown.count("job succeeded after 3 steps") == 1 and "sha256 verified" in shown
    assert done["result"]["final_train_loss"] is not None
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(recorded)
    for name, artifact in recorded.items():
        downloaded = (adapter_dir / name).read_bytes()
        assert hashlib.sha256(downloaded).hexdigest() == artifact["sha256"], name
        assert len(downloaded) == artifact["size_bytes"], name
    # The bytes the worker put into the local storage folder are the ones served.
    [stored] = (home / "storage" / "tuneforge" / "artifacts").glob(f"*/{job['id']}/attempt-1/adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (stored / name).read_bytes() == (adapter_dir / name).read_bytes(), name
