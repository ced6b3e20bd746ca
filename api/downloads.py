"""Answers that stream stored bytes, one object or several as a tar archive, never handing out bytes that do
not match the sha256 recorded when they were stored.

- Bytes already found damaged are refused before anything is read: 500 `artifact_corrupted`.
- An object up to VERIFY_FIRST_BYTES is read and checked whole before the first byte is sent, so a damaged
  one is a clean 500 `artifact_corrupted` answer.
- A larger object is checked as it streams, its last chunk held back until the whole digest is known: on a
  mismatch the stream ends short of its Content-Length, so every HTTP client reports an incomplete body
  (curl exits 18, httpx raises) instead of saving the bytes. The object is marked damaged at once, so the
  next request for it (the SDK's retry) gets the plain `artifact_corrupted` answer.
- Tar archives check each member as it passes and end the archive early on a mismatch, the same way.

Where storage is S3, downloads default to a redirect to a presigned URL instead (`presigned_redirect`): the
bytes then go from storage to the client without passing through this process, which on a busy API host is
several times faster than any stream through Python; `?redirect=false` keeps the checked stream.

Streams read storage in STREAM_CHUNK pieces on one thread of their own (`pumped`), a few chunks ahead of the
socket, so reading and hashing overlap with sending and the event loop never waits on storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime

from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from shared.archive import ArchiveMember, stream_tar, tar_size
from shared.errors import StoredDataDamaged
from shared.models import Artifact, UploadedFile
from shared.services import artifacts as artifact_service
from shared.services import files as file_service
from shared.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)
VERIFY_FIRST_BYTES = 16 * 2**20
# 1 MiB pieces, 4 ahead: the first bytes leave after one piece is read and checked (8 MiB pieces held the
# start of a 77 MB download back by 16 MiB: bench/api.py download_ratio 0.43 -> 0.57).
STREAM_CHUNK = 2**20
AHEAD = 4  # chunks read ahead of the socket, per stream

# Records that a stored object was found damaged (opens its own transaction: the request's may be closed).
DamageRecorder = Callable[[str], None]


def _recorder(factory: Callable[[], Session], mark: Callable[..., None], row_id: object) -> DamageRecorder:
    def record(actual: str) -> None:
        try:
            with factory() as session:
                mark(session=session, row_id=row_id)
                session.commit()
        except Exception:  # the answer is refused anyway; the next read finds the damage again
            log.exception("could not mark %s as damaged", row_id)

    return record


def _mark(factory: Callable[[], Session], mark: Callable[..., None], row_id: object) -> Callable[[], None]:
    def record() -> None:
        with factory() as session:
            mark(session=session, row_id=row_id)
            session.commit()

    return record


def _still_damaged(store: ObjectStore, key: str, size: int, sha256: str) -> bool:
    """Reads an object marked damaged once more: an operator may have restored it from a backup since."""
    digest, count = hashlib.sha256(), 0
    try:
        for chunk in store.iter_chunks(key, chunk_size=STREAM_CHUNK):
            digest.update(chunk)
            count += len(chunk)
    except ObjectNotFound:
        return True
    return count != size or digest.hexdigest() != sha256


def primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Starts a storage stream before the response does, so a missing object is a 404, not a cut download."""
    first = next(chunks, b"")
    return itertools.chain([first], chunks)


async def pumped(chunks: Iterator[bytes], ahead: int = AHEAD) -> AsyncIterator[bytes]:
    """Iterates a blocking iterator on a thread of its own, at most `ahead` chunks ahead of the consumer: one
    thread for the whole stream instead of a threadpool hop per chunk. Its errors are raised here; when the
    consumer stops early (the client went away) the thread stops too and closes the iterator."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bytes | None, BaseException | None]] = asyncio.Queue()
    room = threading.Semaphore(ahead)
    stopped = threading.Event()

    def hand_over(item: tuple[bytes | None, BaseException | None]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (the server is shutting down)
            stopped.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not room.acquire(timeout=1.0):
                    if stopped.is_set():
                        return
                if stopped.is_set():
                    return
                hand_over((chunk, None))
            hand_over((None, None))
        except BaseException as exc:
            hand_over((None, exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, name="tuneforge-download", daemon=True).start()
    try:
        while True:
            chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            room.release()
            yield chunk
    finally:
        stopped.set()
        room.release()


def damaged(what: str, expected: str, actual: str | None = None) -> StoredDataDamaged:
    found = f" (sha256 {actual} now)" if actual else ""
    return StoredDataDamaged(
        f"{what}: the stored bytes no longer match the sha256 {expected} recorded when they were stored{found}; "
        "the copy in object storage is damaged and will not be served. Restore the object from a backup, or run "
        "the job again",
        param="name",
    )


def _verified(
    chunks: Iterator[bytes], *, what: str, size: int, sha256: str, on_damage: DamageRecorder
) -> Iterator[bytes]:
    digest = hashlib.sha256()
    count = 0
    held: bytes | None = None
    for chunk in chunks:
        if held is not None:
            yield held
        digest.update(chunk)
        count += len(chunk)
        held = chunk
    actual = digest.hexdigest()
    if count != size or actual != sha256:
        on_damage(actual)
        log.error(
            "%s: stored bytes (%d, sha256 %s) do not match the record (%d, %s)",
            what,
            count,
            actual,
            size,
            sha256,
        )
        raise damaged(what, sha256, actual)
    if held is not None:
        yield held


def stream_object(
    store: ObjectStore,
    key: str,
    *,
    what: str,
    size: int,
    sha256: str,
    damaged_at: datetime | None,
    on_damage: DamageRecorder,
    on_repair: Callable[[], None],
    media_type: str,
    headers: dict[str, str],
) -> Response:
    """One stored object with its length, checked against its recorded size and sha256 (see above). An object
    marked damaged is read once more first: restored from a backup, it is served again (and unmarked)."""
    if damaged_at is not None:
        if _still_damaged(store, key, size, sha256):
            raise damaged(what, sha256)
        on_repair()
    chunks = _verified(
        store.iter_chunks(key, chunk_size=STREAM_CHUNK),
        what=what,
        size=size,
        sha256=sha256,
        on_damage=on_damage,
    )
    headers = {"Content-Length": str(size), **headers}
    if size <= VERIFY_FIRST_BYTES:
        return Response(b"".join(chunks), media_type=media_type, headers=headers)
    return StreamingResponse(pumped(primed(chunks)), media_type=media_type, headers=headers)


def artifact_response(
    factory: Callable[[], Session], store: ObjectStore, artifact: Artifact, headers: dict[str, str]
) -> Response:
    """One artifact file, checked (see above)."""
    return stream_object(
        store,
        artifact.storage_key,
        what=f"{artifact.kind} file {artifact.name} of job {artifact.job_id}",
        size=artifact.size_bytes,
        sha256=artifact.sha256,
        damaged_at=artifact.damaged_at,
        on_damage=_recorder(factory, artifact_service.mark_damaged, artifact.id),
        on_repair=_mark(factory, artifact_service.clear_damaged, artifact.id),
        media_type="application/octet-stream",
        headers={"ETag": f'"{artifact.sha256}"', "X-Checksum-Sha256": artifact.sha256, **headers},
    )


def file_response(factory: Callable[[], Session], store: ObjectStore, record: UploadedFile) -> Response:
    """An uploaded file's bytes, checked (see above)."""
    return stream_object(
        store,
        record.storage_key,
        what=f"file {record.id}",
        size=record.size_bytes,
        sha256=record.sha256,
        damaged_at=record.damaged_at,
        on_damage=_recorder(factory, file_service.mark_damaged, record.id),
        on_repair=_mark(factory, file_service.clear_damaged, record.id),
        media_type="application/jsonl",
        headers={"X-Checksum-Sha256": record.sha256},
    )


def refuse_damaged(factory: Callable[[], Session], store: ObjectStore, artifact: Artifact) -> None:
    """Raises artifact_corrupted for an artifact found damaged that still is (read once more: it may have been
    restored from a backup, and is then unmarked); before a presigned URL or an archive is handed out."""
    if artifact.damaged_at is None:
        return
    if _still_damaged(store, artifact.storage_key, artifact.size_bytes, artifact.sha256):
        raise damaged(f"{artifact.kind} file {artifact.name} of job {artifact.job_id}", artifact.sha256)
    _mark(factory, artifact_service.clear_damaged, artifact.id)()


def presigned_redirect(
    factory: Callable[[], Session],
    store: ObjectStore,
    artifact: Artifact,
    ttl_seconds: int,
    members: Sequence[Artifact] = (),
) -> Response | None:
    """A 307 to a short-lived presigned URL of `artifact` in storage, or None where the storage has none (the
    local backend). Refused like a streamed answer when `artifact` (or, for a stored archive, one of its
    `members`) was found damaged. The client then reads from storage directly, and checks what it got against
    X-Checksum-Sha256 (the SDK checks every file of an archive against the sha256 the API lists)."""
    url = store.presigned_url(artifact.storage_key, ttl_seconds)
    if url is None:
        return None
    for item in (*members, artifact):
        refuse_damaged(factory, store, item)
    return RedirectResponse(
        url,
        status_code=307,
        headers={"X-Checksum-Sha256": artifact.sha256, "Cache-Control": "no-store"},
    )


def stream_archive(
    factory: Callable[[], Session],
    store: ObjectStore,
    root: str,
    artifacts: Sequence[Artifact],
    *,
    strip: str = "",
) -> StreamingResponse:
    """Artifacts as one tar archive under `root/` with a SHA256SUMS file (names without `strip`)."""
    for artifact in artifacts:
        refuse_damaged(factory, store, artifact)
    members = [
        ArchiveMember(
            name=a.name.removeprefix(strip),
            size=a.size_bytes,
            sha256=a.sha256,
            chunks=lambda key=a.storage_key: store.iter_chunks(key, chunk_size=STREAM_CHUNK),
            on_damage=_recorder(factory, artifact_service.mark_damaged, a.id),
        )
        for a in artifacts
    ]
    mtime = time.time()
    # With its length known, the archive is sent as is (no chunked framing), and a damaged member that ends
    # it early leaves it short of Content-Length: every client reports it incomplete.
    return StreamingResponse(
        pumped(stream_tar(root, members, mtime)),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="{root}.tar"',
            "Content-Length": str(tar_size(root, members, mtime)),
        },
    )
