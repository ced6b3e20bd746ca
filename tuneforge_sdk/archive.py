"""Downloaded archives: reading a streamed tar chunk by chunk, and checking an unpacked folder against the
sizes and sha256 that the API recorded and the archive's SHA256SUMS."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneforge_sdk.errors import ChecksumMismatch

__all__ = ["SUMS_FILE", "ChunkReader", "sha256_file", "verify_folder"]

SUMS_FILE = "SHA256SUMS"


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (tarfile reads a streamed archive through it)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""
        self.received = 0

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Reads the rest of the chunks (and so raises if the stream was cut)."""
        for chunk in self._chunks:
            self.received += len(chunk)

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
            self.received += len(self._pending)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def verify_folder(folder: Path, recorded: dict[str, dict[str, Any]]) -> None:
    """Checks that `folder` holds exactly the recorded files (name -> {size_bytes, sha256}) plus a
    SHA256SUMS file that lists the same hashes; raises ChecksumMismatch otherwise."""
    root = folder.resolve()
    for name, artifact in recorded.items():
        path = (folder / name).resolve()
        if not path.is_relative_to(root) or name == SUMS_FILE:
            raise ChecksumMismatch(
                f"the API lists an artifact with an unsafe name {name!r}", code="bad_archive"
            )
        if not path.is_file():
            raise ChecksumMismatch(f"{name}: missing from the downloaded archive")
        size = path.stat().st_size
        if artifact.get("size_bytes") is not None and size != artifact["size_bytes"]:
            raise ChecksumMismatch(
                f"{name}: {size} bytes downloaded, the API recorded {artifact['size_bytes']}"
            )
        actual = sha256_file(path)
        if actual != artifact["sha256"]:
            raise ChecksumMismatch(
                f"{name}: sha256 {actual} does not match the recorded {artifact['sha256']}"
            )
    sums_path = folder / SUMS_FILE
    if not sums_path.is_file():
        raise ChecksumMismatch(f"the archive has no {SUMS_FILE} file")
    listed: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            sha, _, name = line.partition("  ")
            listed[name] = sha
    expected = {name: artifact["sha256"] for name, artifact in recorded.items()}
    if listed != expected:
        differ = sorted(set(listed.items()) ^ set(expected.items()))
        raise ChecksumMismatch(
            f"{SUMS_FILE} does not match the API's artifact list (differs on {differ[:3]})"
        )
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    extra = sorted(present - set(recorded) - {SUMS_FILE})
    if extra:
        raise ChecksumMismatch(f"the archive holds files the API does not list: {', '.join(extra[:5])}")
