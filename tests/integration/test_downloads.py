"""Downloads of a job's artifacts: where storage is S3, a redirect to a presigned URL by default (a file, and
the adapter's archive stored with it), the checked stream through the API with ?redirect=false; the local
backend always streams. Real PostgreSQL, SeaweedFS S3 and a real API server (uvicorn)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from shared.db import session_scope
from shared.models import Artifact, utcnow
from shared.services import artifacts as artifact_service
from shared.storage import LocalObjectStore, ObjectStore
from tests.conftest import ServiceProcesses
from tests.helpers import succeeded_job
from tuneforge_sdk import Tuneforge
from worker.results import _store_archive

FILES = {
    "adapter_model.safetensors": os.urandom(3 * 2**20 + 17),
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
    "README.md": b"# an adapter\n",
}


def adapter_job(settings, store: ObjectStore, team_id: str, folder: Path, *, archive: bool = True) -> str:
    """A succeeded job of `team_id` whose adapter holds FILES, stored (with its archive, as the worker stores
    it) and recorded."""
    names = sorted(FILES)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(FILES[name])
    with session_scope(settings.database_url) as session:
        job = succeeded_job(session, settings, store, team_id)
        prefix = f"artifacts/{team_id}/{job.id}/attempt-1"
        stored = store.put_tree(f"{prefix}/adapter", folder)
        artifact_service.record_artifacts(
            session=session, job=job, kind="adapter", stored=zip(names, stored, strict=True)
        )
        if archive:
            made = _store_archive(store, prefix, job.id, "adapter", folder, names, stored)
            assert made is not None
            artifact_service.record_artifacts(
                session=session, job=job, kind=artifact_service.ARCHIVE_KIND, stored=[made]
            )
        return job.id


def unpacked(data: bytes, into: Path, root: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return {p.name: p.read_bytes() for p in (into / root).iterdir()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def api_only(settings, tiny_model_dir, tmp_path_factory):
    procs = ServiceProcesses(settings, tmp_path_factory.mktemp("downloads-api"))
    procs.start_api()
    try:
        yield procs
    finally:
        procs.stop()


def test_on_s3_a_file_redirects_by_default_and_streams_when_asked(
    settings, store, make_team, api_only, tmp_path
):
    team_id, key = make_team()
    job_id = adapter_job(settings, store, team_id, tmp_path / "adapter", archive=False)
    http = httpx.Client(base_url=api_only.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    url = f"/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors"
    expected = sha(FILES["adapter_model.safetensors"])

    redirect = http.get(url)
    assert redirect.status_code == 307 and redirect.headers["x-checksum-sha256"] == expected
    # The presigned URL needs no API key (and httpx drops it on the way to another origin).
    assert sha(httpx.get(redirect.headers["location"]).content) == expected
    assert sha(http.get(url, follow_redirects=True).content) == expected

    streamed = http.get(url, params={"redirect": "false"})
    assert streamed.status_code == 200 and streamed.headers["x-checksum-sha256"] == expected
    assert sha(streamed.content) == expected

    # No archive was stored with this adapter: its tar is streamed, whatever the client asked for.
    tar = http.get(f"/v1/jobs/{job_id}/artifacts/adapter.tar")
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    files = unpacked(tar.content, tmp_path / "out", f"{job_id}-adapter")
    assert files.pop("SHA256SUMS") and files == FILES


def test_the_adapter_archive_stored_with_it_is_a_redirect(settings, store, make_team, api_only, tmp_path):
    team_id, key = make_team()
    job_id = adapter_job(settings, store, team_id, tmp_path / "adapter")
    http = httpx.Client(base_url=api_only.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    root = f"{job_id}-adapter"

    listing = http.get(f"/v1/jobs/{job_id}/artifacts").json()
    # The archive is a way to download the adapter, not one of the job's files.
    assert {a["kind"] for a in listing["data"]} == {"adapter"} and set(listing["archive_urls"]) == {"adapter"}

    redirect = http.get(listing["archive_url"])
    assert redirect.status_code == 307
    data = httpx.get(redirect.headers["location"]).content
    assert sha(data) == redirect.headers["x-checksum-sha256"]
    files = unpacked(data, tmp_path / "redirected", root)
    sums = files.pop("SHA256SUMS").decode()
    assert files == FILES
    assert all(f"{sha(content)}  {name}" in sums for name, content in FILES.items())

    # The same folder, streamed by the API and checked as it passes.
    streamed = http.get(listing["archive_url"], params={"redirect": "false"})
    assert streamed.status_code == 200
    files = unpacked(streamed.content, tmp_path / "streamed", root)
    assert files.pop("SHA256SUMS") and files == FILES

    # A file of the adapter found damaged refuses the archive too, however it would be served.
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Artifact)
            .where(Artifact.job_id == job_id, Artifact.name == "README.md")
            .values(damaged_at=utcnow())
        )
        key_of = session.query(Artifact).filter_by(job_id=job_id, name="README.md").one().storage_key
    store.put_bytes(key_of, b"# not the adapter's readme\n")
    for params in ({}, {"redirect": "false"}):
        refused = http.get(listing["archive_url"], params=params)
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "artifact_corrupted"


def test_the_sdk_reads_the_files_through_the_api_when_the_stored_archive_is_damaged(
    settings, store, make_team, api_only, tmp_path
):
    team_id, key = make_team()
    job_id = adapter_job(settings, store, team_id, tmp_path / "adapter")
    with session_scope(settings.database_url) as session:
        archive = artifact_service.find_archive(session=session, job_id=job_id, kind="adapter")
        assert archive is not None
        archive_key = archive.storage_key
    data = bytearray(b"".join(store.iter_chunks(archive_key)))
    data[len(data) // 2] ^= 0xFF  # inside the weights file's bytes
    store.put_bytes(archive_key, bytes(data))

    client = Tuneforge(api_only.base_url, key, retries=1, backoff=0)
    folder = client.download_adapter(job_id, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "SHA256SUMS"} == FILES


def test_the_local_backend_streams_every_download(settings, make_team, tmp_path):
    local = settings.model_copy(update={"storage_backend": "local", "storage_root": tmp_path / "storage"})
    store = LocalObjectStore(tmp_path / "storage", local.storage_bucket)
    team_id, key = make_team()
    job_id = adapter_job(local, store, team_id, tmp_path / "adapter")
    with TestClient(create_app(local), headers={"Authorization": f"Bearer {key}"}) as http:
        single = http.get(f"/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors")
        assert single.status_code == 200 and single.content == FILES["adapter_model.safetensors"]
        tar = http.get(f"/v1/jobs/{job_id}/artifacts/adapter.tar", params={"redirect": "true"})
        assert tar.status_code == 200
        files = unpacked(tar.content, tmp_path / "out", f"{job_id}-adapter")
        assert files.pop("SHA256SUMS") and files == FILES
