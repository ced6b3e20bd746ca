"""The service as the benchmarks drive it: `tuneforge migrate`, `api` and `worker` as child processes with
the caller's TUNEFORGE_* environment, an API key, and a job submitted and followed through the SDK."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cli.main import stop_process
from tuneforge_sdk import Tuneforge

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError("service not ready")


class Service:
    """Migrates, then runs the API and one worker until `stop()`; their output goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("ab")
        self.procs: list[subprocess.Popen[bytes]] = []

    def _cli(self, *args: str, session: bool = True) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=self.log,
            start_new_session=session,
        )

    def start(self) -> Service:
        if self._cli("migrate", session=False).wait() != 0:
            raise RuntimeError(f"tuneforge migrate failed; see {self.log.name}")
        self.procs = [
            self._cli("api", "--port", str(self.port)),
            self._cli("worker"),
        ]
        wait_ready(self.base_url)
        return self

    def api_key(self, name: str = "bench") -> str:
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

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=60)
        self.log.close()


def run_service_job(client: Tuneforge, spec: dict[str, Any], poll: float = 0.1) -> tuple[dict, float]:
    """Submits a job and polls it until it ends; returns the job and the wall time from submission.
    A refused job raises the SDK's TuneforgeError."""
    started = time.perf_counter()
    job_id = client.create_job(spec)["id"]
    job = client.wait(job_id, poll_interval=poll)
    return job, time.perf_counter() - started
