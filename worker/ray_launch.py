"""The driver of a job that spans several nodes: it runs the job's recipe as a Ray Train job (TorchTrainer,
one training worker per GPU, gang-scheduled in a placement group on the cluster TUNEFORGE_RAY_ADDRESS names),
and reports how each rank ended in the same files as worker/launch.py, so the node worker that started it
supervises it like any training process group. `python -m worker.ray_launch WORK_DIR`.

Each Ray worker fetches the job's inputs on its own node (base model, datasets and the latest checkpoint, from
object storage and the database), runs the same recipe through `worker.launch.train_attempt`, and hands its
ending to the driver through a named actor; rank 0 stores the finished adapter itself, since its folder is on
its node. A warm shutdown or a preemption reaches the ranks through the same actor. Killing the driver (cancel,
lost lease, run-time limit) ends the whole Ray job: its workers belong to the driver. A rank that crashes or
a node that is lost ends the attempt as a crash; the next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.launch import STOP_FILE, Ending, LaunchSpec, _die_with_parent, report

log = logging.getLogger("worker.ray_launch")
# How often a rank asks the driver whether to stop (a Ray call; the ranks also agree on it every step).
STOP_POLL_SECONDS = 2.0
REPO_ROOT = Path(__file__).resolve().parents[1]


class RankEnded(Exception):
    """Raised by a rank that ended without success, once its ending is handed over."""


class Endings:
    """A named Ray actor: each rank's ending, and the driver's request to stop."""

    def __init__(self) -> None:
        self.endings: dict[int, dict[str, Any]] = {}
        self.stop = False

    def put(self, rank: int, ending: dict[str, Any]) -> None:
        self.endings[rank] = ending

    def all(self) -> dict[int, dict[str, Any]]:
        return self.endings

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


def _stop_check(actor: Any) -> Any:
    """A should_stop for one rank: asks the driver at most every STOP_POLL_SECONDS."""
    import ray

    last, answer = 0.0, False

    def should_stop() -> bool:
        nonlocal last, answer
        now = time.monotonic()
        if not answer and now - last >= STOP_POLL_SECONDS:
            answer, last = bool(ray.get(actor.stop_requested.remote())), now
        return answer

    return should_stop


def store_output(settings: Any, launch: LaunchSpec, result: dict[str, Any]) -> dict[str, Any]:
    """Uploads rank 0's finished artifact folder (on its own node) where the worker would, and returns the
    result with what was stored, for the worker to record."""
    from worker.reporting import AttemptWriter, patient_store

    writer = AttemptWriter(settings, launch.job_id, launch.attempt)
    store = patient_store(settings, writer)
    output = Path(result["output_dir"])
    prefix = f"artifacts/{launch.team_id}/{launch.job_id}/attempt-{launch.attempt}/{result['kind']}"
    names = [p.relative_to(output).as_posix() for p in sorted(output.rglob("*")) if p.is_file()]
    stored = store.put_tree(prefix, output)
    return {
        **result,
        "output_dir": None,
        "stored": [
            {"name": name, "bucket": obj.bucket, "key": obj.key, "size": obj.size, "sha256": obj.sha256}
            for name, obj in zip(names, stored, strict=True)
        ],
    }


def train_rank(config: dict[str, Any]) -> None:
    """The training loop of one Ray worker (one rank)."""
    import ray
    import ray.train

    from shared.db import session_scope
    from shared.models import Job
    from shared.schemas import JobSpec
    from shared.settings import get_settings
    from worker.inputs import fetch_inputs
    from worker.launch import train_attempt
    from worker.reporting import AttemptWriter, patient_store

    settings = get_settings()
    rank = ray.train.get_context().get_world_rank()
    # Each rank keeps its checkpoint files on its own node's disk: they are stored rank by rank.
    os.environ["TUNEFORGE_RANKS_SHARE_DISK"] = "0"
    launch = LaunchSpec(**config["launch"])
    actor = ray.get_actor(config["endings"], namespace=config["namespace"])
    work_dir = Path(tempfile.mkdtemp(prefix=f"tuneforge-{launch.job_id}-rank{rank}-"))
    try:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, launch.job_id)
            assert job is not None
            session.expunge(job)
        spec = JobSpec.model_validate(launch.spec)
        writer = AttemptWriter(settings, launch.job_id, launch.attempt)
        # This node's own copy of the inputs (the driver's are on its node), the spec as the driver runs it.
        local = fetch_inputs(settings, patient_store(settings, writer), job, spec, launch.attempt, work_dir)
        local.spec = launch.spec
        ending = train_attempt(local, work_dir, rank, should_stop=_stop_check(actor))
        if rank == 0 and ending.kind == "ok" and ending.result is not None:
            ending.result = store_output(settings, launch, ending.result)
        ray.get(actor.put.remote(rank, asdict(ending)))
        if ending.kind != "ok":
            # A rank that returned would leave the others waiting in their next collective: fail the group,
            # so Ray stops every rank (as torchrun does when one process exits).
            raise RankEnded(f"rank {rank} ended: {ending.kind} {ending.code or ''} {ending.message}".strip())
    finally:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)


def _watch_for_stop(work_dir: Path, actor: Any, done: threading.Event) -> None:
    # The worker asks for a checkpoint and a stop by creating STOP here (a warm shutdown or a preemption).
    while not done.wait(0.5):
        if (work_dir / STOP_FILE).exists():
            actor.request_stop.remote()
            return


def run(work_dir: Path) -> int:
    """Runs the Ray Train job; returns the exit code (the ranks' endings are written as worker/launch does)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from shared.schemas import JobSpec
    from shared.settings import get_settings

    settings = get_settings()
    launch = LaunchSpec.read(work_dir)
    spec = JobSpec.model_validate(launch.spec)
    name = f"{launch.job_id}-attempt-{launch.attempt}"
    env = {
        **settings.to_env(),
        "TUNEFORGE_JOB_ID": launch.job_id,
        "TUNEFORGE_ATTEMPT": str(launch.attempt),
        # The Ray workers run this package; on a cluster whose image installs it, this path is harmless.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        **{
            k: v
            for k, v in os.environ.items()
            if k in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")
        },
    }
    ray.init(
        address=settings.ray_address, namespace="tuneforge", runtime_env={"env_vars": env}, log_to_driver=True
    )
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    endings = ray.remote(num_cpus=0)(Endings).options(name=name, namespace="tuneforge").remote()
    done = threading.Event()
    threading.Thread(target=_watch_for_stop, args=(work_dir, endings, done), daemon=True).start()
    trainer = TorchTrainer(
        train_rank,
        train_loop_config={"launch": launch.__dict__, "endings": name, "namespace": "tuneforge"},
        scaling_config=ScalingConfig(
            num_workers=spec.resources.gpus,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1},
            # One training worker per GPU, spread so that each node holds its gpus_per_node of them.
            placement_strategy="SPREAD",
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(work_dir / "ray"),
            # A lost rank or node ends the attempt: the next one resumes from the last stored checkpoint.
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    crashed: dict[int, str] = {}
    try:
        trainer.fit()
    except Exception as exc:  # ranks that raised; their endings (if any) are still in the actor
        failures = getattr(exc, "worker_failures", None) or {}
        crashed = {int(rank): f"{type(e).__name__}: {e}" for rank, e in failures.items()} or {-1: str(exc)}
        log.error("the Ray Train job failed: %s", crashed)
    finally:
        done.set()
    said = {int(rank): Ending(**ending) for rank, ending in ray.get(endings.all.remote()).items()}
    code = 1
    for rank, ending in sorted(said.items()):
        rank_code = report(work_dir, rank, ending)
        code = rank_code if rank == 0 else code
    if crashed and not any(e.kind in ("failed", "oom", "stopped") for e in said.values()):
        print(json.dumps({"ray_worker_failures": crashed}), file=sys.stderr)
        return 1
    return code


def main() -> None:
    from shared.logs import configure_logging

    _die_with_parent()
    configure_logging(os.environ.get("TUNEFORGE_LOG_LEVEL", "INFO"))
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
