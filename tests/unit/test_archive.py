import hashlib
import io
import tarfile

import pytest

from shared.archive import ArchiveMember, stream_tar, tar_size
from shared.storage import IntegrityError


def member(name: str, data: bytes, sha: str | None = None) -> ArchiveMember:
    return ArchiveMember(
        name=name,
        size=len(data),
        sha256=sha or hashlib.sha256(data).hexdigest(),
        chunks=lambda: iter([data[:700], data[700:]]),
    )


def test_streamed_archive_is_a_valid_tar_with_checksums():
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": bytes(range(256)) * 9,
        "a/b.txt": b"",
    }
    members = [member(n, d) for n, d in files.items()]
    archive = b"".join(stream_tar("job-adapter", members, 1.0e9))
    # Sent with this Content-Length: a stream that ends early is seen as incomplete by every client.
    assert tar_size("job-adapter", members, 1.0e9) == len(archive)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for name, data in files.items():
            assert tar.extractfile(f"job-adapter/{name}").read() == data
        sums = tar.extractfile("job-adapter/SHA256SUMS").read().decode()
    for name, data in files.items():
        assert f"{hashlib.sha256(data).hexdigest()}  {name}" in sums


def test_a_corrupt_member_aborts_the_stream():
    stream = stream_tar("x", [member("bad.bin", b"payload", sha="0" * 64)])
    with pytest.raises(IntegrityError, match=r"bad\.bin"):
        b"".join(stream)


def test_the_announced_length_counts_long_names_too():
    members = [member("a" * 300 + "/weights.bin", b"w" * 5000), member("b.json", b"{}")]
    assert tar_size("r" * 120, members, 12345.0) == len(b"".join(stream_tar("r" * 120, members, 12345.0)))
