"""The OpenAI-compatible surface (/v1/files, /v1/fine_tuning), driven by the official `openai` client over the
app's TestClient, against real PostgreSQL, Redis and S3. One test trains through the worker's own code."""

import csv
import io
import secrets
from dataclasses import dataclass

import openai
import pytest

from shared.db import session_scope
from shared.models import Job
from shared.states import JobStatus
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, color_preferences, to_jsonl


@dataclass(frozen=True)
class Team:
    id: str
    key: str
    name: str


@pytest.fixture(scope="module")
def team(make_team) -> Team:
    """A team of its own, so that listings hold only this module's jobs."""
    name = f"openai-compat-{secrets.token_hex(3)}"
    team_id, key = make_team(name)
    return Team(team_id, key, name)


def openai_client(api_client, key: str) -> openai.OpenAI:
    # The TestClient is an httpx.Client; no retries, so that an error answer is seen once.
    return openai.OpenAI(
        api_key=key, base_url=str(api_client.base_url) + "/v1", http_client=api_client, max_retries=0
    )


@pytest.fixture
def client(api_client, team) -> openai.OpenAI:
    return openai_client(api_client, team.key)


@pytest.fixture
def training_file(client) -> str:
    return client.files.create(file=("colors.jsonl", to_jsonl(color_messages(12))), purpose="fine-tune").id


def native_job(api_client, team: Team, job_id: str) -> dict:
    response = api_client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {team.key}"})
    assert response.status_code == 200, response.text
    return response.json()


def error_of(excinfo) -> dict:
    return excinfo.value.body


# ------------------------------------------------------------------------------------------------ files


def test_files_create_list_retrieve_content_delete(client):
    data = to_jsonl(color_messages(10))
    created = client.files.create(file=("colors.jsonl", data), purpose="fine-tune")
    assert created.object == "file"
    assert created.id.startswith("file-")
    assert created.status == "processed"
    assert created.purpose == "fine-tune"
    assert created.filename == "colors.jsonl"
    assert created.bytes == len(data)
    assert isinstance(created.created_at, int)
    # Tuneforge's checks of the dataset come along as extra fields.
    assert created.format == "messages"
    assert created.num_samples == 10
    assert len(created.sha256) == 64

    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert client.files.content(created.id).content == data

    others = [client.files.create(file=(f"c{i}.jsonl", data), purpose="fine-tune").id for i in range(2)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == list(reversed(others))
    assert page.has_more is True
    # The client's auto-pagination follows `after` through every page, newest first.
    listed = [f.id for f in client.files.list(limit=1)]
    assert listed[:3] == [*reversed(others), created.id]
    assert len(listed) == len(set(listed))
    oldest_first = [f.id for f in client.files.list(order="asc")]
    assert oldest_first.index(created.id) < oldest_first.index(others[0]) < oldest_first.index(others[1])
    # Paged one by one, oldest first: `after` continues in the order asked for.
    assert [f.id for f in client.files.list(order="asc", limit=1)] == oldest_first

    deleted = client.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    assert created.id not in [f.id for f in client.files.list()]
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)


def test_only_the_fine_tune_purpose_is_accepted(client):
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.files.create(file=("x.jsonl", b'{"text": "a"}\n'), purpose="assistants")
    assert excinfo.value.status_code == 422
    assert error_of(excinfo)["param"] == "purpose"
    assert "fine-tune" in error_of(excinfo)["message"]


def test_a_file_read_by_an_unfinished_job_cannot_be_deleted(client, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    with pytest.raises(openai.ConflictError) as excinfo:
        client.files.delete(training_file)
    assert job.id in error_of(excinfo)["message"]
    assert client.files.retrieve(training_file).id == training_file

    client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(training_file).deleted is True
    # The finished job still names the file it was made from.
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == training_file


# ------------------------------------------------------------------------------------------------- jobs


def test_create_with_defaults_is_a_lora_job(client, api_client, team, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    assert job.object == "fine_tuning.job"
    assert job.id.startswith("ftjob-")
    assert job.status == "validating_files"
    assert job.model == TINY_MODEL
    assert job.training_file == training_file
    assert job.validation_file is None
    assert job.organization_id == team.id
    assert isinstance(job.created_at, int)
    assert job.finished_at is None and job.fine_tuned_model is None and job.trained_tokens is None
    assert job.result_files == [] and job.integrations == [] and job.estimated_finish is None
    assert job.error is None
    assert job.seed == 42
    assert job.hyperparameters.n_epochs == 3
    assert job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == 3
    assert job.tuneforge["method"] == "lora"
    assert job.tuneforge["adapter"]["rank"] == 16

    native = native_job(api_client, team, job.id)
    assert native["method"] == "lora"
    assert native["hyperparameters"]["epochs"] == 3
    assert native["hyperparameters"]["learning_rate"] == 2e-4


@pytest.mark.parametrize("where", ["hyperparameters", "method"])
def test_openai_hyperparameters_map_onto_the_job(client, api_client, team, training_file, where):
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    if where == "hyperparameters":
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=training_file, hyperparameters=hp
        )
    else:
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=training_file,
            method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        )
    assert job.hyperparameters.model_dump() == hp
    assert job.method.supervised.hyperparameters.model_dump() == hp
    native = native_job(api_client, team, job.id)["hyperparameters"]
    assert (native["epochs"], native["batch_size"], native["learning_rate"]) == (2, 8, 1e-4)


def test_auto_hyperparameters_take_the_defaults(client, api_client, team, training_file):
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=training_file,
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
    )
    assert job.hyperparameters.model_dump() == {
        "n_epochs": 3,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
    }


def test_suffix_seed_metadata_and_validation_file(client, api_client, team, training_file):
    validation = client.files.create(
        file=("v.jsonl", to_jsonl(color_messages(4, seed=3))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=training_file,
        validation_file=validation.id,
        suffix="colors-v1",
        seed=7,
        metadata={"project": "colors"},
    )
    assert job.seed == 7
    assert job.validation_file == validation.id
    assert job.metadata == {"project": "colors"}
    assert job.user_provided_suffix == "colors-v1"
    native = native_job(api_client, team, job.id)
    assert native["hyperparameters"]["seed"] == 7
    assert native["validation_dataset"] == validation.id
    assert native["metadata"] == {"project": "colors"}
    assert native["suffix"] == "colors-v1"


def test_the_native_api_takes_the_suffix_too(client, api_client, team, training_file):
    headers = {"Authorization": f"Bearer {team.key}"}
    body = {"base_model": TINY_MODEL, "dataset": training_file, "suffix": "support.v2_b-1"}
    # The suffix no longer takes a metadata key: all 16 stay the caller's.
    metadata = {f"k{i}": "v" for i in range(16)}
    created = api_client.post("/v1/jobs", json=body | {"metadata": metadata}, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["suffix"] == "support.v2_b-1"
    shown = client.fine_tuning.jobs.retrieve(created.json()["id"])
    assert shown.user_provided_suffix == "support.v2_b-1" and shown.metadata == metadata
    for bad in ("has:colon", "has space", "x" * 65, ""):
        refused = api_client.post("/v1/jobs", json=body | {"suffix": bad}, headers=headers)
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["error"]["param"] == "suffix"
        assert "1 to 64 letters, digits" in refused.json()["error"]["message"]


def test_peft_options_travel_in_extra_body(client, api_client, team, training_file):
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=training_file,
        hyperparameters={"learning_rate_multiplier": 2},
        extra_body={
            "tuneforge": {
                "method": "dora",
                "adapter": {"rank": 8, "alpha": 16, "dropout": 0.1, "target_modules": "attention"},
                "hyperparameters": {"max_steps": 5, "max_seq_length": 256, "lr_scheduler": "cosine"},
                "priority": "high",
            }
        },
    )
    assert job.tuneforge["method"] == "dora"
    assert job.tuneforge["adapter"]["use_dora"] is True
    assert job.hyperparameters.n_epochs == "auto"  # the length is max_steps
    assert job.hyperparameters.learning_rate_multiplier == 2.0
    native = native_job(api_client, team, job.id)
    assert native["method"] == "dora"
    assert native["priority"] == "high"
    assert native["adapter"] == {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.1,
        "target_modules": "attention",
        "use_dora": True,
        "use_rslora": False,
    }
    hp = native["hyperparameters"]
    assert (hp["max_steps"], hp["epochs"], hp["max_seq_length"], hp["lr_scheduler"]) == (
        5,
        None,
        256,
        "cosine",
    )
    assert hp["learning_rate"] == pytest.approx(4e-4)


def test_qlora_with_quantization_through_extra_body(client, api_client, team, training_file):
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=training_file,
        extra_body={"tuneforge": {"method": "qlora", "quantization": {"quant_type": "fp4"}}},
    )
    native = native_job(api_client, team, job.id)
    assert native["method"] == "qlora"
    assert native["quantization"]["quant_type"] == "fp4"
    assert native["hyperparameters"]["gradient_checkpointing"] is True


def test_dpo_method_maps_onto_a_dpo_job_with_the_adapter_tuneforge_names(client, api_client, team):
    pairs = client.files.create(
        file=("pairs.jsonl", to_jsonl(color_preferences(12, shape="openai"))), purpose="fine-tune"
    )
    assert pairs.format == "openai_preference" and pairs.num_samples == 12
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "batch_size": 2}}},
        extra_body={"tuneforge": {"method": "dora", "dpo": {"loss_type": "ipo"}}},
    )
    assert job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.beta == 0.25
    assert job.method.dpo.hyperparameters.batch_size == 2
    native = native_job(api_client, team, job.id)
    assert native["method"] == "dpo"
    assert native["dpo"] == {"beta": 0.25, "loss_type": "ipo", "label_smoothing": None}
    assert native["adapter"]["use_dora"] is True and native["quantization"] is None
    assert native["hyperparameters"]["learning_rate"] == 5e-5

    qlora = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}},
        extra_body={"tuneforge": {"method": "qlora"}},
    )
    native = native_job(api_client, team, qlora.id)
    assert native["dpo"]["beta"] == 0.1 and native["quantization"]["quant_type"] == "nf4"
    assert native["adapter"]["use_dora"] is False and native["hyperparameters"]["gradient_checkpointing"]


@pytest.mark.parametrize(
    ("dataset", "method", "message"),
    [
        ("pairs", {"type": "supervised"}, "use method dpo"),
        ("chat", {"type": "dpo", "dpo": {}}, "learns from preference pairs"),
    ],
)
def test_a_dataset_of_the_wrong_kind_for_the_method_is_refused(
    client, training_file, dataset, method, message
):
    pairs = client.files.create(file=("pairs.jsonl", to_jsonl(color_preferences(4))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=pairs.id if dataset == "pairs" else training_file, method=method
        )
    assert error_of(excinfo)["param"] == "training_file"
    assert message in error_of(excinfo)["message"]


def test_reinforcement_is_refused(client, training_file):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=training_file,
            method={"type": "reinforcement", "reinforcement": {}},
        )
    error = error_of(excinfo)
    assert error["param"] == "method.type"
    assert error["code"] == "unsupported_method"
    assert "supervised" in error["message"] and "dpo" in error["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": "gpt-17"}, "model"),
        ({"training_file": "file-000000000000000000000000"}, "training_file"),
        ({"training_file": "ftp://example.com/x.jsonl"}, "training_file"),
        ({"validation_file": "file-000000000000000000000000"}, "validation_file"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 1e6}}, "hyperparameters.learning_rate_multiplier"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}},
            "method.supervised.hyperparameters.batch_size",
        ),
        ({"method": {"type": "unsupervised"}}, "method.type"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
        ),
        (
            {
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                "extra_body": {"tuneforge": {"dpo": {"beta": 0.3}}},
            },
            "tuneforge.dpo.beta",
        ),
        (
            {"method": {"type": "dpo"}, "extra_body": {"tuneforge": {"dpo": {"loss_type": "kto"}}}},
            "tuneforge.dpo.loss_type",
        ),
        ({"extra_body": {"tuneforge": {"dpo": {"beta": 0.3}}}}, "tuneforge.dpo"),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
        ),
        ({"suffix": "no spaces please"}, "suffix"),
        ({"suffix": "no:colons"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": ""}, "suffix"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        # No W&B key in the tests' deployment; no such tracker as comet.
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations.0"),
        ({"integrations": [{"type": "comet"}]}, "integrations.0.type"),
        ({"extra_body": {"unexpected": 1}}, "unexpected"),
        ({"extra_body": {"tuneforge": {"method": "prefix-tuning"}}}, "tuneforge.method"),
        ({"extra_body": {"tuneforge": {"adapter": {"rank": 0}}}}, "tuneforge.adapter.rank"),
        ({"extra_body": {"tuneforge": {"adapter": {"use_dora": True}}}}, "tuneforge.adapter.use_dora"),
        (
            {"extra_body": {"tuneforge": {"hyperparameters": {"warmup_ratio": 2}}}},
            "tuneforge.hyperparameters.warmup_ratio",
        ),
        (
            {"extra_body": {"tuneforge": {"hyperparameters": {"eval_steps": 5}}}},
            "tuneforge.hyperparameters.eval_steps",
        ),
        ({"extra_body": {"tuneforge": {"resources": {"gpus": 8}}}}, "tuneforge.resources.gpus"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "extra_body": {"tuneforge": {"hyperparameters": {"max_steps": 9}}},
            },
            "tuneforge.hyperparameters.max_steps",
        ),
        (
            {"seed": 3, "extra_body": {"tuneforge": {"hyperparameters": {"seed": 4}}}},
            "tuneforge.hyperparameters.seed",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_openai_field(client, training_file, change, param):
    kwargs = {"model": TINY_MODEL, "training_file": training_file} | change
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(**kwargs)
    assert error_of(excinfo)["param"] == param, error_of(excinfo)
    assert error_of(excinfo)["type"] == "invalid_request_error"


def test_errors_take_openais_shape_and_the_native_routes_keep_theirs(api_client, team):
    headers = {"Authorization": f"Bearer {team.key}"}
    response = api_client.post("/v1/fine_tuning/jobs", json={"model": "gpt-17"}, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == ("training_file", "missing_required_parameter")

    response = api_client.post(
        "/v1/fine_tuning/jobs", content=b"{oops", headers=headers | {"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"

    response = api_client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=headers)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"

    unauthenticated = api_client.get("/v1/fine_tuning/jobs", headers={"Authorization": ""})
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    assert unauthenticated.headers["www-authenticate"] == "Bearer"

    native = api_client.post("/v1/jobs", json={"base_model": "gpt-17"}, headers=headers)
    assert native.status_code == 422
    assert "type" not in native.json()["error"]


def test_a_wrong_key_raises_authentication_error(api_client):
    with pytest.raises(openai.AuthenticationError):
        openai_client(api_client, "tf-not-a-key").fine_tuning.jobs.list()


def test_another_teams_job_is_not_found(client, api_client, make_team, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    _, other_key = make_team()
    other = openai_client(api_client, other_key)
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.files.retrieve(training_file),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "validating_files"  # untouched


def test_listing_is_newest_first_and_paginates(client, training_file):
    batch = secrets.token_hex(4)
    ids = [
        client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=training_file, metadata={"batch": batch}
        ).id
        for _ in range(5)
    ]
    newest_first = list(reversed(ids))

    first = client.fine_tuning.jobs.list(limit=2, metadata={"batch": batch})
    assert [j.id for j in first.data] == newest_first[:2]
    assert first.has_more is True
    second = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id, metadata={"batch": batch})
    assert [j.id for j in second.data] == newest_first[2:4]
    assert [j.id for j in second.get_next_page().data] == newest_first[4:]
    last = client.fine_tuning.jobs.list(limit=2, after=newest_first[3], metadata={"batch": batch})
    assert (
        [j.id for j in last.data] == newest_first[4:] and last.has_more is False and not last.has_next_page()
    )

    # The auto-paginating iterator walks every page.
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2, metadata={"batch": batch})] == newest_first
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=3)]
    assert everything[:5] == newest_first and len(everything) == len(set(everything))
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "none-such"})] == []

    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.list(after="ftjob-nope")
    assert error_of(excinfo)["param"] == "after"


def test_retrieve_and_cancel_before_start(client, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    assert client.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert isinstance(cancelled.finished_at, int)
    assert cancelled.fine_tuned_model is None and cancelled.result_files == []
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError) as excinfo:
        client.fine_tuning.jobs.cancel(job.id)
    assert excinfo.value.response.headers["x-should-retry"] == "false"


def test_a_cancelling_job_is_shown_running_until_it_stops(client, settings, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    with session_scope(settings.database_url) as session:  # as if a worker had claimed it
        session.get(Job, job.id).status = JobStatus.running.value
    cancelling = client.fine_tuning.jobs.cancel(job.id)
    assert cancelling.status == "running"
    assert cancelling.tuneforge["status"] == "cancelling"
    assert cancelling.finished_at is None


def test_events_are_newest_first_and_paginate(client, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    client.fine_tuning.jobs.cancel(job.id)

    events = client.fine_tuning.jobs.list_events(job.id)
    kinds = [e.tuneforge_type for e in events.data]
    assert kinds[0] == "status" and kinds[-1] == "created"  # newest first
    newest = events.data[0]
    assert newest.object == "fine_tuning.job.event"
    assert newest.id.startswith("ftevent-")
    assert newest.level == "info" and newest.type == "message"
    assert newest.data["status"] == "cancelled"
    assert isinstance(newest.created_at, int)

    first = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert [e.id for e in first.data] == [newest.id] and first.has_more is True
    second = client.fine_tuning.jobs.list_events(job.id, limit=1, after=first.data[-1].id)
    assert [e.id for e in second.data] == [events.data[1].id]
    walked = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=1)]
    assert walked == [e.id for e in events.data]
    assert walked == sorted(walked, key=lambda i: int(i.removeprefix("ftevent-")), reverse=True)

    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list_events(job.id, after="garbage")


def test_an_idempotency_key_replays_the_same_job(client, training_file):
    key = {"Idempotency-Key": secrets.token_hex(8)}
    first = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file, extra_headers=key)
    again = client.fine_tuning.jobs.with_raw_response.create(
        model=TINY_MODEL, training_file=training_file, extra_headers=key
    )
    assert again.headers["idempotent-replayed"] == "true"
    replayed = again.parse()
    assert replayed.id == first.id
    assert replayed.object == "fine_tuning.job" and replayed.status == first.status
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model=TINY_MODEL, training_file=training_file, seed=1, extra_headers=key
        )
    assert error_of(excinfo)["param"] == "Idempotency-Key"


def test_results_files_of_unfinished_jobs_do_not_exist(client, training_file):
    job = client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file)
    results_id = "file-results-" + job.id.removeprefix("ftjob-")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(results_id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(results_id)


# ------------------------------------------------- a job trained by the worker's own code (no Celery)


def test_a_trained_job_has_a_model_name_results_and_checkpoints(
    client, api_client, team, settings, tiny_model_dir
):
    from worker import runner, validation

    train = client.files.create(file=("train.jsonl", to_jsonl(color_messages(32))), purpose="fine-tune")
    valid = client.files.create(
        file=("valid.jsonl", to_jsonl(color_messages(8, seed=5))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=valid.id,
        suffix="colors",
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 25},
        extra_body={
            "tuneforge": {
                "adapter": {"rank": 4, "target_modules": "attention"},
                "hyperparameters": {"max_steps": 6, "checkpoint_steps": 2, "eval_steps": 2},
            }
        },
    )
    assert validation.validate_job(settings, job.id) is JobStatus.queued
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert runner.run_job(settings, job.id) is JobStatus.succeeded

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"ft:{TINY_MODEL}:{team.name}:colors:{job.id}"
    assert done.trained_tokens > 0
    assert isinstance(done.finished_at, int) and done.finished_at >= done.created_at
    assert done.error is None
    assert done.tuneforge["trainable_params"] > 0

    # The results file: the metrics as OpenAI's CSV, served by the files API.
    [results_id] = done.result_files
    results = client.files.retrieve(results_id)
    assert (results.purpose, results.filename, results.status) == (
        "fine-tune-results",
        "step_metrics.csv",
        "processed",
    )
    content = client.files.content(results_id).content
    assert results.bytes == len(content)
    rows = list(csv.DictReader(io.StringIO(content.decode())))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["train_loss"]) > 0 for r in rows)
    assert [r["step"] for r in rows if r["valid_loss"]] == ["2", "4", "6"]
    assert list(rows[0])[:5] == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    assert results_id not in [f.id for f in client.files.list()]
    with pytest.raises(openai.ConflictError):
        client.files.delete(results_id)

    # Checkpoints: the trainer's saves before the last step, latest first.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [4, 2]
    latest = checkpoints.data[0]
    assert latest.object == "fine_tuning.job.checkpoint"
    assert latest.fine_tuning_job_id == job.id
    assert latest.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"
    assert latest.metrics.step == 4
    assert latest.metrics.train_loss > 0
    assert latest.metrics.valid_loss == pytest.approx(float(rows[3]["valid_loss"]))
    assert isinstance(latest.created_at, int)
    one = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert [c.step_number for c in one.data] == [4] and one.has_more is True
    assert [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [
        c.id for c in checkpoints.data
    ]

    # Events, newest first: the last says the job succeeded; checkpoints and validation are there too.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))
    assert events[0].data.get("status") == "succeeded"
    kinds = {e.tuneforge_type for e in events}
    assert {"created", "status", "checkpoint", "metrics"} <= kinds

    # Metrics events, as OpenAI's: one per logged step, the validation loss with the training loss where it
    # was measured; the same figures as the results file.
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == [1, 2, 3, 4, 5, 6]
    for event in metrics:
        row = rows[event.data["step"] - 1]
        assert event.data["total_steps"] == 6
        assert event.data["train_loss"] == pytest.approx(float(row["train_loss"]))
        if row["valid_loss"]:
            assert event.data["valid_loss"] == pytest.approx(float(row["valid_loss"]))
        else:
            assert "valid_loss" not in event.data
    step_2 = next(e for e in metrics if e.data["step"] == 2)
    assert step_2.message == (
        f"Step 2/6: training loss={float(rows[1]['train_loss']):.4f}, "
        f"validation loss={float(rows[1]['valid_loss']):.4f}"
    )
    assert all(e.type == "message" for e in events if e.tuneforge_type != "metrics")
    # The native event log holds the same events, oldest first.
    native = api_client.get(
        f"/v1/jobs/{job.id}/events",
        params={"limit": 500},
        headers={"Authorization": f"Bearer {team.key}"},
    ).json()["data"]
    assert [e["data"] for e in native if e["type"] == "metrics"] == [e.data for e in reversed(metrics)]


def test_a_dpo_job_through_the_official_client_trains_on_preference_pairs(
    client, team, settings, tiny_model_dir
):
    from worker import runner, validation

    train = client.files.create(
        file=("pairs.jsonl", to_jsonl(color_preferences(16, seed=1, shape="openai"))), purpose="fine-tune"
    )
    valid = client.files.create(
        file=("valid.jsonl", to_jsonl(color_preferences(4, seed=2, shape="openai"))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        validation_file=valid.id,
        suffix="prefs",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 4}}},
        extra_body={
            "tuneforge": {
                "adapter": {"rank": 4},
                "hyperparameters": {"max_steps": 4, "eval_steps": 4, "checkpoint_steps": 2},
            }
        },
    )
    assert validation.validate_job(settings, job.id) is JobStatus.queued
    with session_scope(settings.database_url) as session:
        plan = session.get(Job, job.id).plan
    # The plan counts two sequences per pair and the reference pass.
    assert plan["method"] == "dpo" and plan["datasets"]["dataset"]["sequences_per_sample"] == 2
    assert plan["memory"]["tokens_per_micro_batch"] == 2 * 4 * plan["memory"]["seq_length"]
    assert plan["memory"]["components"]["reference_pass"] > 0
    assert runner.run_job(settings, job.id) is JobStatus.succeeded

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.error is None
    assert done.fine_tuned_model == f"ft:{TINY_MODEL}:{team.name}:prefs:{job.id}"
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.1
    assert done.trained_tokens > 0
    result = done.tuneforge["result"]
    assert result["steps"] == 4
    assert result["first_train_loss"] == pytest.approx(
        0.693147, abs=1e-4
    )  # the policy starts as the reference
    assert {"train_reward_margin", "eval_reward_margin", "eval_reward_accuracy"} <= set(result)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    assert any(e.tuneforge_type == "rewards" and e.data["step"] == 4 for e in events)
    # A resumable checkpoint was stored on the way, as for any training job.
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [2]
