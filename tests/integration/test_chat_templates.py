"""A job's chat template on a base model whose tokenizer has none: refused without one (the message names the
option), trained with one, and saved with the adapter's tokenizer; on real PostgreSQL and S3."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from shared.chat_templates import CHATML
from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job
from shared.schemas import JobSpec
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.settings import ModelEntry
from shared.states import JobStatus
from shared.tenancy import TeamID
from tests.conftest import BUCKET
from tests.helpers import color_messages
from worker import runner, validation

TEAM = TeamID(DEFAULT_TEAM_ID)
BARE = "tiny-llama-no-template"


@pytest.fixture(scope="module")
def bare_settings(settings, store, tiny_model_dir, work_dir):
    """The tiny Llama again, its tokenizer without a chat template, registered under its own name."""
    folder = work_dir / BARE
    if not folder.exists():
        shutil.copytree(tiny_model_dir, folder)
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        assert AutoTokenizer.from_pretrained(folder).chat_template is None
        store.put_tree(f"models/{BARE}", folder)
    models = {**settings.models, BARE: ModelEntry(location=f"s3://{BUCKET}/models/{BARE}")}
    return settings.model_copy(update={"models": models})


@pytest.fixture(scope="module")
def chat_parquet(settings) -> str:
    path = settings.allowed_file_roots[0] / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(color_messages(16)), path)
    return f"file://{path}"


def submit(settings, store, dataset: str, **fields) -> str:
    with session_scope(settings.database_url) as session:
        spec = JobSpec(base_model=BARE, dataset=dataset, hyperparameters={"max_steps": 2}, **fields)
        return job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id


def job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_without_a_template_messages_are_refused_naming_the_option(bare_settings, store, chat_parquet):
    job_id = submit(bare_settings, store, chat_parquet)
    assert validation.validate_job(bare_settings, job_id) is JobStatus.failed
    failed = job(bare_settings, job_id)
    assert failed.error_code == "invalid_config"
    assert "the base model has no chat template" in failed.error_message
    assert (
        "set the job's chat_template (a name such as chatml or llama3, or your own Jinja)"
        in failed.error_message
    )


@pytest.mark.parametrize("template", ["chatml", CHATML.replace("\n", "\n\n")], ids=["named", "own-jinja"])
def test_a_chosen_template_trains_and_is_saved_with_the_adapter(
    bare_settings, store, chat_parquet, tmp_path, template
):
    job_id = submit(bare_settings, store, chat_parquet, chat_template=template)
    assert validation.validate_job(bare_settings, job_id) is JobStatus.queued, job(
        bare_settings, job_id
    ).error_message
    assert runner.run_job(bare_settings, job_id) is JobStatus.succeeded, job(
        bare_settings, job_id
    ).error_message
    with session_scope(bare_settings.database_url) as session:
        artifacts = artifact_service.list_artifacts(session=session, team_id=TEAM, job_id=job_id)
    for artifact in artifacts:
        store.get_file(artifact.storage_key, tmp_path / artifact.name, expected_sha256=artifact.sha256)
    # Whatever serves the adapter renders chats as training did.
    expected = CHATML if template == "chatml" else template
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == expected


def test_the_api_names_chat_template_in_its_422(api_client):
    body = {"base_model": BARE, "dataset": "file-0123456789abcdef01234567", "chat_template": "chatml3"}
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "chat_template"
    assert "unknown chat template 'chatml3'" in error["message"]
