"""The warm training runtime: a process that has imported the training stack once (torch, transformers, peft,
trl, datasets) and forks each attempt's training processes from itself, so an attempt starts training in a
fraction of a second instead of paying seconds of imports, and ends without the interpreter's teardown.

    worker (node agent) ──pipe──► zygote (`python -m worker.warm`, imports done, no threads, no CUDA)
                                    └─ fork ─► leader (own session and process group = the attempt)
                                                 ├─ fork ─► rank 0   (worker.launch.run, then os._exit)
                                                 └─ fork ─► rank 1…  (one per GPU: RANK, LOCAL_RANK, WORLD_SIZE,
                                                                     MASTER_ADDR/PORT for env:// init)

The attempt is the leader's process group, as it was torchrun's: a cancel stops all of it with one signal,
kill -9 of the worker takes everything with it (each process dies with its parent), and the ranks report how
they ended in the work folder's outcome files (worker/launch.py). When one rank exits abnormally the leader
stops the others, as torchrun does. The zygote touches no GPU before it forks (CUDA cannot be used in a forked
child of a process that initialized it; torch checks availability through NVML here), and it is restarted if
it dies. A deployment can turn it off (TUNEFORGE_WARM_RUNTIME=false): attempts then start as fresh processes
under torchrun.

Protocol on the zygote's stdin/stdout, one JSON object per line:
    {"op": "start", "id": n, "work_dir": ..., "log": ..., "ranks": n, "env": {...}}  ->  {"id": n, "pid": leader}
    and, whenever a leader ends:                                                          {"exited": pid, "code": c}
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# Imported once by the zygote; each attempt's fork starts with them loaded.
PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors")
# Set in the zygote: torch checks CUDA through NVML, which leaves the CUDA runtime uninitialized for the forks.
ZYGOTE_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
RANK_STOP_GRACE_SECONDS = 5.0


# ------------------------------------------------------------------------------------ in the zygote process


def _die_with_parent() -> None:
    from worker.launch import _die_with_parent as die

    die()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _title(title: str) -> None:
    # What `ps` and `pgrep -f` show: a forked attempt reads as the command it stands for.
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(title)


def _run_rank(work_dir: Path, rank: int) -> None:
    """The body of one rank's process; never returns."""
    code = 1
    _title(f"{sys.executable} -m worker.launch {work_dir} (warm, rank {rank})")
    try:
        from shared.logs import configure_logging
        from worker.launch import run

        configure_logging(os.environ.get("TUNEFORGE_LOG_LEVEL", "INFO"))
        code = run(work_dir)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # Skip the interpreter's teardown (over a second with the training stack loaded): everything that
        # matters was written and flushed by run().
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _lead(request: dict[str, Any]) -> None:
    """The leader of one attempt's process group; never returns."""
    code = 1
    try:
        os.setsid()
        _die_with_parent()
        _title(f"{sys.executable} -m worker.warm leader {request['work_dir']}")
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        for name in [n for n in os.environ if n.startswith("TUNEFORGE_")]:
            del os.environ[name]  # this attempt's settings only
        os.environ.update(request["env"])
        work_dir, ranks = Path(request["work_dir"]), int(request["ranks"])
        if ranks == 1 and not request.get("process_group"):
            _run_rank(work_dir, 0)
        port = str(_free_port())
        children: dict[int, int] = {}
        for rank in range(ranks):
            pid = os.fork()
            if pid == 0:
                _die_with_parent()
                os.environ.update(
                    {
                        "RANK": str(rank),
                        "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(ranks),
                        "LOCAL_WORLD_SIZE": str(ranks),
                        "GROUP_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port,
                    }
                )
                _run_rank(work_dir, rank)
            children[pid] = rank
        code = _wait_for_ranks(children)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _wait_for_ranks(children: dict[int, int]) -> int:
    """Waits for every rank; when one exits abnormally, stops the others (they would wait for it forever in
    their next collective). Returns 0, or the first abnormal exit code (128 + signal for a signal)."""
    first_bad = 0
    stopping_since: float | None = None
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if stopping_since is not None and time.monotonic() - stopping_since > RANK_STOP_GRACE_SECONDS:
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
            time.sleep(0.05)
            continue
        if pid not in children:
            continue
        del children[pid]
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        if code != 0 and first_bad == 0:
            first_bad = code
            stopping_since = time.monotonic()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)
    return first_bad


def zygote_main() -> None:
    """`python -m worker.warm`: import the training stack, then fork attempts on request."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(module)
    import worker.launch
    import worker.training.recipes.lora
    import worker.training.trainer  # noqa: F401

    # Frozen before any fork: the attempts' collections skip the stack's objects (the Trainer runs a full one as
    # training starts, 0.2-0.4 s over them otherwise) and leave their memory pages shared with the zygote.
    gc.freeze()
    out = sys.stdout
    # Keep the protocol pipe for replies; what the stack prints goes to stderr (the worker's log).
    sys.stdout = sys.stderr
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    stdin = sys.stdin.fileno()
    buffer = b""
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.2)
        if readable:
            chunk = os.read(stdin, 65536)
            if not chunk:  # the worker went away
                os._exit(0)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                out.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(stdin)
                    _lead(request)
                print(json.dumps({"id": request["id"], "pid": pid}), file=out, flush=True)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            print(json.dumps({"exited": pid, "code": code}), file=out, flush=True)


# ------------------------------------------------------------------------------------ in the worker process


_shared: WarmRuntime | None = None
_shared_lock = threading.Lock()


def runtime_for(settings: Any) -> WarmRuntime | None:
    """This worker process's warm runtime (started on first use), or None when the deployment turned it off."""
    global _shared
    if not settings.warm_runtime:
        return None
    from worker.training.distributed import child_environment

    with _shared_lock:
        if _shared is None:
            _shared = WarmRuntime(child_environment(str(settings.cache_dir)))
        return _shared


class WarmRuntime:
    """The node worker's handle on its zygote: starts attempts there and learns how they ended."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._owners: dict[int, subprocess.Popen[bytes]] = {}  # leader pid -> the zygote that forked it
        self._changed = threading.Condition()
        self._next_id = 0
        # The zygote dies with the thread that started it (PR_SET_PDEATHSIG follows the parent thread, not
        # the process): a thread of its own, alive as long as the worker, starts (and restarts) it.
        self._wanted = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        threading.Thread(target=self._keep, name="warm-runtime-keeper", daemon=True).start()

    def _keep(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._proc is None or self._proc.poll() is not None:
                try:
                    self._proc, self._start_error = self._start(), None
                except BaseException as exc:
                    self._start_error = exc
            self._started.set()

    def _running(self) -> subprocess.Popen[bytes]:
        """The zygote, started (by the keeper thread) if it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            self._started.clear()
            self._wanted.set()
            self._started.wait()
            if self._start_error is not None:
                raise RuntimeError(f"the warm training runtime did not start: {self._start_error}")
        assert self._proc is not None
        return self._proc

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.warm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **self.env, **ZYGOTE_ENV},
            start_new_session=True,
        )
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or b"{}")
        if "ready" not in ready:
            raise RuntimeError("the warm training runtime did not start; see the worker's log")
        threading.Thread(target=self._read, args=(proc,), name="warm-runtime", daemon=True).start()
        log.info("warm training runtime ready (pid %d)", proc.pid)
        return proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            with self._changed:
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._replies[message["id"]] = message["pid"]
                self._changed.notify_all()
        with self._changed:  # the zygote died: its attempts died with it
            self._changed.notify_all()

    def spawn(
        self, work_dir: Path, log_path: Path, ranks: int, env: Mapping[str, str], process_group: bool
    ) -> int:
        """Starts an attempt's training processes; returns the leader's pid (= its process group)."""
        with self._lock:
            proc = self._running()
            self._next_id += 1
            request_id = self._next_id
            request = {
                "op": "start",
                "id": request_id,
                "work_dir": str(work_dir),
                "log": str(log_path),
                "ranks": ranks,
                "process_group": process_group,
                "env": dict(env),
            }
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        with self._changed:
            while request_id not in self._replies:
                if proc.poll() is not None:
                    raise RuntimeError("the warm training runtime died while starting an attempt")
                self._changed.wait(1.0)
            pid = self._replies.pop(request_id)
            self._owners[pid] = proc
            return pid

    def exit_code(self, pid: int) -> int | None:
        """The leader's exit code once it ended (-signal when killed by one), None while it runs."""
        with self._changed:
            if pid in self._exits:
                return self._exits[pid]
            owner = self._owners.get(pid)
            if owner is not None and owner.poll() is not None:
                return -signal.SIGKILL  # its zygote died, and the attempt with it
            return None

    def wait(self, pid: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (code := self.exit_code(pid)) is None and time.monotonic() < deadline:
                self._changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if code is not None:
                self._exits.pop(pid, None)
                self._owners.pop(pid, None)
            return code

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)


if __name__ == "__main__":
    zygote_main()
