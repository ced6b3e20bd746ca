"""The warm training runtime (worker/warm.py) on its own: it outlives the thread that started it, reports
how each forked attempt ended, and its attempts are process groups that one signal stops."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from worker.training.distributed import MALLOC_ENV, child_environment
from worker.warm import WarmRuntime


@pytest.fixture(scope="module")
def runtime():
    warm = WarmRuntime({})
    yield warm
    warm.stop()


def spawn_from_a_thread(warm: WarmRuntime, work_dir: Path, ranks: int = 1) -> int:
    box: list[int] = []
    thread = threading.Thread(
        target=lambda: box.append(warm.spawn(work_dir, work_dir / "log", ranks, {}, ranks > 1))
    )
    thread.start()
    thread.join(120)
    return box[0]


def test_it_outlives_the_thread_that_started_it(runtime, tmp_path):
    # No launch.json: the attempt's process fails at once, which is all this needs.
    first = spawn_from_a_thread(runtime, tmp_path)
    assert runtime.wait(first, 60) == 1
    zygote = runtime._proc.pid
    time.sleep(1)  # the starting thread has ended: the zygote must not have died with it
    assert runtime._proc.poll() is None
    second = spawn_from_a_thread(runtime, tmp_path)
    assert runtime.wait(second, 60) == 1
    assert runtime._proc.pid == zygote
    assert "launch.json" in (tmp_path / "log").read_text()


def test_when_a_rank_fails_the_leader_ends_the_attempt_with_its_code(runtime, tmp_path):
    # Two ranks that crash at once (no launch.json): the leader stops the other and ends non-zero.
    crashed = spawn_from_a_thread(runtime, tmp_path, ranks=2)
    assert runtime.wait(crashed, 60) not in (None, 0)
    assert (tmp_path / "log").read_text().count("launch.json") >= 1


def test_the_attempts_fork_from_a_process_with_the_training_malloc_settings(tmp_path, monkeypatch):
    # glibc reads them when the zygote starts; the attempts it forks inherit its malloc as it is.
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    warm = WarmRuntime(child_environment(str(tmp_path)))
    try:
        assert warm.wait(spawn_from_a_thread(warm, tmp_path), 60) == 1
        environ = Path(f"/proc/{warm._proc.pid}/environ").read_bytes().split(b"\0")
        assert {f"{name}={value}".encode() for name, value in MALLOC_ENV.items()} <= set(environ)
    finally:
        warm.stop()
