"""Checkpoints: a saved training state is uploaded to object storage, and only once every file is stored is it
recorded (a checkpoint row and its files as artifacts, in one fenced transaction); a new attempt downloads the
latest recorded one and resumes from it."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import Job
from shared.services import artifacts as artifact_service
from shared.settings import Settings
from shared.storage import ObjectStore
from worker.reporting import AttemptWriter


class CheckpointUploader:
    """Where a recipe's trainer sends each saved checkpoint folder (rank 0 only)."""

    def __init__(self, store: ObjectStore, writer: AttemptWriter, team_id: str) -> None:
        self.store = store
        self.writer = writer
        self.team_id = team_id

    def save(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        """Uploads `folder`, then records it as the checkpoint of `step`."""
        prefix = artifact_service.checkpoint_prefix(step)
        job_id, attempt = self.writer.job_id, self.writer.attempt
        # Keys of this save alone: an upload that outlives its attempt (its worker was killed mid-upload, the
        # job resumed elsewhere and saved the same step) lands beside the recorded files, never on them.
        unique = f"attempt-{attempt}-{secrets.token_hex(4)}"
        stored = self.store.put_tree(
            f"artifacts/{self.team_id}/{job_id}/checkpoints/{prefix}/{unique}", folder
        )
        names = [
            f"{prefix}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*")) if p.is_file()
        ]

        def record(session: Session) -> None:
            job = session.get(Job, job_id)
            assert job is not None
            artifact_service.record_checkpoint(
                session=session,
                job=job,
                attempt=self.writer.attempt,
                step=step,
                stored=list(zip(names, stored, strict=True)),
                metrics=metrics,
            )

        self.writer.write(record, "a checkpoint")


def fetch_latest_checkpoint(
    settings: Settings, store: ObjectStore, job_id: str, work_dir: Path
) -> Path | None:
    """Downloads the job's latest recorded checkpoint (each file checked against its sha256) into
    `work_dir`; returns its folder, or None when the job has none."""
    with session_scope(settings.database_url) as session:
        latest = artifact_service.latest_checkpoint(session=session, job_id=job_id)
    if latest is None:
        return None
    checkpoint, files = latest
    folder = work_dir / "resume" / f"checkpoint-{checkpoint.step}"
    shutil.rmtree(folder, ignore_errors=True)
    for artifact in files:
        relative = artifact.name.removeprefix(checkpoint.prefix + "/")
        store.get_file(artifact.storage_key, folder / relative, expected_sha256=artifact.sha256)
    return folder
