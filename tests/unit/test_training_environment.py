"""The environment training processes (and the warm runtime they fork from) start with."""

from __future__ import annotations

import pytest

from worker.training.distributed import MALLOC_ENV, child_environment


def test_training_processes_keep_each_steps_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    env = child_environment("/cache")
    assert {name: env[name] for name in MALLOC_ENV} == MALLOC_ENV


def test_an_operators_malloc_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    # Setting one of the pair alone turns glibc's adjustment of the other off: the service adds neither.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    env = child_environment("/cache")
    assert not set(MALLOC_ENV) & set(env)
