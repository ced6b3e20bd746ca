"""What the API knows of a base model without loading it: its config.json, read from where it is stored."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings
from shared.storage import ObjectStore, StorageError, parse_s3_uri

_CACHE_SECONDS = 300.0
_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
_lock = threading.Lock()


def model_config(*, settings: Settings, store: ObjectStore, name: str) -> dict[str, Any] | None:
    """Returns the registered model's config.json, or None when this process cannot read it."""
    entry = settings.model_registry().get(name)
    if entry is None:
        return None
    now = time.monotonic()
    with _lock:
        cached = _cache.get(entry.location)
        if cached is not None and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
    config = None
    try:
        if entry.location.startswith("file://"):
            path = Path(entry.location.removeprefix("file://")) / "config.json"
            config = json.loads(path.read_text()) if path.is_file() else None
        else:
            bucket, prefix = parse_s3_uri(entry.location)
            config = json.loads(store.read_bytes(f"{prefix.rstrip('/')}/config.json", bucket=bucket))
    except (OSError, ValueError, StorageError):
        config = None
    if config is not None:  # a miss is not remembered: the model may be uploaded a moment later
        with _lock:
            _cache[entry.location] = (now, config)
    return config
