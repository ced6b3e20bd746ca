"""Nothing on the training step path that is not training, and each job's efficiency on record: metrics and
events leave through the attempt writer's background thread (batched, fenced, none lost while the database
is away), checkpoints upload while the next steps run and are recorded only once stored, tokenized datasets
are cached, and a finished job reports tokens/s, its model FLOPs utilization and where the time went.

Real PostgreSQL (reached through a TCP relay the tests can cut), S3 (SeaweedFS) and the tiny Llama."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest
from sqlalchemy import select, update

from shared.datasets import DatasetFormat, DatasetSummary
from shared.db import session_scope
from shared.models import Checkpoint, Job, JobEvent, JobMetric
from shared.planning import ModelShape, adapter_parameters
from shared.schemas import JobSpec
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.storage import ObjectStore
from shared.tenancy import TeamID
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages, color_prompt_completion, to_jsonl, upload_dataset
from worker import runner, validation
from worker.checkpoints import CheckpointUploader
from worker.reporting import AttemptWriter
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.tokenized import cache_key, cached_tokenize


class Relay:
    """A TCP relay to PostgreSQL that can be cut (every connection dropped, new ones refused) and restored:
    the database going away and coming back, for one client only."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.links: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if not self.open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.links += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def cut(self) -> None:
        self.open.clear()
        for link in self.links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
        self.links.clear()

    def restore(self) -> None:
        self.open.set()


def running_job(settings, store, attempt: int = 1) -> str:
    """A job held by attempt `attempt`, as a claim leaves it."""
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(16))).id
        job_id = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=TeamID("team-default"),
            spec=JobSpec(base_model=TINY_MODEL, dataset=dataset),
        ).id
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.running.value, attempt=attempt)
        )
    return job_id


def metric_steps(settings, job_id: str) -> list[int]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step))
        )


def events_of(settings, job_id: str, type: str) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == type)).all()
        session.expunge_all()
        return list(rows)


# --------------------------------------------------------------------------------- the background writer


def writer_through_relay(settings, job_id: str) -> tuple[Relay, AttemptWriter]:
    """An attempt's writer whose database connections go through a relay the test can cut and restore."""
    url = settings.database_url
    host, port = url.split("@", 1)[1].split("/", 1)[0].split(":")
    relay = Relay(host, int(port))
    through_relay = settings.model_copy(
        update={"database_url": url.replace(f"{host}:{port}", f"127.0.0.1:{relay.port}")}
    )
    return relay, AttemptWriter(through_relay, job_id, 1)


def test_points_wait_in_the_background_while_the_database_is_away_and_none_is_lost(settings, store):
    job_id = running_job(settings, store)
    relay, writer = writer_through_relay(settings, job_id)
    writer.start_background()
    for step in range(1, 6):
        writer.metric("train", step, {"loss": 1.0 / step})
    writer.flush()
    assert metric_steps(settings, job_id) == [1, 2, 3, 4, 5]

    relay.cut()
    # The training loop goes on: each call returns at once, the points wait in the writer's queue.
    for step in range(6, 41):
        writer.metric("train", step, {"loss": 1.0 / step})
    writer.event("dataset", "queued while the database was away")
    assert metric_steps(settings, job_id) == [1, 2, 3, 4, 5]
    relay.restore()
    writer.flush(timeout=60)
    assert metric_steps(settings, job_id) == list(range(1, 41))
    assert [e.message for e in events_of(settings, job_id, "dataset")] == [
        "queued while the database was away"
    ]


def test_a_checkpoint_waits_for_the_points_queued_before_it_not_for_later_ones(settings, store):
    # What a checkpoint's record waits for (CheckpointUploader.store_and_record): every point queued before it
    # (a resumed attempt starts after the checkpoint and never logs them again), but not the points a training
    # loop keeps queuing meanwhile.
    job_id = running_job(settings, store)
    relay, writer = writer_through_relay(settings, job_id)
    writer.start_background()
    writer.metric("train", 1, {"loss": 1.0})
    writer.flush()
    relay.cut()
    for step in range(2, 21):
        writer.metric("train", step, {"loss": 1.0 / step})
    seen_when_done: list[list[int]] = []
    flushing = threading.Thread(
        target=lambda: (
            writer.flush_queued(timeout=60),
            seen_when_done.append(metric_steps(settings, job_id)),
        )
    )
    flushing.start()
    flushing.join(timeout=1.0)
    assert flushing.is_alive()  # the database is away: the points before it are not written yet
    stop = threading.Event()

    def keep_logging() -> None:  # the training loop goes on, a point every 10 ms, all through the flush
        step = 21
        while not stop.wait(0.01):
            writer.metric("train", step, {"loss": 0.01})
            step += 1

    loop = threading.Thread(target=keep_logging)
    loop.start()
    try:
        relay.restore()
        flushing.join(timeout=60)
        assert not flushing.is_alive()
    finally:
        stop.set()
        loop.join(timeout=10)
    assert seen_when_done and seen_when_done[0][:20] == list(range(1, 21))
    writer.flush(timeout=60)


def test_a_stale_attempt_writes_nothing_from_the_background(settings, store):
    job_id = running_job(settings, store, attempt=2)
    stale = AttemptWriter(settings, job_id, 1)
    stale.start_background()
    stale.metric("train", 1, {"loss": 2.0})
    stale.event("model", "from an attempt that lost the job")
    stale.flush()
    assert stale.lost.is_set()
    assert metric_steps(settings, job_id) == []
    assert events_of(settings, job_id, "model") == []


# ---------------------------------------------------------------------------- checkpoints beside training


class GatedStore:
    """The tests' S3, whose uploads wait until the gate opens: a slow upload, to see what training does
    meanwhile."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def put_tree(self, prefix, folder, *, bucket=None):
        self.gate.wait(timeout=120)
        return self.inner.put_tree(prefix, folder, bucket=bucket)


class Steps:
    """A reporter that, at the last step, notes whether a checkpoint was recorded yet, then opens the gate."""

    def __init__(self, settings, job_id: str, store: GatedStore, last: int) -> None:
        self.settings, self.job_id, self.store, self.last = settings, job_id, store, last
        self.steps: list[int] = []
        self.recorded_at_last_step: int | None = None
        self.gate_closed_at_last_step: bool | None = None

    def event(self, type, message, *, level="info", data=None) -> None:
        pass

    def metric(self, split, step, values) -> None:
        self.steps.append(step)
        if step == self.last:
            self.gate_closed_at_last_step = not self.store.gate.is_set()
            with session_scope(self.settings.database_url) as session:
                self.recorded_at_last_step = len(
                    session.scalars(select(Checkpoint).where(Checkpoint.job_id == self.job_id)).all()
                )
            self.store.gate.set()


def test_training_goes_on_while_a_checkpoint_uploads_and_it_is_recorded_once_stored(
    settings, store, tiny_model_dir, tmp_path
):
    job_id = running_job(settings, store)
    writer = AttemptWriter(settings, job_id, 1)
    gated = GatedStore(store)
    uploader = CheckpointUploader(gated, writer, "team-default", staging=tmp_path / "uploads")
    reporter = Steps(settings, job_id, gated, last=8)
    rows = color_prompt_completion(32)
    ctx = TrainingContext(
        job_id=job_id,
        spec=JobSpec(
            base_model=TINY_MODEL,
            dataset="unused",
            hyperparameters={"max_steps": 8, "batch_size": 4, "checkpoint_steps": 3},
        ),
        model_dir=tiny_model_dir,
        work_dir=tmp_path,
        reporter=reporter,
        should_stop=lambda: False,
        train_data=DatasetSummary(DatasetFormat.prompt_completion, len(rows), len(rows), records=rows),
        checkpoints=uploader,
    )
    recipe = recipe_for(ctx.spec.method)(ctx)
    try:
        recipe.setup()
        recipe.train()  # returns once the last checkpoint handed over is stored and recorded
    finally:
        recipe.cleanup()
    # Steps 4 to 8 ran while the checkpoint of step 3 was still uploading, and nothing was recorded before its
    # files were stored.
    assert reporter.steps == list(range(1, 9))
    assert reporter.gate_closed_at_last_step is True and reporter.recorded_at_last_step == 0
    with session_scope(settings.database_url) as session:
        recorded = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert sorted(c.step for c in recorded) == [3, 6]
        assert all(c.num_files >= 5 for c in recorded)
    assert recipe.progress.timings["checkpoint_upload"] > 0
    assert not list((tmp_path / "uploads").iterdir())  # staged folders are removed once stored


# ------------------------------------------------------------------------------------ tokenized datasets


def test_a_tokenized_dataset_is_cached_by_its_data_tokenizer_length_and_packing(tiny_model_dir, tmp_path):
    from worker.training.adapters import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = color_messages(12)

    def tokenized(digest="a" * 64, max_length=64, packing=False, tok=tokenizer):
        return cached_tokenize(
            rows,
            DatasetFormat.messages,
            tok,
            max_length,
            packing=packing,
            cache_dir=tmp_path,
            dataset_sha256=digest,
        )

    first = tokenized()
    again = tokenized()
    assert not first.cached and again.cached
    assert again.dataset.to_dict() == first.dataset.to_dict() and again.lengths == first.lengths
    # Another dataset, length, packing or chat template each tokenize anew.
    assert not tokenized(digest="b" * 64).cached
    assert not tokenized(max_length=32).cached
    packed = tokenized(packing=True, max_length=128)
    assert not packed.cached and len(packed.dataset) < len(rows)
    assert tokenized(packing=True, max_length=128).cached
    other = load_tokenizer(tiny_model_dir)
    other.chat_template = other.chat_template.replace("\n", "\n\n")
    assert not tokenized(tok=other).cached
    assert len(list((tmp_path / "tokenized").iterdir())) == 5


# ------------------------------------------------------------------------------------- the job's efficiency


def test_a_finished_job_reports_tokens_per_second_mfu_and_where_the_time_went(
    settings, store, tiny_model_dir
):
    with session_scope(settings.database_url) as session:
        dataset = upload_dataset(session, settings, store, to_jsonl(color_messages(24, seed=5))).id
        job_id = job_service.create_job(
            session=session,
            settings=settings,
            store=store,
            team_id=TeamID("team-default"),
            spec=JobSpec(
                base_model=TINY_MODEL,
                dataset=dataset,
                hyperparameters={"max_steps": 4, "checkpoint_steps": 2},
            ),
        ).id
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    assert runner.run_job(settings, job_id) is JobStatus.succeeded
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        result, spec, tokens = job.result, JobSpec.model_validate(job.spec), job.trained_tokens
        digests = job.input_digests
    times = result["time_seconds"]
    assert {
        "startup",
        "tokenize",
        "load",
        "train",
        "checkpoint",
        "checkpoint_upload",
        "save",
        "upload",
    } <= set(times)
    assert all(seconds >= 0 for seconds in times.values()) and times["train"] > 0
    # FLOPs per token = 4N + 6P + 12·L·s·d + 4·h·V, from the model's config and the adapter the spec asks for.
    config = json.loads((tiny_model_dir / "config.json").read_text())
    shape = ModelShape.from_config(config)
    frozen = shape.linear_parameters() + shape.norm_parameters()
    trainable = adapter_parameters(spec, shape)
    s = result["mean_sample_tokens"]
    expected = (
        4 * frozen
        + 6 * trainable
        + 12 * shape.num_hidden_layers * s * shape.q_dim
        + 4 * shape.hidden_size * shape.vocab_size
    )
    assert result["flops_per_token"] == pytest.approx(expected, rel=1e-3)
    assert result["device_peak_source"] == "measured" and result["device_peak_flops"] > 0
    mfu = tokens * result["flops_per_token"] / result["train_runtime_seconds"] / result["device_peak_flops"]
    assert result["mfu"] == pytest.approx(mfu, rel=1e-2)
    assert result["tokens_per_second"] == pytest.approx(tokens / result["train_runtime_seconds"], rel=1e-2)
    # The measured peak is kept for the next job on this machine.
    assert any(
        key.startswith("peak/") for key in json.loads((settings.cache_dir / "efficiency.json").read_text())
    )
    [event] = events_of(settings, job_id, "efficiency")
    assert event.data["mfu"] == result["mfu"] and event.data["time_seconds"] == times
    assert "tokens/s" in event.message and "model FLOPs utilization" in event.message
    [kernels] = events_of(settings, job_id, "kernels")
    assert kernels.data["attn_implementation"] == "sdpa" and kernels.data["fused_adamw"] is True
    # The tokenized dataset stays for retries, resumes and other jobs on the same data, under its sha256.
    from worker.training.adapters import load_tokenizer

    key = cache_key(
        dataset_sha256=digests["dataset"],
        tokenizer=load_tokenizer(tiny_model_dir),
        fmt=DatasetFormat.messages,
        max_length=spec.hyperparameters.seq_length,
        packing=False,
    )
    assert (settings.cache_dir / "tokenized" / key / "tokenized.json").is_file()


# --------------------------------------------------------------------------------------- the fast path's options


@pytest.mark.parametrize(
    ("option", "value"),
    [("liger_kernel", True), ("bf16", True), ("attn_implementation", "flash_attention_2")],
)
def test_an_option_the_workers_lack_is_a_422_naming_it(api_client, option, value):
    body = {"base_model": TINY_MODEL, "dataset": "file-unchecked", "hyperparameters": {option: value}}
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == f"hyperparameters.{option}" and "workers offer: none" in error["message"]
