"""Object storage against a real S3 server (SeaweedFS) and the local-folder backend."""

import hashlib
import os

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.settings import Settings
from shared.states import JobStatus
from shared.storage import IntegrityError, LocalObjectStore, ObjectNotFound, StorageError, make_store
from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_messages, to_jsonl, upload_dataset

# boto3's upload_file sends a file in parts of 8 MiB once it reaches 8 MiB (its TransferConfig defaults).
PART = 8 * 2**20


@pytest.fixture(params=["s3", "local"])
def any_store(request, settings, tmp_path):
    if request.param == "s3":
        return make_store(settings)
    store = LocalObjectStore(tmp_path / "storage", BUCKET)
    store.ensure_bucket()
    return store


def test_put_records_sha256_and_get_verifies_it(any_store, tmp_path):
    data = b"hello tuneforge\n" * 1000
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    stored = any_store.put_file("tests/roundtrip/in.bin", source)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)
    assert any_store.head("tests/roundtrip/in.bin").sha256 == stored.sha256
    fetched = any_store.get_file("tests/roundtrip/in.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert fetched.sha256 == stored.sha256
    with pytest.raises(IntegrityError):
        any_store.get_file("tests/roundtrip/in.bin", tmp_path / "bad.bin", expected_sha256="0" * 64)
    assert not (tmp_path / "bad.bin").exists()


def test_trees_and_missing_objects(any_store, tmp_path):
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    any_store.put_tree("tests/tree", folder)
    assert any_store.list_keys("tests/tree/") == ["tests/tree/a.txt", "tests/tree/sub/b.txt"]
    any_store.get_tree("tests/tree", tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(ObjectNotFound):
        any_store.get_file("tests/nothing-here", tmp_path / "x")
    assert any_store.head("tests/nothing-here") is None


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_keys_that_could_escape_are_refused(any_store, key):
    with pytest.raises(StorageError):
        any_store.put_bytes(key, b"x")


def test_tampered_object_is_detected_on_download(settings, s3_server, tmp_path):
    store = make_store(settings)
    stored = store.put_bytes("tests/tamper.bin", b"original bytes")
    # Someone rewrites the object behind our back, keeping the old checksum in its metadata.
    store.client.put_object(
        Bucket=BUCKET, Key="tests/tamper.bin", Body=b"evil bytes", Metadata={"sha256": stored.sha256}
    )
    with pytest.raises(IntegrityError, match="does not match"):
        store.get_file("tests/tamper.bin", tmp_path / "t.bin")


def test_server_checks_signatures(s3_server):
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint"],
        aws_access_key_id=s3_server["access_key"],
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as info:
        client.list_objects_v2(Bucket=BUCKET)
    assert info.value.response["Error"]["Code"] in {
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidAccessKeyId",
    }


def test_presigned_url_downloads_and_expires_quickly(settings):
    store = make_store(settings)
    store.put_bytes("tests/presigned.txt", b"presigned body")
    url = store.presigned_url("tests/presigned.txt", settings.presigned_url_ttl_seconds)
    assert "X-Amz-Expires=600" in url
    assert httpx.get(url).content == b"presigned body"
    tampered = url.replace("presigned.txt", "other.txt")
    assert httpx.get(tampered).status_code == 403


def test_presigned_ttl_is_capped():
    with pytest.raises(ValueError):
        Settings(presigned_url_ttl_seconds=3600)


def test_a_file_past_the_multipart_threshold_is_stored_in_parts_and_served_verified(
    settings, store, api_client, tmp_path
):
    data = os.urandom(2 * PART + 12345)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(4))).id
        job = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=DEFAULT_TEAM_ID,
            spec=JobSpec(base_model=TINY_MODEL, dataset=dataset),
        )
        key = f"artifacts/{DEFAULT_TEAM_ID}/{job.id}/attempt-1/adapter/{path.name}"
        stored = store.put_file(key, path)
        session.query(Job).filter_by(id=job.id).update({"status": JobStatus.succeeded.value, "attempt": 1})
        artifact_service.record_artifacts(
            session=session, job=job, kind="adapter", stored=[(path.name, stored)]
        )
        job_id = job.id
    sha256 = hashlib.sha256(data).hexdigest()
    assert (stored.size, stored.sha256) == (len(data), sha256)

    # The server holds a multipart object: its ETag is the MD5 of the parts' MD5s, then "-" and their count.
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    assert len(parts) == 3
    etag = hashlib.md5(b"".join(hashlib.md5(part).digest() for part in parts)).hexdigest() + "-3"
    assert store.client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"') == etag
    assert store.head(key) == stored  # the sha256 metadata came through the multipart upload

    fetched = store.get_file(key, tmp_path / "back.bin", expected_sha256=sha256)
    assert fetched.sha256 == sha256 and (tmp_path / "back.bin").read_bytes() == data

    # Streamed through the API, checked as it passes (by default S3 storage answers with a redirect).
    with api_client.stream(
        "GET", f"/v1/jobs/{job_id}/artifacts/adapter/{path.name}", params={"redirect": "false"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["X-Checksum-Sha256"] == sha256
        assert int(response.headers["Content-Length"]) == len(data)
        digest, size = hashlib.sha256(), 0
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    assert (size, digest.hexdigest()) == (len(data), sha256)
