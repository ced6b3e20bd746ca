"""Merge, fusion and export jobs: their source adapters are checked before anything is queued."""

import json

import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, Job, Team
from shared.services import artifacts as artifact_service
from shared.states import JobStatus
from tests.conftest import BUCKET, TINY_MODEL
from tests.helpers import color_messages, to_jsonl


@pytest.fixture
def dataset_id(api_client) -> str:
    response = api_client.post("/v1/files", files={"file": ("c.jsonl", to_jsonl(color_messages(4)))})
    return response.json()["id"]


@pytest.fixture
def finished(api_client, dataset_id, settings, store):
    """Makes a succeeded LoRA job whose adapter_config.json lies in storage (no training needed here)."""

    def make(rank: int = 8, use_dora: bool = False, status: str = "succeeded", base: str = TINY_MODEL) -> str:
        job = api_client.post(
            "/v1/jobs", json={"base_model": TINY_MODEL, "dataset": dataset_id, "adapter": {"rank": rank}}
        ).json()
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": ["q_proj", "v_proj"],
            "use_dora": use_dora,
            "use_rslora": False,
            "base_model_name_or_path": base,
        }
        stored = store.put_bytes(
            f"tests/adapters/{job['id']}/adapter_config.json", json.dumps(config).encode()
        )
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job["id"]).values(status=status, base_model=base))
            row = session.get(Job, job["id"])
            artifact_service.record_artifacts(
                session=session, job=row, kind="adapter", stored=[("adapter_config.json", stored)]
            )
        return job["id"]

    return make


def merge(sources, **extra) -> dict:
    return {"method": "merge", "merge": {"sources": [{"job_id": s} for s in sources], **extra}}


def test_merge_job_takes_its_base_from_the_sources(api_client, finished):
    a, b = finished(), finished(rank=4)
    response = api_client.post("/v1/jobs", json=merge([a, b], combination_type="cat", weights=[1, 0.5]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["base_model"] == TINY_MODEL
    assert job["dataset"] is None and job["adapter"] is None and job["hyperparameters"] is None
    assert job["merge"]["weights"] == [1.0, 0.5]
    assert job["status"] == "validating"


def test_export_action_on_a_finished_job(api_client, finished):
    source = finished()
    response = api_client.post(
        f"/v1/jobs/{source}/export", json={"dtype": "float32", "max_shard_size": "500MB"}
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["method"] == "export"
    assert job["export"] == {
        "source": {"job_id": source, "uri": None},
        "dtype": "float32",
        "max_shard_size": "500MB",
    }


@pytest.mark.parametrize(
    ("case", "param", "message"),
    [
        ("weights", "merge.weights", "3 weights for 2 sources"),
        ("ranks", "merge.combination_type", "one rank"),
        ("unknown_type", "merge.combination_type", ""),
        ("density", "merge.density", "does not apply"),
        ("not_succeeded", "merge.sources[1]", "is running"),
        ("unknown_job", "merge.sources[0]", "not found"),
        ("dora", "merge.sources[0]", "DoRA"),
        ("bases", "merge.sources[0]", "different base models"),
        ("bucket", "merge.sources[1]", "not allowed"),
        ("missing_config", "merge.sources[1]", "no adapter_config.json"),
        ("one_fusion_source", "fusion.sources", "at least 2"),
        ("fusion_without_dataset", "dataset", "needs a dataset"),
        ("merge_with_dataset", "dataset", "does not train"),
        ("stray_section", "fusion", "applies only to method fusion"),
    ],
)
def test_bad_sources_are_refused_before_queueing(api_client, finished, dataset_id, case, param, message):
    a = finished()
    bodies = {
        "weights": lambda: merge([a, finished()], weights=[1, 1, 1]),
        "ranks": lambda: merge([a, finished(rank=4)], combination_type="linear"),
        "unknown_type": lambda: merge([a, finished()], combination_type="average"),
        "density": lambda: merge([a, finished()], combination_type="cat", density=0.3),
        "not_succeeded": lambda: merge([a, finished(status="running")]),
        "unknown_job": lambda: merge(["ftjob-000000000000000000000000", a]),
        "dora": lambda: merge([finished(use_dora=True), a]),
        "bases": lambda: merge([a, finished(base="another-model")]),
        "bucket": lambda: {
            "method": "merge",
            "merge": {"sources": [{"job_id": a}, {"uri": "s3://someone-elses-bucket/adapter"}]},
        },
        "missing_config": lambda: {
            "method": "merge",
            "merge": {"sources": [{"job_id": a}, {"uri": f"s3://{BUCKET}/tests/nothing-here"}]},
        },
        "one_fusion_source": lambda: {
            "method": "fusion",
            "base_model": TINY_MODEL,
            "dataset": dataset_id,
            "fusion": {"sources": [{"job_id": a}]},
        },
        "fusion_without_dataset": lambda: {
            "method": "fusion",
            "base_model": TINY_MODEL,
            "fusion": {"sources": [{"job_id": a}, {"job_id": finished()}]},
        },
        "merge_with_dataset": lambda: {**merge([a, finished()]), "dataset": dataset_id},
        "stray_section": lambda: {
            **merge([a, finished()]),
            "fusion": {"sources": [{"job_id": a}, {"job_id": a}]},
        },
    }
    response = api_client.post("/v1/jobs", json=bodies[case]())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def test_another_teams_job_is_not_a_source(api_client, finished, settings):
    source = finished()
    with session_scope(settings.database_url) as session:
        if session.get(Team, "team-other") is None:
            session.add(Team(id="team-other", name="other"))
        session.flush()
        session.execute(update(Job).where(Job.id == source).values(team_id="team-other"))
    response = api_client.post("/v1/jobs", json=merge([source, finished()]))
    assert response.status_code == 422
    assert "not found" in response.json()["error"]["message"]
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == source).values(team_id=DEFAULT_TEAM_ID))


def test_export_of_a_failed_job_is_refused(api_client, finished):
    failed = finished(status=JobStatus.failed.value)
    response = api_client.post(f"/v1/jobs/{failed}/export")
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "export.source"
