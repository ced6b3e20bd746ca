"""The GPUs of a node and who holds them: disjoint sets of device ids handed to attempts, each set given back
when its attempt ends, however it ends."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence


def visible_devices(count: int | None) -> list[str]:
    """The device ids this worker may hand out: the GPUs torch sees (mapped through this process's own
    CUDA_VISIBLE_DEVICES, so children get physical ids), or, on a machine without GPUs, `count` slots that
    stand for GPUs (one training process each)."""
    try:
        import torch

        seen = torch.cuda.device_count()
    except ImportError:  # a worker without the training stack (validation only)
        seen = 0
    if seen:
        own = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        devices = own[:seen] if own else [str(i) for i in range(seen)]
        return devices[:count] if count else devices
    return [str(i) for i in range(count or 1)]


class GpuAllocator:
    """Hands out disjoint sets of a node's GPUs; no GPU is ever held by two attempts at once."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return len(self.devices)

    def free(self) -> tuple[int, ...]:
        """The free GPUs, by index into `devices`."""
        with self._lock:
            return tuple(i for i in range(len(self.devices)) if i not in self._busy)

    def take(self, indices: Sequence[int]) -> list[str]:
        """Marks these GPUs busy and returns their device ids; refuses any already held."""
        with self._lock:
            clash = self._busy.intersection(indices)
            if clash or any(not 0 <= i < len(self.devices) for i in indices):
                raise RuntimeError(f"GPUs {sorted(clash) or list(indices)} are not free to take")
            self._busy.update(indices)
        return [self.devices[i] for i in indices]

    def give_back(self, indices: Sequence[int]) -> None:
        with self._lock:
            self._busy.difference_update(indices)
