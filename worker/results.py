"""A successful attempt's result: the artifact folder the recipe wrote is uploaded under the attempt's own
prefix, then recorded with the job's final metrics and its move to `succeeded`, in one fenced transaction."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from shared.archive import local_members, store_archive
from shared.models import Job
from shared.services import artifacts as artifact_service
from shared.services import jobs as job_service
from shared.states import JobStatus
from shared.storage import ObjectStore, StoredObject
from worker.launch import RESULT_FILE
from worker.reporting import AttemptWriter

log = logging.getLogger(__name__)


def memory_event(metrics: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measured peak memory of a finished attempt next to the plan's per-GPU estimate, as an event's
    message and data; None when the recipe measured nothing."""
    gpu = metrics.get("peak_gpu_memory_bytes")
    host = metrics.get("peak_host_memory_bytes")
    if gpu is None and host is None:
        return None
    estimate = ((plan or {}).get("memory") or {}).get("total")
    parts = []
    if gpu is not None:
        parts.append(f"GPU {gpu / 2**30:.2f} GiB")
        if estimate:
            parts[-1] += f" (the plan estimated {estimate / 2**30:.2f} GiB, {gpu / estimate:.0%} of it)"
    if host is not None:
        parts.append(f"host {host / 2**30:.2f} GiB")
    return {
        "message": "peak memory of the training process: " + ", ".join(parts),
        "data": {"peak_gpu_bytes": gpu, "peak_host_bytes": host, "plan_estimate_bytes": estimate},
    }


PHASES = ("startup", "tokenize", "load", "train", "checkpoint", "save", "upload")


def efficiency_event(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """How efficiently a finished attempt trained, as an event's message and data: tokens/s, the model FLOPs
    utilization against the device's peak, and where the time went; None for a job that did not train."""
    if metrics.get("tokens_per_second") is None:
        return None
    parts = [f"{metrics['tokens_per_second']:,.0f} tokens/s"]
    mfu, peak = metrics.get("mfu"), metrics.get("device_peak_flops")
    if mfu is not None and peak:
        parts.append(
            f"model FLOPs utilization {mfu:.1%} of a {metrics.get('device_peak_source')} "
            f"{peak / 1e9:,.0f} GFLOP/s peak"
        )
    times = metrics.get("time_seconds") or {}
    spent = [f"{phase} {times[phase]:.2f}s" for phase in PHASES if times.get(phase) is not None]
    if spent:
        parts.append("time: " + ", ".join(spent))
    keys = ("tokens_per_second", "mfu", "flops_per_token", "device_peak_flops", "device_peak_source")
    return {
        "message": "; ".join(parts),
        "data": {**{key: metrics.get(key) for key in keys}, "time_seconds": times},
    }


def names_of(folder: Path) -> list[str]:
    """The files of a folder as put_tree stores them (relative paths, sorted)."""
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]


def _store_archive(
    store: ObjectStore,
    prefix: str,
    job_id: str,
    kind: str,
    folder: Path,
    names: list[str],
    stored: list[StoredObject],
) -> tuple[str, StoredObject] | None:
    """Stores the folder just uploaded as the tar archive the API serves for it (a presigned URL to it then
    beats building the archive per download); None, and the API builds it per download, if that fails."""
    try:
        obj = store_archive(
            store,
            f"{prefix}/{artifact_service.archive_name(kind)}",
            artifact_service.archive_root(job_id, kind),
            local_members(folder, list(zip(names, stored, strict=True))),
        )
    except Exception:  # the files themselves are stored; only the shortcut is missing
        log.warning("could not store the %s archive of job %s", kind, job_id, exc_info=True)
        return None
    return artifact_service.archive_name(kind), obj


def store_result(writer: AttemptWriter, store: ObjectStore, team_id: str, work_dir: Path) -> JobStatus | None:
    """Uploads the training process's result folder and marks the job succeeded; None when the attempt no
    longer holds the job. Raises StorageError when the upload fails."""
    result = json.loads((work_dir / RESULT_FILE).read_text())
    kind = result["kind"]
    job_id, attempt = writer.job_id, writer.attempt
    uploading = time.perf_counter()
    if result.get("stored") is not None:  # stored already by a Ray job's rank 0, on its own node
        names = [item["name"] for item in result["stored"]]
        stored = [StoredObject(i["bucket"], i["key"], i["size"], i["sha256"]) for i in result["stored"]]
    else:
        output = Path(result["output_dir"])
        stored = store.put_tree(f"artifacts/{team_id}/{job_id}/attempt-{attempt}/{kind}", output)
        names = names_of(output)
    archive = (
        _store_archive(
            store, f"artifacts/{team_id}/{job_id}/attempt-{attempt}", job_id, kind, output, names, stored
        )
        if result.get("stored") is None and kind in artifact_service.ARCHIVED_KINDS
        else None
    )
    # Evaluation answers and TensorBoard event files, each its own artifact kind. A folder that is not on this
    # machine (a Ray job's rank 0 wrote it on its own node) is left out.
    extras = [
        (
            extra,
            names_of(Path(folder)),
            store.put_tree(f"artifacts/{team_id}/{job_id}/attempt-{attempt}/{extra}", Path(folder)),
        )
        for extra, folder in (result.get("extras") or {}).items()
        if Path(folder).is_dir()
    ]
    metrics = result["metrics"]
    times = metrics.get("time_seconds")
    if times is not None:  # a job that trained: where its time went, the upload included
        times["upload"] = round(times.get("upload", 0.0) + time.perf_counter() - uploading, 3)

    def succeed(session: Session) -> JobStatus | None:
        job = session.get(Job, job_id)
        assert job is not None
        if job.status != JobStatus.running:
            return None
        artifact_service.record_artifacts(
            session=session, job=job, kind=kind, stored=zip(names, stored, strict=True)
        )
        if archive is not None:
            artifact_service.record_artifacts(
                session=session, job=job, kind=artifact_service.ARCHIVE_KIND, stored=[archive]
            )
        for extra, extra_names, extra_stored in extras:
            artifact_service.record_artifacts(
                session=session, job=job, kind=extra, stored=zip(extra_names, extra_stored, strict=True)
            )
        memory = memory_event(metrics, job.plan)
        if memory is not None:
            job_service.add_event(session=session, job_id=job_id, type="memory", attempt=attempt, **memory)
        spent = efficiency_event(metrics)
        if spent is not None:
            job_service.add_event(session=session, job_id=job_id, type="efficiency", attempt=attempt, **spent)
        job_service.transition(
            session=session,
            job_id=job_id,
            to=JobStatus.succeeded,
            attempt=attempt,
            message="job succeeded" + (f" after {metrics['steps']} steps" if metrics.get("steps") else ""),
            trainable_params=result["trainable_params"],
            total_params=result["total_params"],
            trained_tokens=result["trained_tokens"],
            result=metrics,
        )
        return JobStatus.succeeded

    return writer.write(succeed, "the result")
