"""Where datasets may come from: uploaded file ids, s3:// in allowed buckets, file:// under allowed roots, and
http(s):// URLs that pass the outbound URL policy when TUNEFORGE_ALLOW_HTTP_DATASETS is on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from shared.errors import InvalidRequest
from shared.settings import Settings
from shared.urlpolicy import OutboundPolicy, URLRefused

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass(frozen=True)
class DatasetSource:
    """A dataset reference that passed the policy."""

    kind: Literal["upload", "s3", "local", "http"]
    uri: str
    file_id: str | None = None
    bucket: str | None = None
    key: str | None = None
    path: Path | None = None


def resolve_dataset_uri(value: str, settings: Settings, *, param: str) -> DatasetSource:
    """Parses a dataset reference and applies the deployment's policy (InvalidRequest names `param`)."""
    value = value.strip()
    if FILE_ID.match(value):
        return DatasetSource(kind="upload", uri=value, file_id=value)
    scheme = urlsplit(value).scheme.lower()
    if not scheme:
        raise InvalidRequest(
            f"{value!r} is neither an uploaded file id (file-…) nor a URI; use s3://bucket/key or file:///path",
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
