"""Answers that stream stored bytes: one object, or several as a tar archive."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from fastapi.responses import StreamingResponse

from api.archive import ArchiveMember, stream_tar
from shared.models import Artifact
from shared.storage import ObjectStore


def primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Starts a storage stream before the response does, so a missing object is a 404, not a cut download."""
    first = next(chunks, b"")
    return itertools.chain([first], chunks)


def stream_object(
    store: ObjectStore, key: str, *, size: int, media_type: str, headers: dict[str, str]
) -> StreamingResponse:
    """One stored object, streamed with its length."""
    return StreamingResponse(
        primed(store.iter_chunks(key)),
        media_type=media_type,
        headers={"Content-Length": str(size), **headers},
    )


def stream_archive(
    root: str, artifacts: Sequence[Artifact], store: ObjectStore, strip: str = ""
) -> StreamingResponse:
    """Artifacts as one tar archive under `root/` with a SHA256SUMS file (names without `strip`)."""
    members = [
        ArchiveMember(
            name=a.name.removeprefix(strip),
            size=a.size_bytes,
            sha256=a.sha256,
            chunks=lambda key=a.storage_key: store.iter_chunks(key),
        )
        for a in artifacts
    ]
    return StreamingResponse(
        stream_tar(root, members),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{root}.tar"'},
    )
