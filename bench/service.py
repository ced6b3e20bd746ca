"""The service as the benchmarks drive it: `tuneforge migrate`, `api` and `worker` as child processes with
the caller's TUNEFORGE_* environment, an API key, and a job submitted and followed over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled")


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

    def __init__(self, env: dict[str, str], log_path: Path, worker_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("ab")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker_args = worker_args

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
            self._cli("worker", *self.worker_args),
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

    def client(self, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key()}"}
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
        self.log.close()


def run_service_job(client: httpx.Client, spec: dict[str, Any], poll: float = 0.1) -> tuple[dict, float]:
    """Submits a job and polls it until it ends; returns the job and the wall time from submission."""
    started = time.perf_counter()
    response = client.post("/v1/jobs", json=spec)
    if response.status_code >= 400:
        raise RuntimeError(f"job refused ({response.status_code}): {response.text}")
    job_id = response.json()["id"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
        time.sleep(poll)
    return job, time.perf_counter() - started
