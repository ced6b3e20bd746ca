"""Where a training job's run is also logged: TensorBoard event files (every training job, stored as its
`tensorboard` artifact) and the experiment trackers the job names in `integrations` (MLflow, W&B): its
parameters, each logged step's metrics, the final metrics and the adapter.

Each tracker is fed by a thread of its own through a bounded queue: the training loop only appends to the
queue, never waits for a tracker, and a full queue drops (and counts) rather than blocks. A tracker that fails
takes nothing more. When training ends, `close` waits at most `tracker_timeout_seconds` for every tracker
together, then names in one job event per tracker what it did not take (and why): a tracker that is down never
fails or slows the job.

MLflow and W&B run in a child process of their own (`python -m worker.training.trackers`, spoken to in JSON
lines): their imports and network calls never take the training process's CPU or interpreter lock, and one that
hangs is killed at the deadline, with whatever it started (W&B's service), instead of holding the training
process's exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.schemas import Integration, JobSpec
from shared.settings import Settings

log = logging.getLogger(__name__)
# Entries a tracker may fall behind by before new ones are dropped (and counted): a slow tracker never makes
# the training loop wait, nor grows without bound.
QUEUE_CAPACITY = 50_000
# What a job's adapter is downloadable as, from the Tuneforge API.
ADAPTER_PATH = "/v1/jobs/{job_id}/artifacts/adapter.tar"
_STOP = object()


class Reporter(Protocol):
    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None: ...

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None: ...


@dataclass
class Point:
    """One logged step of one split, with the time it was logged."""

    split: str
    step: int
    values: dict[str, float]
    at: float


class Tracker(Protocol):
    """One place a run is logged to. Its methods run on the tracker's own thread, in this order: start,
    params, metrics (any number of times), finish."""

    name: str

    def start(self) -> None: ...

    def params(self, values: dict[str, Any]) -> None: ...

    def metrics(self, points: list[Point]) -> None: ...

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None: ...

    def location(self) -> dict[str, Any]:
        """Where the run can be found (its id, its URL or folder), for the job's event."""
        ...


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (booleans and text left out)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def flat_params(spec: JobSpec, job_id: str) -> dict[str, Any]:
    """The job's settings as flat `section.name` parameters (lists and empty values left out)."""
    params: dict[str, Any] = {"job_id": job_id}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif value is not None and not isinstance(value, list) and value != {}:
            params[prefix] = value

    dumped = spec.model_dump(mode="json", exclude={"integrations", "eval_prompts"})
    walk("", dumped)
    if spec.eval_prompts:
        params["eval_prompts"] = len(spec.eval_prompts)
    return params


def _scrub(message: str, secrets: Iterable[str]) -> str:
    # Credentials never reach an event or a log: neither a URL's user:password nor a configured key.
    message = re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", message)
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message[:500]


@dataclass
class Untaken:
    """What one tracker did not log."""

    params: bool = False
    points: int = 0
    final_metrics: bool = False
    adapter: bool = False
    dropped: int = 0  # points dropped while its queue was full

    def any(self) -> bool:
        return self.params or self.points > 0 or self.final_metrics or self.adapter

    def describe(self) -> str:
        parts = ["the parameters"] if self.params else []
        if self.points:
            parts.append(f"{self.points} metric point{'s' if self.points != 1 else ''}")
        if self.final_metrics:
            parts.append("the final metrics")
        if self.adapter:
            parts.append("the adapter")
        return ", ".join(parts)


@dataclass
class Relay:
    """A tracker's thread and queue."""

    tracker: Tracker
    secrets: tuple[str, ...] = ()
    capacity: int = QUEUE_CAPACITY
    untaken: Untaken = field(default_factory=Untaken)
    error: str | None = None
    started: bool = False

    def __post_init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.capacity)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"tracker-{self.tracker.name}", daemon=True)
        self._thread.start()

    def put(self, kind: str, *payload: Any) -> None:
        """Queues an entry; never waits (a full queue drops the point and counts it)."""
        try:
            self._queue.put_nowait((kind, payload))
        except queue.Full:
            with self._lock:
                self._count(kind, payload)
                self.untaken.dropped += kind == "point"

    def _count(self, kind: str, payload: tuple[Any, ...]) -> None:
        if kind == "params":
            self.untaken.params = True
        elif kind == "point":
            self.untaken.points += 1
        elif kind == "finish":
            metrics, adapter_dir, _ = payload
            self.untaken.final_metrics = bool(metrics)
            self.untaken.adapter = adapter_dir is not None

    def _fail(self, exc: BaseException) -> None:
        described = str(exc) if isinstance(exc, TrackerError) else f"{type(exc).__name__}: {exc}"
        self.error = _scrub(described, self.secrets)
        log.warning(
            "tracker %s failed; it takes nothing more from this job: %s", self.tracker.name, self.error
        )

    def _run(self) -> None:
        try:
            self.tracker.start()
            self.started = True
        except BaseException as exc:
            self._fail(exc)
        while True:
            kind, payload = self._queue.get()
            if kind is _STOP:
                return
            if self.error is not None:
                with self._lock:
                    self._count(kind, payload)
                continue
            try:
                if kind == "params":
                    self.tracker.params(*payload)
                elif kind == "point":
                    # Points queued meanwhile go in the same call (a tracker takes them in batches).
                    points = [payload[0]]
                    while len(points) < 1000:
                        try:
                            nxt_kind, nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt_kind != "point":
                            self._queue_front(nxt_kind, nxt)
                            break
                        points.append(nxt[0])
                    try:
                        self.tracker.metrics(points)
                    except BaseException:
                        with self._lock:
                            self.untaken.points += len(points)
                        raise
                elif kind == "finish":
                    self.tracker.finish(*payload)
            except BaseException as exc:
                if kind != "point":
                    with self._lock:
                        self._count(kind, payload)
                self._fail(exc)

    def _queue_front(self, kind: Any, payload: Any) -> None:
        # Only this thread takes from the queue, so what comes after the batch is handled right after it.
        with self._queue.mutex:
            self._queue.queue.appendleft((kind, payload))

    def close(self, deadline: float) -> None:
        """Asks the thread to stop after what is queued, and waits until `deadline` (time.monotonic())."""
        with contextlib.suppress(queue.Full):
            self._queue.put((_STOP, ()), timeout=max(deadline - time.monotonic(), 0.01))
        self._thread.join(max(deadline - time.monotonic(), 0))
        if self._thread.is_alive():
            abandon = getattr(self.tracker, "abandon", None)
            if abandon is not None:
                abandon()
            with self._lock:
                if self.error is None:
                    self.error = "it did not answer in time"
                # Whatever is still queued (and the call in progress) was not taken.
                while True:
                    try:
                        kind, payload = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if kind is not _STOP:
                        self._count(kind, payload)


class Trackers:
    """The trackers of one training process (rank 0), and the reporter that feeds them."""

    def __init__(self, relays: list[Relay], spec: JobSpec, job_id: str, tensorboard_dir: Path | None) -> None:
        self.relays = relays
        self.tensorboard_dir = tensorboard_dir
        self.closed = False
        self.put("params", flat_params(spec, job_id))

    def put(self, kind: str, *payload: Any) -> None:
        for relay in self.relays:
            relay.put(kind, *payload)

    def metric(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Queues one logged step for every tracker (never waits)."""
        found = numbers(values)
        if found:
            self.put("point", Point(split, step, found, time.time()))

    def reporting_to(self, reporter: Reporter) -> TrackedReporter:
        return TrackedReporter(reporter, self)

    def close(
        self,
        reporter: Reporter,
        *,
        timeout: float,
        succeeded: bool,
        metrics: dict[str, Any] | None = None,
        adapter_dir: Path | None = None,
    ) -> None:
        """Hands the final metrics and the adapter to every tracker, waits up to `timeout` seconds for all of
        them together, and reports where each run is, or what each did not log."""
        if self.closed:
            return
        self.closed = True
        self.put("finish", numbers(metrics or {}), adapter_dir, succeeded)
        deadline = time.monotonic() + timeout
        for relay in self.relays:
            relay.close(deadline)
        for relay in self.relays:
            name = relay.tracker.name
            untaken = relay.untaken
            if relay.error is None and not untaken.any():
                if relay.started:
                    where = _safe_location(relay)
                    reporter.event(
                        "tracker",
                        f"logged to {name}" + (f": {where['label']}" if where.get("label") else ""),
                        data={"tracker": name, **where},
                    )
                continue
            what = untaken.describe() or "nothing more"
            reason = relay.error or "its queue was full"
            reporter.event(
                "tracker",
                f"{name} did not log {what}: {reason}",
                level="warning",
                data={
                    "tracker": name,
                    "params": not untaken.params,
                    "metric_points_not_logged": untaken.points,
                    "metric_points_dropped": untaken.dropped,
                    "final_metrics": not untaken.final_metrics,
                    "adapter": not untaken.adapter,
                    "error": reason,
                },
            )


def _safe_location(relay: Relay) -> dict[str, Any]:
    try:
        return relay.tracker.location()
    except Exception:
        return {}


class TrackedReporter:
    """A reporter that also hands each metric point to the trackers (queued: never waits for them)."""

    def __init__(self, reporter: Reporter, trackers: Trackers) -> None:
        self.reporter = reporter
        self.trackers = trackers

    def event(
        self, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        self.reporter.event(type, message, level=level, data=data)

    def metric(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        self.reporter.metric(split, step, values)
        self.trackers.metric(split, step, values)


# ------------------------------------------------------------------------------------------------ trackers


class TensorBoardLog:
    """TensorBoard event files in a folder of the attempt (stored as the job's `tensorboard` artifact)."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def start(self) -> None:
        from tensorboardX import SummaryWriter

        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=5)

    def params(self, values: dict[str, Any]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
        self.writer.add_text("job/parameters", "| parameter | value |\n|---|---|\n" + rows, 0)

    def metrics(self, points: list[Point]) -> None:
        for point in points:
            for key, value in point.values.items():
                self.writer.add_scalar(f"{point.split}/{key}", value, point.step, walltime=point.at)

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None:
        step = int(metrics.get("steps", 0))
        for key, value in metrics.items():
            self.writer.add_scalar(f"result/{key}", value, step)
        self.writer.close()

    def location(self) -> dict[str, Any]:
        return {"label": "event files stored as the job's tensorboard artifact"}


class MlflowRun:
    """A run in the deployment's MLflow tracking server: one per job (a resumed attempt continues it)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, integration: Integration, job_id: str) -> None:
        assert integration.mlflow is not None
        self.tracking_uri = tracking_uri
        self.settings = integration.mlflow
        self.job_id = job_id
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self) -> None:
        # Few, short retries: the relay's thread would otherwise spend minutes on a server that is down.
        for name, value in (
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"),
        ):
            os.environ.setdefault(name, value)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        name = self.settings.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.experiment_id = client.create_experiment(name)
            except MlflowException:  # created meanwhile by another job
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        found = client.search_runs(
            [self.experiment_id], filter_string=f"tags.`tuneforge.job_id` = '{self.job_id}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(
                self.experiment_id,
                run_name=self.settings.run_name or self.job_id,
                tags={"tuneforge.job_id": self.job_id, "mlflow.source.name": "tuneforge"},
            )
            self.run_id = run.info.run_id
        self.client = client

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in values.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def metrics(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        batch = [
            Metric(f"{p.split}/{key}", value, int(p.at * 1000), p.step)
            for p in points
            for key, value in p.values.items()
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(metrics.get("steps", 0))
        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        if adapter_dir is not None:
            self.client.set_tag(self.run_id, "tuneforge.adapter", ADAPTER_PATH.format(job_id=self.job_id))
            self.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")
        self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")

    def location(self) -> dict[str, Any]:
        url = f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return {
            "label": f"run {self.run_id} of experiment {self.settings.experiment!r}",
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "url": _scrub(url, ()) if url.startswith("http") else None,
        }


class WandbRun:
    """A W&B run: one per job (its id is the job's, so a resumed attempt continues it). Offline (wandb_mode
    offline, or WANDB_MODE=offline) the run is written to the worker's disk for `wandb sync`."""

    name = "wandb"

    def __init__(self, settings: Settings, integration: Integration, job_id: str, spec: JobSpec) -> None:
        assert integration.wandb is not None
        self.deployment = settings
        self.settings = integration.wandb
        self.job_id = job_id
        self.spec = spec
        self.run: Any = None

    def start(self) -> None:
        import wandb

        key = self.deployment.wandb_api_key
        mode = "offline" if os.environ.get("WANDB_MODE") == "offline" else self.deployment.wandb_mode
        folder = Path(os.environ.get("WANDB_DIR") or (self.deployment.cache_dir or Path(".")) / "wandb")
        folder.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "console": "off",
            "x_disable_stats": True,
            "silent": True,
            "init_timeout": 30,
        }
        if key is not None:
            options["api_key"] = key.get_secret_value()
        if self.deployment.wandb_base_url:
            options["base_url"] = self.deployment.wandb_base_url
        self.run = wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            name=self.settings.name or self.job_id,
            id=self.job_id,
            resume="allow",
            tags=self.settings.tags or None,
            config=self.spec.model_dump(mode="json", exclude={"integrations"}),
            dir=str(folder),
            mode=mode,
            reinit="create_new",
            settings=wandb.Settings(**options),
        )

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update({"job_id": values.get("job_id")}, allow_val_change=True)

    def metrics(self, points: list[Point]) -> None:
        for point in points:
            self.run.log(
                {f"{point.split}/{key}": value for key, value in point.values.items()}, step=point.step
            )

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None:
        import wandb

        self.run.summary.update(metrics)
        if adapter_dir is not None:
            self.run.summary["tuneforge_adapter"] = ADAPTER_PATH.format(job_id=self.job_id)
            artifact = wandb.Artifact(
                f"adapter-{self.job_id}", type="model", metadata={"job_id": self.job_id}
            )
            artifact.add_dir(str(adapter_dir))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if succeeded else 1)

    def location(self) -> dict[str, Any]:
        url = getattr(self.run, "url", None)
        folder = getattr(getattr(self.run, "settings", None), "sync_dir", None)
        label = url or (f"offline run in {folder}" if folder else f"run {self.job_id}")
        return {"label": label, "run_id": self.job_id, "url": url, "offline_dir": folder}


class Unconfigured:
    """A tracker the job names that this deployment cannot reach: it logs nothing, and the job says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def start(self) -> None:
        raise RuntimeError(self.reason)

    def params(self, values: dict[str, Any]) -> None: ...

    def metrics(self, points: list[Point]) -> None: ...

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None: ...

    def location(self) -> dict[str, Any]:
        return {}


def job_trackers(settings: Settings, spec: JobSpec, job_id: str, work_dir: Path) -> Trackers | None:
    """The trackers of a training job's rank 0: TensorBoard event files, and each of its integrations."""
    if spec.hyperparameters is None:  # merge and export jobs do not train
        return None
    tensorboard_dir = work_dir / "tensorboard"
    relays = [Relay(TensorBoardLog(tensorboard_dir))]
    secrets = tuple(s.get_secret_value() for s in (settings.wandb_api_key,) if s is not None)
    for index, integration in enumerate(spec.integrations):
        tracker: Tracker
        if integration.type == "mlflow" and not settings.mlflow_tracking_uri:
            # Refused at submission; the deployment dropped the setting since.
            tracker = Unconfigured("mlflow", "this deployment has no TUNEFORGE_MLFLOW_TRACKING_URI")
        else:
            tracker = TrackerProcess(integration.type, spec, index, job_id, settings)
        relays.append(Relay(tracker, secrets=secrets))
    return Trackers(relays, spec, job_id, tensorboard_dir)


# ------------------------------------------------------------------------------------- the child process


def real_tracker(kind: str, settings: Settings, spec: JobSpec, index: int, job_id: str) -> Tracker:
    """The tracker of a job's integration number `index` (in the child process)."""
    integration = spec.integrations[index]
    if kind == "mlflow":
        assert settings.mlflow_tracking_uri
        return MlflowRun(settings.mlflow_tracking_uri, integration, job_id)
    return WandbRun(settings, integration, job_id, spec)


class TrackerError(Exception):
    """What a tracker's child process said went wrong."""


class TrackerProcess:
    """A tracker run by a child process of its own (MLflow, W&B), one request and one answer at a time."""

    def __init__(self, name: str, spec: JobSpec, index: int, job_id: str, settings: Settings) -> None:
        self.name = name
        self.request = {
            "kind": name,
            "spec": spec.model_dump(mode="json"),
            "index": index,
            "job_id": job_id,
            "settings": settings.to_env(),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.where: dict[str, Any] = {}

    def _call(self, op: str, **payload: Any) -> Any:
        process = self.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"op": op, **payload}).encode() + b"\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise TrackerError(f"the {self.name} tracker process ended (exit code {process.wait()})")
        answer = json.loads(line)
        if not answer["ok"]:
            raise TrackerError(answer["error"])
        return answer.get("result")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.training.trackers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env | self.request.pop("settings"),
            # Its own process group: abandon() kills it with whatever it started.
            start_new_session=True,
        )
        self.where = self._call("start", **self.request) or {}

    def params(self, values: dict[str, Any]) -> None:
        self._call("params", values=values)

    def metrics(self, points: list[Point]) -> None:
        self._call("metrics", points=[asdict(p) for p in points])

    def finish(self, metrics: dict[str, float], adapter_dir: Path | None, succeeded: bool) -> None:
        adapter = str(adapter_dir) if adapter_dir else None
        where = self._call("finish", metrics=metrics, adapter_dir=adapter, succeeded=succeeded)
        self.where = where or self.where
        assert self.process is not None
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=30)

    def location(self) -> dict[str, Any]:
        return self.where

    def abandon(self) -> None:
        """Kills the child process and what it started (a tracker that did not answer in time)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)


def serve() -> None:
    """The child process: runs one tracker, answering each JSON line of stdin with one on its own stdout
    (anything the tracker prints goes to stderr, the training process's log)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Dies with the training process, even when that one is killed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    tracker: Tracker | None = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            result = None
            if op == "start":
                settings = Settings()
                spec = JobSpec.model_validate(request["spec"])
                tracker = real_tracker(request["kind"], settings, spec, request["index"], request["job_id"])
                tracker.start()
                result = tracker.location()
            elif op == "params":
                assert tracker is not None
                tracker.params(request["values"])
            elif op == "metrics":
                assert tracker is not None
                tracker.metrics([Point(**p) for p in request["points"]])
            elif op == "finish":
                assert tracker is not None
                adapter = request["adapter_dir"]
                tracker.finish(request["metrics"], Path(adapter) if adapter else None, request["succeeded"])
                result = tracker.location()
            answer = {"ok": True, "result": result}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer, default=str) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
