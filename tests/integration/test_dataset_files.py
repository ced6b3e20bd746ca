"""Parquet, CSV and saved Hugging Face datasets, as uploads (checked by the API), s3:// objects and file://
paths (checked by the worker's validation), on real PostgreSQL and S3."""

import io

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job, JobEvent
from shared.schemas import JobSpec
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_messages, color_prompt_completion
from worker import validation

TEAM = TeamID(DEFAULT_TEAM_ID)


def parquet_bytes(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def csv_bytes(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pa.csv.write_csv(pa.Table.from_pylist(rows), out)
    return out.getvalue()


PAIRS = color_prompt_completion(6)
BROKEN = [*PAIRS[:2], {"prompt": "What color is snow? ", "completion": ""}, *PAIRS[3:]]
WRITERS = {"parquet": parquet_bytes, "csv": csv_bytes}


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_uploads_of_each_kind_are_checked_row_by_row(api_client, kind):
    body = WRITERS[kind](PAIRS)
    response = api_client.post("/v1/files", files={"file": (f"colors.{kind}", body)})
    assert response.status_code == 201, response.text
    assert (response.json()["format"], response.json()["num_samples"]) == ("prompt_completion", 6)
    assert api_client.get(f"/v1/files/{response.json()['id']}/content").content == body

    response = api_client.post("/v1/files", files={"file": (f"broken.{kind}", WRITERS[kind](BROKEN))})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_dataset", "file")
    assert (
        error["message"]
        == "the dataset has invalid rows: row 3: 'completion' is empty: there would be nothing to learn"
    )


def test_messages_upload_as_parquet(api_client):
    response = api_client.post(
        "/v1/files", files={"file": ("chat.parquet", parquet_bytes(color_messages(4)))}
    )
    assert response.status_code == 201, response.text
    assert (response.json()["format"], response.json()["num_samples"]) == ("messages", 4)


def test_upload_limits_are_per_kind(settings, api_key, tiny_model_dir):
    body = csv_bytes(PAIRS)
    limited = settings.model_copy(update={"upload_limits": {"csv": len(body) - 1}})
    from api.main import create_app

    with TestClient(create_app(limited), headers={"Authorization": f"Bearer {api_key}"}) as client:
        response = client.post("/v1/files", files={"file": ("colors.csv", body)})
        assert response.status_code == 413, response.text
        assert (
            response.json()["error"]["message"]
            == f"file is larger than the {len(body) - 1} byte limit of csv uploads"
        )
        # The same bytes as Parquet (a kind with no limit of its own) take max_upload_bytes.
        response = client.post("/v1/files", files={"file": ("colors.parquet", parquet_bytes(PAIRS))})
        assert response.status_code == 201, response.text


def submit(settings, store, dataset: str) -> str:
    with session_scope(settings.database_url) as session:
        spec = JobSpec(base_model=TINY_MODEL, dataset=dataset, hyperparameters={"max_steps": 1})
        return job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id


def validated(settings, job_id) -> tuple[Job, list[str]]:
    validation.validate_job(settings, job_id)
    with session_scope(settings.database_url) as session:
        events = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id, type="dataset")]
        return session.get(Job, job_id), events


def place(settings, store, where: str, name: str, data: bytes | None = None, folder=None) -> str:
    """Puts a dataset file (or saved dataset folder) in the bucket or an allowed folder; returns its URI."""
    if where == "s3":
        if folder is not None:
            store.put_tree(f"datasets/{name}", folder)
        else:
            store.put_bytes(f"datasets/{name}", data)
        return f"s3://{BUCKET}/datasets/{name}"
    path = settings.allowed_file_roots[0] / name
    if folder is not None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(folder, path)
    else:
        path.write_bytes(data)
    return f"file://{path}"


@pytest.mark.parametrize("where", ["s3", "file"])
@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_worker_reads_each_kind_from_s3_and_files(settings, store, tiny_model_dir, where, kind):
    uri = place(settings, store, where, f"pairs-{where}.{kind}", WRITERS[kind](PAIRS))
    job, events = validated(settings, submit(settings, store, uri))
    assert job.status == JobStatus.queued, job.error_message
    assert events == ["dataset: 6 valid samples in prompt_completion format"]

    uri = place(settings, store, where, f"broken-{where}.{kind}", WRITERS[kind](BROKEN))
    job, _ = validated(settings, submit(settings, store, uri))
    assert (job.status, job.error_code) == (JobStatus.failed, "invalid_dataset")
    assert job.error_message == "dataset: row 3: 'completion' is empty: there would be nothing to learn"


@pytest.mark.parametrize("where", ["s3", "file"])
def test_worker_reads_a_dataset_saved_to_disk(settings, store, tiny_model_dir, tmp_path, where):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict(
        {"train": Dataset.from_list(color_messages(5)), "test": Dataset.from_list(color_messages(2))}
    ).save_to_disk(saved)
    uri = place(settings, store, where, f"saved-{where}", folder=saved)
    job_id = submit(settings, store, uri)
    job, events = validated(settings, job_id)
    assert job.status == JobStatus.queued, job.error_message
    assert events == ["dataset: 5 valid samples in messages format"]
    assert len(job.input_digests["dataset"]) == 64
