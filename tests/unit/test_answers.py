"""The answers built from plain data (api/schemas.py job_answer, metric_curves; api/answers.py) say exactly what
the response models say, in the same JSON, and conditional GETs answer 304 only for the current ETag."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from api.answers import encode, json_answer
from api.schemas import JobOut, MetricPoint, job_answer, metric_curves
from shared.models import Job
from shared.schemas import JobSpec
from shared.services.job_reads import METRIC_COLUMNS

CREATED = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)

SPECS = {
    "lora": {"base_model": "m", "dataset": "file-abc", "hyperparameters": {"max_steps": 5}},
    "qlora": {
        "method": "qlora",
        "base_model": "m",
        "dataset": "file-abc",
        "validation_dataset": "file-def",
        "adapter": {"rank": 8, "target_modules": "all-linear"},
        "quantization": {"quant_type": "fp4"},
        "metadata": {"team": "nlp"},
    },
    "merge": {
        "method": "merge",
        "base_model": "m",
        "merge": {"sources": [{"job_id": "ftjob-a"}, {"job_id": "ftjob-b"}], "combination_type": "ties"},
    },
    "export": {"method": "export", "base_model": "m", "export": {"source": {"job_id": "ftjob-a"}}},
}


def stored_job(kind: str, **columns: object) -> Job:
    """A job as the database returns it: its spec validated and dumped when it was created."""
    spec = JobSpec.model_validate(SPECS[kind])
    values: dict[str, object] = {
        "id": f"ftjob-{kind}",
        "status": "queued",
        "method": spec.method.value,
        "base_model": "m",
        "dataset_uri": "s3://b/datasets/x.jsonl" if spec.dataset else None,
        "validation_uri": None,
        "spec": spec.model_dump(mode="json"),
        "priority": spec.priority.value,
        "user_metadata": dict(spec.metadata),
        "attempt": 0,
        "result": {},
        "plan": None,
        "input_digests": None,
        "created_at": CREATED,
        "updated_at": CREATED,
    }
    return Job(**(values | columns))


JOBS = [
    stored_job("lora"),
    stored_job(
        "qlora", status="running", attempt=2, started_at=CREATED, input_digests={"dataset": "ab" * 32}
    ),
    stored_job(
        "lora",
        status="failed",
        error_code="invalid_dataset",
        error_message="dataset: line 3: invalid JSON",
        finished_at=datetime(2026, 11, 30, 12, 5, tzinfo=UTC),
        plan={"status": "ready", "notes": [{"message": "ok", "param": None}], "memory": {"total": 1.5e9}},
    ),
    stored_job(
        "merge",
        status="succeeded",
        result={"train_loss": 0.25, "tokens_per_second": 1e-05},
        trainable_params=1234,
        total_params=99999,
        trained_tokens=4096,
    ),
    stored_job("export", user_metadata=None, result=None),
]


@pytest.mark.parametrize("job", JOBS, ids=lambda job: f"{job.id}-{job.status}")
def test_the_job_answer_is_what_JobOut_says(job):
    assert json.loads(encode(job_answer(job))) == json.loads(JobOut.of(job).model_dump_json())
    assert set(job_answer(job)) == set(JobOut.model_fields)


def test_times_are_written_as_the_response_models_write_them():
    assert b'"created_at":"2026-11-30T12:00:00.123456Z"' in encode(job_answer(JOBS[0]))


def test_metric_points_are_what_MetricPoint_says_and_nan_is_null():
    row = SimpleNamespace(
        split="train",
        step=7,
        epoch=0.5,
        loss=math.nan,
        learning_rate=2e-4,
        grad_norm=math.inf,
        tokens_per_second=None,
        num_tokens=4096,
        attempt=2,
        created_at=CREATED,
    )
    values = tuple(getattr(row, column.key) for column in METRIC_COLUMNS)
    eval_point = ("eval", 8, *values[2:])
    curves = json.loads(encode(metric_curves([values, eval_point])))
    assert curves["train"] == [json.loads(MetricPoint.of(row).model_dump_json())]
    assert curves["eval"][0]["step"] == 8
    answer = curves["train"][0]
    assert answer["loss"] is None and answer["grad_norm"] is None and answer["step"] == 7


def request_with(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""})


def test_a_matching_if_none_match_gets_a_bodiless_304():
    first = json_answer(request_with({}), {"status": "queued"})
    etag = first.headers["etag"]
    assert first.status_code == 200 and json.loads(first.body) == {"status": "queued"}
    assert first.headers["cache-control"] == "private, no-cache"
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = json_answer(request_with({"If-None-Match": sent}), {"status": "queued"})
        assert (again.status_code, again.body, again.headers["etag"]) == (304, b"", etag), sent
    changed = json_answer(request_with({"If-None-Match": etag}), {"status": "running"})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
