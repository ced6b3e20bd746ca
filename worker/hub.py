"""Base models from the Hugging Face Hub (or a mirror of it): a revision is resolved to its commit through
huggingface_hub's cache (the workers' TUNEFORGE_HUB_CACHE_DIR, in the hub's own layout; with HF_HUB_OFFLINE=1
only that cache is read), and the snapshot is stored once in object storage, where every worker fetches it
like a registered model."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.errors import InvalidRequest, JobErrorCode, JobFailure
from shared.hub import HUB_PREFIX, HubRef, check_hub_allowed
from shared.settings import Settings
from shared.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

# What training reads of a model repository: its config, weights and tokenizer (no other formats' weights).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
STORED = ".tuneforge-stored"


def pin_hub_model(
    settings: Settings, store: ObjectStore, ref: HubRef, *, param: str = "base_model"
) -> HubRef:
    """Resolves a Hub model's revision to its commit and stores that snapshot in object storage (once); returns
    the pinned reference. Raises JobFailure naming `param` when the repository, revision or files cannot be
    had, or the allowlist no longer names it."""
    try:
        check_hub_allowed(ref, settings, param=param)
    except InvalidRequest as exc:  # the allowlist changed since submission
        raise JobFailure(JobErrorCode.invalid_model, f"{param}: {exc.message}") from exc
    folder = _snapshot(settings, ref, repo_type="model", patterns=MODEL_FILES, param=param)
    if not (folder / "config.json").is_file():
        raise JobFailure(
            JobErrorCode.invalid_model, f"{param}: {ref} has no config.json: not a transformers model"
        )
    pinned = HubRef(ref.repo, folder.name)  # the snapshot folder is named after its commit
    prefix = f"{HUB_PREFIX}/{pinned.repo}/{pinned.revision}"
    try:
        if store.head(f"{prefix}/{STORED}") is None:
            log.info("storing %s under %s", pinned, prefix)
            store.put_tree(prefix, folder)  # the cache's symlinks are read through to their blobs
            store.put_bytes(f"{prefix}/{STORED}", str(pinned).encode())
    except StorageError as exc:
        raise JobFailure(JobErrorCode.storage_error, f"{param}: could not store {pinned}: {exc}") from exc
    return pinned


def _snapshot(settings: Settings, ref: HubRef, *, repo_type: str, patterns: list[str], param: str) -> Path:
    """The local snapshot folder of a Hub repository at a revision (named after its commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    token = settings.hub_token.get_secret_value() if settings.hub_token else None
    try:
        return Path(
            snapshot_download(
                ref.repo,
                repo_type=repo_type,
                revision=ref.revision,
                cache_dir=settings.hub_cache_dir,
                token=token,
                endpoint=settings.hub_endpoint,
                allow_patterns=patterns,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        code = JobErrorCode.invalid_model if repo_type == "model" else JobErrorCode.dataset_not_found
        raise JobFailure(
            code, f"{param}: {ref} could not be had from the Hub ({type(exc).__name__}: {exc})"
        ) from exc


# What a dataset repository's data may be: files of the kinds Tuneforge reads, or a saved dataset.
DATASET_FILES = ["*.parquet", "*.jsonl", "*.csv", "*.arrow", "*.json", "*.md"]


def hub_dataset(settings: Settings, ref: HubRef, *, param: str) -> tuple[HubRef, Path]:
    """A Hub dataset repository's snapshot at a revision (pinned to its commit) and its local folder."""
    try:
        check_hub_allowed(ref, settings, param=param)
    except InvalidRequest as exc:  # the allowlist changed since submission
        raise JobFailure(JobErrorCode.dataset_not_found, f"{param}: {exc.message}") from exc
    folder = _snapshot(settings, ref, repo_type="dataset", patterns=DATASET_FILES, param=param)
    return HubRef(ref.repo, folder.name), folder
