"""The user CLI's spec building (flags, YAML/JSON files, overrides, bad input) and the SDK against a fake API
(httpx.MockTransport): error bodies, retries, Idempotency-Key, paging, the event stream, verified downloads."""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli import jobs_cli
from cli.jobs_cli import (
    SpecError,
    build_spec,
    load_spec_file,
    local_datasets,
    parse_assignments,
    parse_metadata,
    parse_target_modules,
    total_steps,
)
from cli.main import app
from tuneforge_sdk import APIConnectionError, ChecksumMismatch, Tuneforge, TuneforgeError

FILE_ID = "file-0123456789abcdef01234567"
runner = CliRunner()


# ------------------------------------------------------------------------------------------ spec building


def test_flags_build_a_nested_spec():
    spec = build_spec(
        model="tiny-llama",
        dataset=FILE_ID,
        validation_dataset="s3://bucket/valid.jsonl",
        method="dora",
        rank=8,
        alpha=16,
        dropout=0.1,
        target_modules="q_proj, v_proj",
        max_steps=40,
        learning_rate=1e-3,
        batch_size=2,
        max_seq_length=512,
        gpus=2,
        priority="high",
        metadata=["team=nlp", "run=a=b", "empty="],
    )
    assert spec == {
        "base_model": "tiny-llama",
        "dataset": FILE_ID,
        "validation_dataset": "s3://bucket/valid.jsonl",
        "method": "dora",
        "priority": "high",
        "adapter": {"rank": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "hyperparameters": {"learning_rate": 1e-3, "batch_size": 2, "max_seq_length": 512, "max_steps": 40},
        "resources": {"gpus": 2},
        "metadata": {"team": "nlp", "run": "a=b", "empty": ""},
    }


def test_only_given_flags_appear():
    assert build_spec(model="m", dataset=FILE_ID) == {"base_model": "m", "dataset": FILE_ID}


def test_yaml_file_with_flag_overrides(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(
        "base_model: from-file\n"
        "dataset: data/train.jsonl\n"
        "adapter: {rank: 16, alpha: 32, target_modules: attention}\n"
        "hyperparameters:\n  epochs: 3\n  learning_rate: 0.0002\n  packing: true\n"
        "metadata: {project: support, version: 2}\n"
    )
    base = load_spec_file(path)
    # A local path in the file is relative to the file's folder.
    assert base["dataset"] == str(tmp_path / "data" / "train.jsonl")
    spec = build_spec(base, model="from-flag", rank=4, max_steps=10, metadata=["project=other", "x=1"])
    assert spec["base_model"] == "from-flag"
    assert spec["adapter"] == {"rank": 4, "alpha": 32, "target_modules": "attention"}
    # --max-steps replaces the file's epochs (the API takes only one of them); the rest of the file stays.
    assert spec["hyperparameters"] == {"max_steps": 10, "learning_rate": 0.0002, "packing": True}
    assert spec["metadata"] == {"project": "other", "version": "2", "x": "1"}
    assert local_datasets(spec) == {"dataset": tmp_path / "data" / "train.jsonl"}
    # The file's dict is not modified.
    assert base["hyperparameters"]["epochs"] == 3


def test_epochs_flag_replaces_max_steps_of_the_file():
    spec = build_spec({"base_model": "m", "dataset": FILE_ID, "hyperparameters": {"max_steps": 9}}, epochs=2)
    assert spec["hyperparameters"] == {"epochs": 2}


def test_json_spec_file_and_remote_datasets_pass_through(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps({"base_model": "m", "dataset": FILE_ID, "validation_dataset": "file:///data/v.jsonl"})
    )
    spec = build_spec(load_spec_file(path))
    assert spec["dataset"] == FILE_ID and spec["validation_dataset"] == "file:///data/v.jsonl"
    assert local_datasets(spec) == {}
    assert local_datasets(build_spec(spec, dataset="s3://bucket/key.jsonl")) == {}


def test_set_overrides_any_field_with_yaml_values():
    spec = build_spec(
        {"base_model": "m", "dataset": FILE_ID},
        assignments=[
            "hyperparameters.warmup_ratio=0.1",
            "hyperparameters.lr_scheduler=cosine",
            "adapter.target_modules=[q_proj, k_proj]",
            "resources.cpu_offload=false",
        ],
    )
    assert spec["hyperparameters"] == {"warmup_ratio": 0.1, "lr_scheduler": "cosine"}
    assert spec["adapter"] == {"target_modules": ["q_proj", "k_proj"]}
    assert spec["resources"] == {"cpu_offload": False}


def test_merge_spec_needs_no_model_or_dataset(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("method: merge\nmerge:\n  sources: [{job_id: ftjob-a}, {job_id: ftjob-b}]\n")
    spec = build_spec(load_spec_file(path), priority="low")
    assert spec["method"] == "merge" and spec["priority"] == "low"


def test_metadata_and_target_module_parsing():
    assert parse_metadata(["a=1", "a=2", " b =x y"]) == {"a": "2", "b": "x y"}
    assert parse_metadata(None) == {}
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj,,v_proj") == ["q_proj", "v_proj"]
    assert parse_assignments(["a.b=3"]) == [(["a", "b"], 3)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_metadata(["novalue"]), "--metadata expects KEY=VALUE, got 'novalue'"),
        (lambda: parse_metadata(["=v"]), "--metadata expects KEY=VALUE"),
        (lambda: parse_target_modules(" , "), "--target-modules expects"),
        (lambda: parse_assignments(["adapter..rank=3"]), "--set expects FIELD.PATH=VALUE"),
        (lambda: parse_assignments(["adapter.rank"]), "--set expects FIELD.PATH=VALUE"),
        (lambda: build_spec(model="m", dataset=FILE_ID, epochs=1, max_steps=2), "not both"),
        (lambda: build_spec(dataset=FILE_ID), "needs a base model: --model"),
        (lambda: build_spec(model="m"), "needs a dataset: --dataset"),
        (lambda: build_spec(model="m", dataset=FILE_ID, method="sft"), "method 'sft' is not one of"),
        (lambda: build_spec({"adapter": 5}, model="m", dataset=FILE_ID, rank=3), "adapter must be a mapping"),
        (lambda: build_spec({"metadata": ["a"]}, model="m", dataset=FILE_ID), "metadata must be a mapping"),
        (lambda: local_datasets({"dataset": "missing.jsonl"}), "--dataset 'missing.jsonl': no such file"),
        (
            lambda: local_datasets({"validation_dataset": "nope/v.jsonl"}),
            "--validation-dataset 'nope/v.jsonl': no such file",
        ),
    ],
)
def test_bad_input_gives_clear_errors(call, message):
    with pytest.raises(SpecError) as raised:
        call()
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base_model: [unclosed", "is not valid YAML or JSON"),
        ("- a list\n- of things\n", "must hold a mapping of JobSpec fields, not a list"),
        ("dataset: 42\n", "dataset must be a string"),
    ],
)
def test_bad_spec_files(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec_file(path)
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec_file(tmp_path / "absent.yaml")


def test_timestamps_read_as_iso_text_or_unix_seconds():
    assert jobs_cli._when("2026-01-02T03:04:05.678+00:00") == "2026-01-02 03:04:05"
    assert jobs_cli._when(0) == "1970-01-01 00:00:00"
    assert jobs_cli._when(None) == "-"


def test_total_steps_from_max_steps_or_the_plan_schedule():
    assert total_steps({"hyperparameters": {"max_steps": 7, "epochs": None}}) == 7
    assert total_steps({"hyperparameters": {"epochs": 3}}) is None
    assert total_steps({"hyperparameters": {"epochs": 3}, "plan": {"schedule": {"total_steps": 12}}}) == 12


# ------------------------------------------------------------------------------------------ the commands


def test_submit_dry_run_prints_the_spec(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "x"}\n')
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("base_model: m\nhyperparameters: {epochs: 2}\n")
    result = runner.invoke(
        app,
        [
            "submit",
            "-f",
            str(spec_file),
            "-d",
            str(data),
            "--max-steps",
            "4",
            "--metadata",
            "k=v",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "base_model": "m",
        "hyperparameters": {"max_steps": 4},
        "dataset": str(data),
        "metadata": {"k": "v"},
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "m", "-d", FILE_ID, "--metadata", "oops"], "--metadata expects KEY=VALUE, got 'oops'"),
        (["-m", "m", "-d", "no/such.jsonl"], "no such file"),
        (["-m", "m", "-d", FILE_ID, "--priority", "urgent"], "--priority must be one of low, normal, high"),
        (["-d", FILE_ID], "needs a base model"),
        (["-m", "m", "-d", FILE_ID, "--epochs", "1", "--max-steps", "1"], "not both"),
    ],
)
def test_submit_bad_input_exits_2_without_a_traceback(args, message):
    result = runner.invoke(app, ["submit", *args, "--url", "http://127.0.0.1:9"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_submit_rank_below_one_is_refused_by_the_option():
    result = runner.invoke(app, ["submit", "-m", "m", "-d", FILE_ID, "--rank", "0"])
    assert result.exit_code == 2


def test_download_kind_is_checked():
    result = runner.invoke(app, ["download", "ftjob-x", "--kind", "checkpoint"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "--kind must be adapter or merged" in result.stderr


# ---------------------------------------------------------------------------------------------- the SDK


def error_body(status: int, code: str, message: str, param: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "param": param}})


def make_client(handler, **kwargs) -> Tuneforge:
    return Tuneforge("http://api.test", "tf_key", transport=httpx.MockTransport(handler), backoff=0, **kwargs)


def test_an_error_answer_raises_with_code_message_and_param():
    client = make_client(lambda request: error_body(422, "validation_error", "rank too big", "adapter.rank"))
    with pytest.raises(TuneforgeError) as raised:
        client.create_job({"base_model": "m"})
    error = raised.value
    assert (error.status_code, error.code, error.message, error.param) == (
        422,
        "validation_error",
        "rank too big",
        "adapter.rank",
    )
    assert str(error) == "rank too big [adapter.rank] (HTTP 422 validation_error)"


def test_a_non_json_error_is_quoted():
    client = make_client(lambda request: httpx.Response(404, text="<html>nope</html>"))
    with pytest.raises(TuneforgeError, match="GET /v1/jobs/x answered 404: <html>nope</html>") as raised:
        client.get_job("x")
    assert raised.value.code == "http_error"


def test_reads_retry_on_5xx_and_connection_errors_but_not_on_4xx():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return error_body(503, "storage_unavailable", "later")
        if request.url.path == "/v1/jobs/gone":
            return error_body(404, "not_found", "no such job")
        return httpx.Response(200, json={"id": "ftjob-1", "status": "running"})

    client = make_client(handler)
    assert client.get_job("ftjob-1")["status"] == "running"
    assert len(calls) == 3
    with pytest.raises(TuneforgeError, match="no such job"):
        client.get_job("gone")
    assert len(calls) == 4

    def down(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(APIConnectionError, match=r"no answer from http://api\.test"):
        make_client(down, retries=2).list_files()


def test_creates_send_one_idempotency_key_per_call_reused_on_retries():
    keys: list[str] = []

    def handler(request):
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) in (1, 3):
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(201, json={"id": f"ftjob-{len(keys)}", "status": "validating"})

    client = make_client(handler)
    client.create_job({"base_model": "m"})
    client.create_job({"base_model": "m"})
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    client.create_job({"base_model": "m"}, idempotency_key="mine")
    assert keys[-1] == "mine"


def test_a_create_waits_out_its_key_in_flight_and_a_non_json_answer_is_an_error():
    answers = [error_body(409, "conflict", "still being processed", "Idempotency-Key"), None]

    def handler(request):
        answer = answers.pop(0)
        return answer or httpx.Response(201, json={"id": "ftjob-1"})

    assert make_client(handler).create_job({"base_model": "m"})["id"] == "ftjob-1"
    with pytest.raises(TuneforgeError, match="not JSON") as raised:
        make_client(lambda request: httpx.Response(200, text="<html>")).get_job("j")
    assert raised.value.code == "bad_response"


def test_a_cancel_whose_answer_was_lost_is_retried_and_returns_the_job():
    calls = []

    def handler(request):
        calls.append(request.method)
        if request.method == "GET":
            return httpx.Response(200, json={"id": "j", "status": "cancelled"})
        if len(calls) == 1:
            raise httpx.ReadTimeout("lost", request=request)
        return error_body(409, "conflict", "job j already cancelled; nothing to cancel", "job_id")

    assert make_client(handler).cancel_job("j")["status"] == "cancelled"
    assert calls == ["POST", "POST", "GET"]
    with pytest.raises(TuneforgeError, match="already cancelled"):
        make_client(lambda r: error_body(409, "conflict", "job j already cancelled", "job_id")).cancel_job(
            "j"
        )


def test_upload_sends_the_whole_file_on_each_attempt(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    bodies = []

    def handler(request):
        bodies.append((request.headers["Idempotency-Key"], request.read()))
        if len(bodies) == 1:
            return error_body(503, "storage_unavailable", "later")
        return httpx.Response(201, json={"id": FILE_ID, "num_samples": 1})

    assert make_client(handler).upload_file(data)["id"] == FILE_ID
    assert bodies[0][0] == bodies[1][0]
    assert all(b'filename="train.jsonl"' in body and b'{"text": "a"}' in body for _, body in bodies)
    with pytest.raises(TuneforgeError, match="no such file"):
        make_client(handler).upload_file(tmp_path / "missing.jsonl")


def test_list_jobs_follows_cursors_and_stops_at_the_limit():
    pages = {
        None: {"data": [{"id": "j3"}, {"id": "j2"}], "has_more": True, "next_cursor": "c1"},
        "c1": {"data": [{"id": "j1"}], "has_more": False, "next_cursor": None},
    }
    seen = []

    def handler(request):
        seen.append(dict(request.url.params))
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    client = make_client(handler)
    assert [j["id"] for j in client.list_jobs(status="running", page_size=2)] == ["j3", "j2", "j1"]
    assert seen[0] == {"status": "running", "limit": "2"} and seen[1]["cursor"] == "c1"
    assert [j["id"] for j in client.list_jobs(limit=1)] == ["j3"]
    assert seen[-1]["limit"] == "1"


def test_follow_events_reads_the_stream_and_reconnects_without_repeats():
    events = [{"id": i, "type": "status", "message": f"event {i}"} for i in (1, 2, 3)]

    def sse(items, end=True):
        text = "".join(f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in items)
        return text + ('event: end\ndata: {"status": "succeeded"}\n\n' if end else "")

    bodies = [sse(events[:2], end=False), sse(events)]

    def handler(request):
        assert request.url.path == "/v1/jobs/j/events/stream"
        return httpx.Response(200, text=bodies.pop(0), headers={"content-type": "text/event-stream"})

    got = list(make_client(handler).follow_events("j"))
    assert [e["id"] for e in got] == [1, 2, 3]


def test_follow_events_by_polling():
    state = {"polls": 0}

    def handler(request):
        if request.url.path == "/v1/jobs/j":
            state["polls"] += 1
            return httpx.Response(
                200, json={"id": "j", "status": "succeeded" if state["polls"] > 1 else "running"}
            )
        after = int(request.url.params.get("after", 0))
        data = [{"id": i} for i in (1, 2) if i > after and (i == 1 or state["polls"] > 1)]
        return httpx.Response(200, json={"data": data, "has_more": False})

    got = list(make_client(handler).follow_events("j", stream=False, poll_interval=0))
    assert [e["id"] for e in got] == [1, 2]


def test_api_key_comes_from_the_embedded_default_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_URL", "http://from-env:1234/")
    assert Tuneforge().api_key is None
    (tmp_path / "api-key").write_text("tf_local_key\n")
    client = Tuneforge()
    assert client.api_key == "tf_local_key" and client.base_url == "http://from-env:1234"
    monkeypatch.setenv("TUNEFORGE_API_KEY", "tf_env_key")
    assert Tuneforge().api_key == "tf_env_key"
    assert Tuneforge(api_key="tf_explicit").api_key == "tf_explicit"


def test_the_sdk_imports_no_training_stack():
    import subprocess

    code = (
        "import sys, tuneforge_sdk; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _loaded_after(statement: str) -> dict[str, list[str]]:
    """Runs `statement` in a fresh interpreter; returns the top-level modules it loaded, stdlib ones apart."""
    import subprocess

    code = (
        f"import json, sys; {statement}; "
        "tops = {name.partition('.')[0] for name in sys.modules}; "
        "print(json.dumps({'all': sorted(tops), "
        "'third_party': sorted(t for t in tops if t not in sys.stdlib_module_names)}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout)


def test_the_sdk_package_needs_only_httpx_and_the_standard_library():
    loaded = _loaded_after("import tuneforge_sdk")
    with_httpx = _loaded_after("import httpx")
    assert "tuneforge_sdk" in loaded["all"]
    internal = {"shared", "api", "worker", "cli", "bench"}
    assert sorted(internal & set(loaded["all"])) == []
    # httpx loads its own optional command line (click, rich) when installed; nothing else may come in.
    heavy = {"torch", "fastapi", "sqlalchemy", "celery", "typer", "rich"}
    assert sorted(heavy & (set(loaded["all"]) - set(with_httpx["all"]))) == []
    assert sorted(set(loaded["third_party"]) - set(with_httpx["third_party"])) == ["tuneforge_sdk"]
    # And in the source: the SDK's own imports are the standard library, httpx and itself.
    package = Path(__file__).resolve().parents[2] / "tuneforge_sdk"
    imported = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add((node.module or "").partition(".")[0])
    assert sorted(imported - set(sys.stdlib_module_names) - {"httpx", "tuneforge_sdk"}) == []


# ------------------------------------------------------------------------------------------ downloads


ADAPTER = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00weights" * 100}
SUMS = {name: hashlib.sha256(data).hexdigest() for name, data in ADAPTER.items()}


def make_tar(root: str, files: dict[str, bytes], sums: dict[str, str] | None = None, extra=()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        sums = sums or {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        listing = "".join(f"{sha}  {name}\n" for name, sha in sums.items()).encode()
        for name, data in [*files.items(), ("SHA256SUMS", listing), *extra]:
            info = tarfile.TarInfo(name if name.startswith(("/", "..")) else f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def artifact_server(tar: bytes, recorded: dict[str, bytes] = ADAPTER):
    listing = {
        "data": [
            {"kind": "adapter", "name": n, "size_bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in recorded.items()
        ]
    }

    def handler(request):
        if request.url.path == "/v1/jobs/j/artifacts":
            return httpx.Response(200, json=listing)
        assert request.url.path == "/v1/jobs/j/artifacts/adapter.tar"
        return httpx.Response(200, content=tar)

    return handler


def test_download_extracts_and_verifies(tmp_path):
    client = make_client(artifact_server(make_tar("j-adapter", ADAPTER)))
    folder = client.download_adapter("j", tmp_path / "out")
    assert folder == tmp_path / "out" / "j-adapter"
    for name, data in ADAPTER.items():
        assert (folder / name).read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["j-adapter"]  # no staging left
    with pytest.raises(TuneforgeError, match="already exists") as raised:
        client.download_adapter("j", tmp_path / "out")
    assert raised.value.code == "already_exists"
    assert client.download_adapter("j", tmp_path / "out", overwrite=True) == folder


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (
            make_tar("j-adapter", {**ADAPTER, "adapter_config.json": b'{"r": 9}'}),
            "adapter_config.json: sha256",
        ),
        (make_tar("j-adapter", {"adapter_config.json": ADAPTER["adapter_config.json"]}), "missing"),
        (
            make_tar("j-adapter", ADAPTER, sums={"adapter_config.json": "0" * 64}),
            "SHA256SUMS does not match",
        ),
        (
            make_tar("j-adapter", {**ADAPTER, "extra.bin": b"x"}, sums=SUMS),
            "files the API does not list: extra.bin",
        ),
        (make_tar("j-adapter", ADAPTER, extra=[("../evil", b"x")]), "unexpected member '../evil'"),
        (make_tar("j-adapter", ADAPTER)[:1500], "adapter_model.safetensors: missing"),  # cut between files
        (make_tar("j-adapter", ADAPTER)[:1700], "not a complete tar archive"),  # cut inside a file
    ],
)
def test_a_tampered_download_raises_and_leaves_nothing(tmp_path, tar, message):
    client = make_client(artifact_server(tar), retries=0)
    with pytest.raises(ChecksumMismatch, match=message):
        client.download_adapter("j", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "evil").exists()


def test_cli_prints_the_api_message_and_exits_1(monkeypatch):
    handler = functools.partial(lambda request: error_body(404, "not_found", "job ftjob-x [gone]", "job_id"))
    monkeypatch.setattr(
        jobs_cli, "Tuneforge", functools.partial(Tuneforge, transport=httpx.MockTransport(handler), backoff=0)
    )
    result = runner.invoke(app, ["status", "ftjob-x", "--once"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "error: job ftjob-x [gone] (param: job_id) (HTTP 404, not_found)" in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_cli_download_through_the_sdk(tmp_path, monkeypatch):
    transport = httpx.MockTransport(artifact_server(make_tar("j-adapter", ADAPTER)))
    monkeypatch.setattr(jobs_cli, "Tuneforge", functools.partial(Tuneforge, transport=transport, backoff=0))
    result = runner.invoke(app, ["download", "j", "--dest", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "downloaded 2 files" in result.stdout and "sha256 verified" in result.stdout
    assert Path(tmp_path / "j-adapter" / "adapter_config.json").read_bytes() == ADAPTER["adapter_config.json"]
