"""An attempt's inputs, fetched into the worker's cache before training starts: the datasets (refused if their
content changed since validation pinned it), the finished adapters a merge, fusion or export reads, the base
model, and the latest checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

from shared.datasets import dataset_digest
from shared.db import session_scope
from shared.errors import JobErrorCode, JobFailure
from shared.models import Job
from shared.schemas import JobSpec, job_sources
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
        # Checked against the files above: they key the tokenized cache without hashing the files again.
        dataset_sha256={
            param: digest for param, digest in (job.input_digests or {}).items() if param in paths
        },
    )
