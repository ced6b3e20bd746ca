"""An attempt's inputs, fetched into the worker's cache before training starts: the datasets (refused if their
content changed since validation pinned it), the finished adapters a merge, fusion or export reads, the
adapter a training job starts from (init_from), the base model, and the latest checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.datasets import dataset_digest
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import CHECKPOINT_KIND, Artifact, Checkpoint, Job
from shared.schemas import AdapterSource, JobSpec, job_sources
from shared.settings import Settings
from shared.storage import ObjectStore
from worker.assets import AssetCache
from worker.checkpoints import fetch_latest_checkpoint
from worker.launch import LaunchSpec


def check_pinned(param: str, uri: str, path: Path, digests: dict[str, str] | None) -> None:
    """Refuses a dataset whose content is not what validation read (a file or URL rewritten since): the
    job would train on data nobody checked, and a resumed attempt would mix two datasets."""
    expected = (digests or {}).get(param)
    if expected is None:  # validated before digests were recorded
        return
    actual = dataset_digest(path)
    if actual != expected:
        raise JobFailure(
            JobErrorCode.invalid_dataset,
            f"{param}: {uri} changed after the job was validated (sha256 {expected[:12]}… then, "
            f"{actual[:12]}… now); a job trains only on the data that was checked: restore the file or "
            "submit the job again",
        )


def _init_adapter(
    cache: AssetCache, store: ObjectStore, session: Session, job: Job, spec: JobSpec, work_dir: Path
) -> Path | None:
    """The adapter the job starts from (init_from): the source job's final adapter, or the adapter files of
    one of its checkpoints (the optimizer state stays behind), fetched and checked against their sha256."""
    init = spec.init_from
    if init is None:
        return None
    if init.checkpoint_step is None:
        return cache.adapter_dir(AdapterSource(job_id=init.job), session=session, team_id=job.team_id)
    checkpoint = session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(
            Checkpoint.job_id == init.job, Checkpoint.step == init.checkpoint_step, Job.team_id == job.team_id
        )
    )
    if checkpoint is None:
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"init_from: job {init.job} has no checkpoint at step {init.checkpoint_step} (any more)",
        )
    files = session.scalars(
        select(Artifact).where(
            Artifact.job_id == init.job,
            Artifact.kind == CHECKPOINT_KIND,
            Artifact.name.startswith(f"{checkpoint.prefix}/adapter_"),
        )
    ).all()
    folder = work_dir / "init-from"
    for artifact in files:
        name = artifact.name.removeprefix(checkpoint.prefix + "/")
        store.get_file(artifact.storage_key, folder / name, expected_sha256=artifact.sha256)
    if not (folder / "adapter_model.safetensors").is_file():
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"init_from: the checkpoint at step {init.checkpoint_step} of job {init.job} holds no adapter weights",
        )
    return folder


def fetch_inputs(
    settings: Settings, store: ObjectStore, job: Job, spec: JobSpec, attempt: int, work_dir: Path
) -> LaunchSpec:
    """Fetches a job's inputs into the worker's cache (and its latest checkpoint into `work_dir`); returns
    what the training process is started with. Raises JobFailure for inputs that cannot be used and
    StorageError when storage fails."""
    cache = AssetCache(settings, store)
    with session_scope(settings.database_url) as session:
        paths = {}
        for param, uri in (("dataset", job.dataset_uri), ("validation_dataset", job.validation_uri)):
            if uri:
                path = cache.dataset_file(uri, session=session, team_id=job.team_id, param=param)
                check_pinned(param, uri, path, job.input_digests)
                paths[param] = str(path)
        sources = [
            str(cache.adapter_dir(source, session=session, team_id=job.team_id))
            for source in job_sources(spec)
        ]
        init_from = _init_adapter(cache, store, session, job, spec, work_dir)
    assert spec.base_model is not None
    resume_from = fetch_latest_checkpoint(settings, store, job.id, work_dir)
    return LaunchSpec(
        job_id=job.id,
        attempt=attempt,
        team_id=job.team_id,
        spec=spec.model_dump(mode="json"),
        model_dir=str(cache.model_dir(spec.base_model)),
        train_path=paths.get("dataset"),
        eval_path=paths.get("validation_dataset"),
        sources=sources,
        resume_from=str(resume_from) if resume_from else None,
        init_from=str(init_from) if init_from else None,
        # Checked against the files above: they key the tokenized cache without hashing the files again.
        dataset_sha256={
            param: digest for param, digest in (job.input_digests or {}).items() if param in paths
        },
    )
