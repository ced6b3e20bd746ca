"""The service as the benchmarks drive it: `tuneforge migrate`, `api` and `worker` as child processes with
the caller's TUNEFORGE_* environment, an API key, and a job submitted and followed through the SDK."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cli.local_service import LocalService, start_cli_process
from tuneforge_sdk import Tuneforge

ROOT = Path(__file__).resolve().parents[1]


class Service(LocalService):
    """Migrates, then runs the API and one worker until `stop()`; their output goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env=env, log_dir=log_path.parent, log_name=log_path.name, cwd=ROOT, stop_timeout=60)

    def start(self) -> Service:
        """Migrates the database, starts the API and a worker, and waits until the API is ready."""
        log_path = self.log_path("migrate")
        if start_cli_process(["migrate"], env=self.env, log_path=log_path, cwd=ROOT).wait() != 0:
            raise RuntimeError(f"tuneforge migrate failed; see {log_path}")
        self.start_api(ready_timeout=None)
        self.start_worker()
        self.wait_ready()
        return self

    def api_key(self, name: str = "bench") -> str:
        """A fresh key of the default team, made by `tuneforge keys create`."""
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "keys", "create", "default", "--name", name],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().splitlines()[-1]

    def client(self, timeout: float = 60) -> Tuneforge:
        """An SDK client of the service with a fresh API key."""
        return Tuneforge(self.base_url, self.api_key(), timeout=timeout)


def run_service_job(client: Tuneforge, spec: dict[str, Any], poll: float = 0.1) -> tuple[dict, float]:
    """Submits a job and polls it until it ends; returns the job and the wall time from submission.
    A refused job raises the SDK's TuneforgeError."""
    started = time.perf_counter()
    job_id = client.create_job(spec)["id"]
    job = client.wait(job_id, poll_interval=poll)
    return job, time.perf_counter() - started
