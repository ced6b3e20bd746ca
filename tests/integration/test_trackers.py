"""A training job's run logged where teams keep theirs: a real MLflow tracking server (started by the tests),
W&B in offline mode (its run file read back as W&B's own records), and TensorBoard event files; with the
evaluation (base model's and adapter's answers, validation perplexity before and after) the recipe makes when
training ends. A tracker that is down neither fails nor slows the job, and the job says what it did not log.

The recipe runs in this process on the tiny model, its reporter wrapped by the trackers as the training
process wraps it (worker/launch.py); tests/e2e/test_console.py runs a job with an MLflow integration through a
real worker."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from cli.local_service import free_port
from shared.datasets import DatasetFormat, DatasetSummary
from shared.schemas import JobSpec
from shared.settings import Settings
from tests.conftest import TINY_MODEL
from tests.helpers import color_messages
from tests.trackers_files import tensorboard_scalars, wandb_run
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.trackers import job_trackers

STEPS = 16
PROMPTS = ["What color is sky?", "Color of snow?"]


class Reporter:
    """The job's reporter, as the attempt writer would be: keeps events and metric points, and how long each
    metric call took (the trackers must never make the training loop wait)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict]] = []
        self.points: list[tuple[str, int, dict]] = []

    def event(self, type, message, *, level="info", data=None) -> None:
        self.events.append((type, level, message, data or {}))

    def metric(self, split, step, values) -> None:
        self.points.append((split, step, values))

    def of(self, type: str) -> list[tuple[str, str, str, dict]]:
        return [e for e in self.events if e[0] == type]


class Timed:
    """The reporter the recipe sees: times each metric call of the wrapped (tracked) reporter."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.slowest = 0.0

    def event(self, *args, **kwargs) -> None:
        self.inner.event(*args, **kwargs)

    def metric(self, split, step, values) -> None:
        started = time.perf_counter()
        self.inner.metric(split, step, values)
        self.slowest = max(self.slowest, time.perf_counter() - started)


def train(settings: Settings, spec: JobSpec, job_id: str, model_dir: Path, work_dir: Path, timeout: float):
    reporter = Reporter()
    trackers = job_trackers(settings, spec, job_id, work_dir)
    assert trackers is not None
    timed = Timed(trackers.reporting_to(reporter))
    train_rows, validation = color_messages(48), color_messages(8, seed=1)
    ctx = TrainingContext(
        job_id=job_id,
        spec=spec,
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=timed,
        should_stop=lambda: False,
        train_data=DatasetSummary(DatasetFormat.messages, 48, 48, records=train_rows),
        eval_data=DatasetSummary(DatasetFormat.messages, 8, 8, records=validation),
    )
    result = recipe_for(spec.method)(ctx).run()
    closing = time.monotonic()
    trackers.close(
        reporter, timeout=timeout, succeeded=True, metrics=result.metrics, adapter_dir=result.output_dir
    )
    return result, reporter, timed.slowest, time.monotonic() - closing, trackers


def spec_with(integrations: list[dict], **extra) -> JobSpec:
    return JobSpec(
        base_model=TINY_MODEL,
        dataset="file-train",
        validation_dataset="file-validation",
        adapter={"rank": 8, "alpha": 16, "dropout": 0.0},
        hyperparameters={"max_steps": STEPS, "learning_rate": 1e-2, "batch_size": 8, "logging_steps": 1},
        integrations=integrations,
        **extra,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_goes_to_mlflow_wandb_and_tensorboard_with_its_evaluation(
    settings, tiny_model_dir, mlflow_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    deployment = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server, "wandb_mode": "offline"})
    spec = spec_with(
        [
            {"type": "mlflow", "mlflow": {"experiment": "tuneforge-tests", "run_name": "colors"}},
            {"type": "wandb", "wandb": {"project": "tuneforge-tests", "name": "colors", "tags": ["tiny"]}},
        ],
        eval_prompts=PROMPTS,
        eval_samples=2,
    )
    job_id = f"ftjob-trackers{int(time.time())}"
    result, reporter, _, _, trackers = train(deployment, spec, job_id, tiny_model_dir, tmp_path, timeout=120)
    losses = {step: values["loss"] for split, step, values in reporter.points if split == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    logged = {e[3]["tracker"]: e for e in reporter.of("tracker")}
    assert {name: e[1] for name, e in logged.items()} == {
        "tensorboard": "info",
        "mlflow": "info",
        "wandb": "info",
    }

    # MLflow: the parameters, every step's loss, the final metrics and the adapter's files, in one finished run.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tuneforge-tests")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`tuneforge.job_id` = '{job_id}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "colors"
    assert logged["mlflow"][3]["run_id"] == run.info.run_id
    assert run.data.params["hyperparameters.learning_rate"] == "0.01"
    assert run.data.params["adapter.rank"] == "8" and run.data.params["job_id"] == job_id
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses)
    for name in ("final_train_loss", "validation_perplexity_before", "validation_perplexity_after"):
        assert run.data.metrics[name] == pytest.approx(result.metrics[name])
    assert run.data.tags["tuneforge.adapter"] == f"/v1/jobs/{job_id}/artifacts/adapter.tar"
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in stored and "adapter/adapter_config.json" in stored
    copy = Path(
        client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path))
    )
    assert sha256(copy) == sha256(result.output_dir / "adapter_model.safetensors")

    # W&B, offline: the run file holds the run's name and tags, each step's loss, the summary and the adapter.
    (folder,) = (tmp_path / "wandb-runs" / "wandb").glob(f"offline-run-*-{job_id}")
    wandb = wandb_run(folder)
    assert (wandb["run"].project, wandb["run"].display_name, list(wandb["run"].tags)) == (
        "tuneforge-tests",
        "colors",
        ["tiny"],
    )
    steps = {row["_step"]: row["train/loss"] for row in wandb["history"] if "train/loss" in row}
    assert steps == pytest.approx(losses)
    assert wandb["summary"]["final_train_loss"] == pytest.approx(result.metrics["final_train_loss"])
    (artifact,) = wandb["artifacts"]
    assert artifact["name"] == f"adapter-{job_id}" and artifact["type"] == "model"
    assert "adapter_model.safetensors" in artifact["files"]

    # TensorBoard: one scalar per step and metric, and the final metrics.
    scalars = tensorboard_scalars(trackers.tensorboard_dir)
    assert dict(scalars["train/loss"]) == pytest.approx(losses, rel=1e-6)
    assert scalars["result/final_train_loss"][0][1] == pytest.approx(
        result.metrics["final_train_loss"], rel=1e-6
    )

    # The evaluation: both models answered every prompt; the adapter lowered the validation perplexity.
    evaluation = json.loads((result.extras["evaluation"] / "samples.json").read_text())
    assert [s["source"] for s in evaluation["samples"]] == ["eval_prompts"] * 2 + ["validation"] * 2
    assert [s["prompt"] for s in evaluation["samples"][:2]] == PROMPTS
    assert all(s["reference"] for s in evaluation["samples"][2:])
    assert any(s["base"] != s["adapter"] for s in evaluation["samples"])
    before, after = (
        result.metrics["validation_perplexity_before"],
        result.metrics["validation_perplexity_after"],
    )
    assert math.isfinite(before) and after < 0.8 * before
    assert evaluation["perplexity"] == {"before": before, "after": after, "samples": 8}
    assert reporter.of("evaluation")


def test_a_tracker_that_is_down_neither_fails_nor_slows_the_job(
    settings, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    closed = free_port()  # nothing listens there
    deployment = settings.model_copy(
        update={
            "mlflow_tracking_uri": f"http://tracker:very-secret@127.0.0.1:{closed}",
            "wandb_api_key": SecretStr("k" * 40),
            "wandb_base_url": f"http://127.0.0.1:{closed}",
            "wandb_mode": "online",
        }
    )
    spec = spec_with([{"type": "mlflow"}, {"type": "wandb", "wandb": {"project": "down"}}])
    timeout = 15.0
    result, reporter, slowest, closing, _ = train(
        deployment, spec, "ftjob-trackers-down", tiny_model_dir, tmp_path, timeout=timeout
    )

    # The job trained to the end; no metric call waited for a tracker; closing waited at most the deadline.
    assert result.metrics["steps"] == STEPS
    assert slowest < 0.05, slowest
    assert closing < timeout + 3
    warnings = {e[3]["tracker"]: e for e in reporter.of("tracker") if e[1] == "warning"}
    assert set(warnings) == {"mlflow", "wandb"}
    points = len(reporter.points)  # training steps and evaluations
    for name, (_, _, message, data) in warnings.items():
        expected = (
            f"{name} did not log the parameters, {points} metric points, the final metrics, the adapter: "
        )
        assert message.startswith(expected), message
        assert data["metric_points_not_logged"] == points and data["adapter"] is False
        # Credentials never reach an event.
        assert "very-secret" not in message and "k" * 40 not in message
    assert "refused" in warnings["mlflow"][2].lower() or "did not answer" in warnings["mlflow"][2]
    # TensorBoard, on the local disk, logged everything.
    assert [e[1] for e in reporter.of("tracker") if e[3]["tracker"] == "tensorboard"] == ["info"]
