"""Where datasets may come from: uploaded file ids, s3:// in allowed buckets, file:// under allowed roots,
Hugging Face Hub dataset ids (org/name[@revision]) on the Hub allowlist, and http(s):// URLs that pass the
outbound URL policy when TUNEFORGE_ALLOW_HTTP_DATASETS is on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from shared.errors import InvalidRequest
from shared.hub import check_hub_allowed, parse_hub_id
from shared.settings import Settings
from shared.urlpolicy import OutboundPolicy, URLRefused

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass(frozen=True)
class DatasetSource:
    """A dataset reference that passed the policy."""

    kind: Literal["upload", "s3", "local", "http", "hub"]
    uri: str
    file_id: str | None = None
    bucket: str | None = None
    key: str | None = None
    path: Path | None = None


# Prefixes of the deployment's own bucket that Tuneforge writes: a team's uploads and artifacts live under
# files/<team id>/ and artifacts/<team id>/, base models under models/.
TEAM_PREFIXES = ("files", "artifacts")


def check_own_objects(bucket: str, key: str, settings: Settings, *, team_id: str, param: str) -> None:
    """Refuses a key of the deployment's bucket that belongs to another team (or to the base models): an
    s3:// URI must not reach what the API would answer 404 for."""
    if bucket != settings.storage_bucket:
        return
    top, _, rest = key.partition("/")
    if top in TEAM_PREFIXES and not rest.startswith(f"{team_id}/"):
        raise InvalidRequest(
            f"s3://{bucket}/{key} belongs to another team; use your own uploads and jobs", param=param
        )
    if top == "models":
        raise InvalidRequest(
            f"s3://{bucket}/{key} is a base model, not something a job can read", param=param
        )


def resolve_dataset_uri(value: str, settings: Settings, *, param: str, team_id: str) -> DatasetSource:
    """Parses a dataset reference and applies the deployment's policy for `team_id` (InvalidRequest names
    `param`)."""
    value = value.strip()
    if FILE_ID.match(value):
        return DatasetSource(kind="upload", uri=value, file_id=value)
    scheme = urlsplit(value).scheme.lower()
    hub_ref = parse_hub_id(value) if not scheme else None
    if hub_ref is not None:
        check_hub_allowed(hub_ref, settings, param=param)
        return DatasetSource(kind="hub", uri=value)
    if not scheme:
        raise InvalidRequest(
            f"{value!r} is neither an uploaded file id (file-…), a Hugging Face Hub dataset id (org/name) nor a "
            "URI; use s3://bucket/key or file:///path",
            param=param,
        )
    if scheme == "s3":
        parts = urlsplit(value)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not key or key.endswith("/"):
            raise InvalidRequest(
                f"{value!r} names no object; give s3://bucket/path/to/data.jsonl", param=param
            )
        if any(segment in ("", ".", "..") for segment in key.split("/")):
            raise InvalidRequest(f"{value!r}: empty, '.' or '..' path segments are not allowed", param=param)
        if bucket not in settings.allowed_s3_buckets:
            allowed = ", ".join(settings.allowed_s3_buckets)
            raise InvalidRequest(
                f"bucket {bucket!r} is not allowed here; allowed buckets: {allowed}", param=param
            )
        check_own_objects(bucket, key, settings, team_id=team_id, param=param)
        return DatasetSource(kind="s3", uri=value, bucket=bucket, key=key)
    if scheme == "file":
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest(f"{value!r}: file:// URIs take no host", param=param)
        raw = unquote(parts.path)
        if ".." in Path(raw).parts:
            raise InvalidRequest(f"{value!r}: '..' is not allowed in paths", param=param)
        path = Path(raw).resolve()
        roots = [root.resolve() for root in settings.allowed_file_roots]
        if not roots:
            raise InvalidRequest(
                "file:// datasets are disabled on this deployment (TUNEFORGE_ALLOWED_FILE_ROOTS is empty); "
                "upload the file with POST /v1/files instead",
                param=param,
            )
        if not any(path.is_relative_to(root) for root in roots):
            raise InvalidRequest(f"{path} is outside the allowed dataset folders", param=param)
        return DatasetSource(kind="local", uri=value, path=path)
    if scheme in ("http", "https"):
        if not settings.allow_http_datasets:
            raise InvalidRequest(
                "http(s) datasets are disabled on this deployment (TUNEFORGE_ALLOW_HTTP_DATASETS is off); "
                "upload the file or use s3://",
                param=param,
            )
        try:
            OutboundPolicy.from_settings(settings).check(value)
        except URLRefused as exc:
            raise InvalidRequest(f"{value!r} is refused: {exc.message}", param=param) from None
        return DatasetSource(kind="http", uri=value)
    raise InvalidRequest(
        f"unsupported URI scheme {scheme!r}; use an uploaded file id, s3://bucket/key or file:///path",
        param=param,
    )
