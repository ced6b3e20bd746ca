"""Base models by Hugging Face Hub id, offline (HF_HUB_OFFLINE=1) against a hub cache this test fills from the
tiny Llama in the hub's real layout (blobs, snapshots/<commit> symlinks, refs/<branch>): the allowlist, the
revision pinned to its commit and recorded on the job, the snapshot stored once in object storage, a job
trained on it; and the admin's `tuneforge models import`. Real PostgreSQL and S3."""

import hashlib
import os
import subprocess
import sys

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.models import DEFAULT_TEAM_ID, Job, JobEvent
from shared.schemas import JobSpec
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import BUCKET, ROOT, settings_env
from tests.helpers import color_prompt_completion, to_jsonl
from worker import runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)
REPO = "tuneforge-test/tiny-llama"
COMMIT = hashlib.sha1(b"tiny-llama, first commit").hexdigest()
DATASET_REPO = "tuneforge-test/colors"
TAG_COMMIT = hashlib.sha1(b"tiny-llama, tagged").hexdigest()


def fill_hub_cache(
    cache, repo: str, folder, commit: str, refs: tuple[str, ...], kind: str = "models"
) -> None:
    """Lays a folder out as huggingface_hub's cache does: content-addressed blobs, a snapshot folder per commit
    of relative symlinks to them, and refs/<name> files holding the commit."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_settings(settings, tiny_model_dir, work_dir):
    cache = work_dir / "hub-cache"
    fill_hub_cache(cache, REPO, tiny_model_dir, COMMIT, ("main",))
    fill_hub_cache(cache, REPO, tiny_model_dir, TAG_COMMIT, ("v1",))
    data = work_dir / "hub-dataset"
    (data / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(color_prompt_completion(7)), data / "data" / "train-00000-of-00001.parquet"
    )
    (data / "README.md").write_text("colors\n")
    fill_hub_cache(cache, DATASET_REPO, data, COMMIT, ("main",), kind="datasets")
    return settings.model_copy(
        update={"hub_cache_dir": cache, "hub_allowlist": ["tuneforge-test", "other/one"]}
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; set both, for this process and its children.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def submit(settings, store, base_model: str, dataset: str | None = None) -> str:
    with session_scope(settings.database_url) as session:
        path = settings.allowed_file_roots[0] / "hub-pairs.jsonl"
        path.write_bytes(to_jsonl(color_prompt_completion(8)))
        dataset = dataset or f"file://{path}"
        spec = JobSpec(base_model=base_model, dataset=dataset, hyperparameters={"max_steps": 2})
        return job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id


def job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_hub_ids_off_the_allowlist_get_a_422_that_says_why(api_client, settings):
    body = {"base_model": "meta-llama/Llama-3.2-1B", "dataset": "file-0123456789abcdef01234567"}
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "base_model"
    assert "takes nothing from the Hub (TUNEFORGE_HUB_ALLOWLIST is empty); use a model" in error["message"]


def test_the_allowlist_names_orgs_and_repos(hub_settings, store):
    from shared.hub import check_hub_allowed, parse_hub_id

    check_hub_allowed(parse_hub_id("tuneforge-test/anything@v2"), hub_settings, param="base_model")
    check_hub_allowed(parse_hub_id("other/one"), hub_settings, param="base_model")
    with pytest.raises(InvalidRequest, match=r"other/two is not on this deployment's Hub allowlist") as info:
        check_hub_allowed(parse_hub_id("other/two"), hub_settings, param="base_model")
    assert info.value.param == "base_model"
    with pytest.raises(InvalidRequest, match="not on this deployment's Hub allowlist"):
        submit(hub_settings, store, "meta-llama/Llama-3.2-1B")


def test_a_hub_model_is_pinned_stored_once_and_trained_on(hub_settings, store):
    job_id = submit(hub_settings, store, REPO)
    assert validation.validate_job(hub_settings, job_id) is JobStatus.queued, job(
        hub_settings, job_id
    ).error_message
    queued = job(hub_settings, job_id)
    pinned = f"{REPO}@{COMMIT}"
    assert queued.base_model == pinned
    assert queued.spec["base_model"] == pinned
    with session_scope(hub_settings.database_url) as session:
        events = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id, type="model")]
    assert events == [f"base model {REPO} is pinned to {pinned}"]
    prefix = f"models/hub/{REPO}/{COMMIT}"
    assert store.head(f"{prefix}/model.safetensors") is not None
    assert store.head(f"{prefix}/config.json") is not None

    # A tag pins to its own commit; the same commit again is not stored again (its marker stays as it is).
    store.put_bytes(f"{prefix}/.tuneforge-stored", b"kept")
    tagged = submit(hub_settings, store, f"{REPO}@v1")
    assert validation.validate_job(hub_settings, tagged) is JobStatus.queued
    assert job(hub_settings, tagged).base_model == f"{REPO}@{TAG_COMMIT}"
    again = submit(hub_settings, store, REPO)
    assert validation.validate_job(hub_settings, again) is JobStatus.queued
    assert store.read_bytes(f"{prefix}/.tuneforge-stored") == b"kept"

    assert runner.run_job(hub_settings, job_id) is JobStatus.succeeded, job(
        hub_settings, job_id
    ).error_message


def test_an_unknown_revision_fails_validation_saying_so(hub_settings, store):
    job_id = submit(hub_settings, store, f"{REPO}@no-such-branch")
    assert validation.validate_job(hub_settings, job_id) is JobStatus.failed
    failed = job(hub_settings, job_id)
    assert failed.error_code == "invalid_model"
    assert failed.error_message.startswith(f"base_model: {REPO}@no-such-branch could not be had from the Hub")


def test_a_hub_dataset_is_read_through_datasets_and_pinned(hub_settings, store):
    job_id = submit(hub_settings, store, REPO, dataset=DATASET_REPO)
    assert validation.validate_job(hub_settings, job_id) is JobStatus.queued, job(
        hub_settings, job_id
    ).error_message
    queued = job(hub_settings, job_id)
    assert queued.dataset_uri == queued.spec["dataset"] == f"{DATASET_REPO}@{COMMIT}"
    with session_scope(hub_settings.database_url) as session:
        events = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id, type="dataset")]
    assert events == ["dataset: 7 valid samples in prompt_completion format"]
    assert runner.run_job(hub_settings, job_id) is JobStatus.succeeded, job(
        hub_settings, job_id
    ).error_message
    with pytest.raises(InvalidRequest, match="not on this deployment's Hub allowlist") as info:
        submit(hub_settings, store, REPO, dataset="someone/else")
    assert info.value.param == "dataset"


def test_models_import_uploads_a_folder_and_registers_it(settings, store, tiny_model_dir, tmp_path):
    registry = tmp_path / "models.yaml"
    env = settings_env(settings.model_copy(update={"model_registry_file": registry})) | {
        "PYTHONPATH": str(ROOT)
    }
    command = [sys.executable, "-m", "cli.main", "models", "import", "imported-tiny", str(tiny_model_dir)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"registered imported-tiny at s3://{BUCKET}/models/imported-tiny" in done.stdout
    assert yaml.safe_load(registry.read_text()) == {
        "imported-tiny": {"location": f"s3://{BUCKET}/models/imported-tiny", "description": ""}
    }
    for path in tiny_model_dir.iterdir():
        if path.is_file():
            assert store.read_bytes(f"models/imported-tiny/{path.name}") == path.read_bytes()
    listed = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "list"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "imported-tiny" in listed.stdout

    refused = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "import", "nothing", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "has no config.json" in refused.stdout + refused.stderr
