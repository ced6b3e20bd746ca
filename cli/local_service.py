"""The service run from this machine: the API and workers as child processes (`tuneforge api`, `tuneforge
worker`), each in a session of its own so that stopping one stops its whole process group; the wait until
the API is ready; and what the embedded default needs before it starts (a migrated database, its storage
bucket, the default team's local API key).

`tuneforge up`, the demo, the benchmarks and the tests' service fixtures all start and stop processes here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import httpx

__all__ = [
    "LocalService",
    "free_port",
    "local_api_key",
    "prepare_embedded",
    "start_cli_process",
    "stop_process",
    "wait_http",
    "wait_ready",
]


def free_port() -> int:
    """A loopback TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(
    url: str,
    *,
    timeout: float = 60,
    ok: tuple[int, ...] = (200,),
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Polls `url` until it answers one of the `ok` statuses; raises TimeoutError, or RuntimeError as soon as
    `process` (the server, when given) has exited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2).status_code
            if last in ok:
                return
        except httpx.TransportError as exc:
            last = exc
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{url}: the server process exited with {process.returncode} before it answered"
            )
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


def wait_ready(
    base_url: str, *, timeout: float = 120, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Waits until the API at `base_url` answers /readyz with 200 (its database and storage answer)."""
    wait_http(base_url.rstrip("/") + "/readyz", timeout=timeout, process=process)


def start_cli_process(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts `tuneforge ARGS...` in a new session (its own process group), with `env` (default: this
    process's environment); its output is appended to `log_path`, else it shares this terminal."""
    argv = [sys.executable, "-m", "cli.main", *args]
    environment = dict(env) if env is not None else None
    if log_path is None:
        return subprocess.Popen(argv, env=environment, cwd=cwd, start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child holds its own copy of the descriptor; ours is closed once it has started.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv, env=environment, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20, sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to the process's group, then SIGKILL to the group if it has not exited after `timeout` s."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class LocalService:
    """The API and workers of one deployment as named child processes, started and stopped together.

    env: their environment (default: this process's, read when each starts). port: the API's port (default:
    a free one). log_dir: each process appends to log_dir/<name>.log, or all of them to log_dir/<log_name>;
    without log_dir they share this terminal. cwd: their working folder (a relative TUNEFORGE_HOME is read
    from it). stop_timeout: seconds between SIGTERM and SIGKILL."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_dir: Path | None = None,
        log_name: str | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 20,
    ) -> None:
        self.env = dict(env) if env is not None else None
        self.port = port or free_port()
        self.log_dir = log_dir
        self.log_name = log_name
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path | None:
        """The file process `name` writes to (None: this terminal)."""
        if self.log_dir is None:
            return None
        return self.log_dir / (self.log_name or f"{name}.log")

    def spawn(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts `tuneforge ARGS...` as process `name`, with the service's environment updated by `env`."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} is already running")
        environment = self.env
        if env:
            environment = {**(os.environ if environment is None else environment), **env}
        proc = start_cli_process(args, env=environment, log_path=self.log_path(name), cwd=self.cwd)
        self.procs[name] = proc
        return proc

    def start_api(self, *, ready_timeout: float | None = 120) -> subprocess.Popen[bytes]:
        """Starts `tuneforge api` on the service's port and waits for /readyz (not when ready_timeout is None)."""
        proc = self.spawn("api", ["api", "--port", str(self.port)])
        if ready_timeout is not None:
            self.wait_ready(timeout=ready_timeout)
        return proc

    def start_worker(
        self, name: str = "worker", *, role: str = "all", env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts `tuneforge worker --role ROLE` (all, train or validate) as process `name`."""
        return self.spawn(name, ["worker", "--role", role], env)

    def wait_ready(self, timeout: float = 120) -> None:
        """Waits until the API answers /readyz; fails at once if its process has exited."""
        wait_ready(self.base_url, timeout=timeout, process=self.procs.get("api"))

    def stop(self, name: str | None = None, sig: int = signal.SIGTERM) -> None:
        """Stops process `name`, or every process, the last started first (workers before the API)."""
        for key in [name] if name else reversed(list(self.procs)):
            stop_process(self.procs.pop(key), timeout=self.stop_timeout, sig=sig)


def prepare_embedded() -> None:
    """Migrates the database and creates the storage bucket, so a fresh machine can start at once."""
    from shared.migrate import upgrade
    from shared.settings import get_settings
    from shared.storage import make_store

    settings = get_settings()
    upgrade(settings.database_url)
    make_store(settings).ensure_bucket()


def local_api_key() -> str:
    """The embedded default's key for the default team: made on first use, kept in TUNEFORGE_HOME/api-key."""
    from shared.db import session_scope
    from shared.models import DEFAULT_TEAM_ID
    from shared.services.auth import authenticate, create_api_key
    from shared.settings import get_settings

    settings = get_settings()
    path = settings.home / "api-key"
    with session_scope(settings.database_url) as session:
        if path.exists():
            key = path.read_text().strip()
            if authenticate(session=session, settings=settings, key=key) is not None:
                return key
        _, key = create_api_key(session=session, settings=settings, team_id=DEFAULT_TEAM_ID, name="local")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
