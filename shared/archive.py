"""Streams stored files as one tar archive, without holding any file in memory or on disk; or writes that archive
once, to object storage, when an artifact is stored (see shared/services/artifacts.py ARCHIVED_KINDS)."""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.storage import IntegrityError, ObjectStore, StoredObject

BLOCK = 512


@dataclass(frozen=True)
class ArchiveMember:
    name: str
    size: int
    sha256: str
    chunks: Callable[[], Iterator[bytes]]
    # Told the sha256 actually read when the bytes do not match the record.
    on_damage: Callable[[str], None] = lambda actual: None


def _header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(mtime)
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _sums(members: list[ArchiveMember]) -> bytes:
    return "".join(f"{m.sha256}  {m.name}\n" for m in members).encode()


def tar_size(root: str, members: list[ArchiveMember], mtime: float) -> int:
    """The length of the archive `stream_tar(root, members, mtime)` yields."""
    size = 2 * BLOCK
    for name, length in [*((m.name, m.size) for m in members), ("SHA256SUMS", len(_sums(members)))]:
        size += len(_header(f"{root}/{name}", length, mtime)) + length + len(_padding(length))
    return size


def stream_tar(root: str, members: list[ArchiveMember], mtime: float | None = None) -> Iterator[bytes]:
    """Yields a tar archive of `members` under `root/`, plus a SHA256SUMS file; each member's bytes are
    checked against its recorded sha256 as they pass (a mismatch aborts the stream)."""
    now = time.time() if mtime is None else mtime
    for member in members:
        yield _header(f"{root}/{member.name}", member.size, now)
        digest = hashlib.sha256()
        sent = 0
        for chunk in member.chunks():
            digest.update(chunk)
            sent += len(chunk)
            yield chunk
        if sent != member.size or digest.hexdigest() != member.sha256:
            member.on_damage(digest.hexdigest())
            raise IntegrityError(f"{member.name}: stored bytes do not match the recorded size and sha256")
        yield _padding(member.size)
    sums = _sums(members)
    yield _header(f"{root}/SHA256SUMS", len(sums), now)
    yield sums + _padding(len(sums))
    yield b"\0" * (2 * BLOCK)


def store_archive(
    store: ObjectStore, key: str, root: str, members: list[ArchiveMember], mtime: float | None = None
) -> StoredObject:
    """Writes `stream_tar(root, members)` to a temporary file and stores it at `key` (each member checked
    against its sha256 on the way, as when streamed); returns the stored object, with the archive's size and
    sha256. The archive is the one the API streams, so a client gets the same folder either way."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-archive-") as folder:
        path = Path(folder) / "archive.tar"
        with path.open("wb") as out:
            for chunk in stream_tar(root, members, mtime):
                out.write(chunk)
        return store.put_file(key, path)


def local_members(folder: Path, stored: list[tuple[str, StoredObject]]) -> list[ArchiveMember]:
    """Archive members read from the local files just stored (name relative to `folder`, stored object)."""
    return [
        ArchiveMember(
            name=name,
            size=obj.size,
            sha256=obj.sha256,
            chunks=lambda path=folder / name: _read_chunks(path),
        )
        for name, obj in stored
    ]


def _read_chunks(path: Path, size: int = 2**20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk
