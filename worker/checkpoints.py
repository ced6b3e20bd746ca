"""Checkpoints: a saved training state is uploaded to object storage, and only once every file is stored is it
recorded (a checkpoint row and its files as artifacts, in one fenced transaction); a new attempt downloads the
latest recorded one and resumes from it.

Uploads run beside training: the trainer's folder is moved aside (a rename) and a thread uploads and records
it while the next steps run. A newer checkpoint that arrives before the previous one's upload started takes its
place (the older one would only be superseded). A failed upload surfaces in the training loop at the next save
or when training ends (`wait`), where the training process fails as it did when uploads were inline.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import Job
from shared.services import artifacts as artifact_service
from shared.settings import Settings
from shared.storage import ObjectStore, StoredObject
from worker.reporting import AttemptWriter

log = logging.getLogger(__name__)
# Files other ranks stored for one checkpoint: (name under the checkpoint's prefix, the stored object).
Parts = Sequence[tuple[str, StoredObject]]


class CheckpointUploader:
    """Where a recipe's trainer sends each saved checkpoint folder (rank 0 only): stored and recorded by a
    thread of its own while training goes on."""

    def __init__(
        self, store: ObjectStore, writer: AttemptWriter, team_id: str, staging: Path | None = None
    ) -> None:
        self.store = store
        self.writer = writer
        self.team_id = team_id
        # Where folders wait for their upload (beside the trainer's output, so moving one there is a rename).
        self.staging = staging
        self.seconds = 0.0  # spent uploading and recording, all checkpoints together
        self._changed = threading.Condition()
        self._next: tuple[int, Path, dict[str, Any], Parts, str | None] | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def save(
        self, step: int, folder: Path, metrics: dict[str, Any], parts: Parts = (), unique: str | None = None
    ) -> None:
        """Hands `folder` over to be uploaded, then recorded as the checkpoint of `step` together with `parts`
        (files other ranks stored already, under the prefix `unique`); returns at once. Raises the error of
        an earlier upload that failed."""
        self._raise_failure()
        if self.staging is not None:
            self.staging.mkdir(parents=True, exist_ok=True)
            moved = self.staging / f"{folder.name}-{secrets.token_hex(4)}"
            folder.rename(moved)
            folder = moved
        with self._changed:
            if self._next is not None:  # never started: the newer checkpoint supersedes it
                self._discard(self._next[1])
            self._next = (step, folder, metrics, tuple(parts), unique)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._upload_each, name="checkpoint-upload", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def wait(self) -> None:
        """Waits until every checkpoint handed over is stored and recorded; raises the error of one that
        failed."""
        with self._changed:
            while self._next is not None or self._busy:
                self._changed.wait()
        self._raise_failure()

    def _raise_failure(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _upload_each(self) -> None:
        while True:
            with self._changed:
                while self._next is None:
                    self._changed.wait()
                (step, folder, metrics, parts, unique), self._next = self._next, None
                self._busy = True
            started = time.perf_counter()
            try:
                self.store_and_record(step, folder, metrics, parts, unique)
            except BaseException as exc:
                log.warning("checkpoint of step %d could not be stored: %s", step, exc)
                self._error = exc
            finally:
                self.seconds += time.perf_counter() - started
                if self.staging is not None:
                    self._discard(folder)
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _discard(self, folder: Path) -> None:
        if self.staging is not None and folder.parent == self.staging:
            shutil.rmtree(folder, ignore_errors=True)

    def unique_prefix(self, step: int, unique: str | None = None) -> str:
        """Where the files of one save of `step` go: keys of this save alone, so that an upload that outlives
        its attempt (its worker killed mid-upload, the job resumed elsewhere and saved the same step) lands
        beside the recorded files, never on them."""
        unique = unique or f"attempt-{self.writer.attempt}-{secrets.token_hex(4)}"
        return f"artifacts/{self.team_id}/{self.writer.job_id}/checkpoints/{artifact_service.checkpoint_prefix(step)}/{unique}"

    def upload_part(self, step: int, folder: Path, unique: str) -> list[tuple[str, StoredObject]]:
        """Stores this rank's own files of a checkpoint (a rank whose folder is not on rank 0's disk: its
        optimizer shards, its RNG state) under the save's prefix; rank 0 records them with its own."""
        prefix = artifact_service.checkpoint_prefix(step)
        stored = self.store.put_tree(self.unique_prefix(step, unique), folder)
        names = [
            f"{prefix}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*")) if p.is_file()
        ]
        return list(zip(names, stored, strict=True))

    def store_and_record(
        self, step: int, folder: Path, metrics: dict[str, Any], parts: Parts = (), unique: str | None = None
    ) -> None:
        """Uploads `folder`, then records it (with `parts`) as the checkpoint of `step`."""
        prefix = artifact_service.checkpoint_prefix(step)
        job_id = self.writer.job_id
        stored = self.store.put_tree(self.unique_prefix(step, unique), folder)
        names = [
            f"{prefix}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*")) if p.is_file()
        ]
        own = list(zip(names, stored, strict=True))
        # Rank 0's copy of a file wins over another rank's (both may write one, e.g. the trainer state).
        files = own + [part for part in parts if part[0] not in set(names)]

        def record(session: Session) -> None:
            job = session.get(Job, job_id)
            assert job is not None
            artifact_service.record_checkpoint(
                session=session,
                job=job,
                attempt=self.writer.attempt,
                step=step,
                stored=files,
                metrics=metrics,
            )

        # The metric points and events up to this step go first: an attempt resumed from this checkpoint starts
        # after it and never logs them again, so a point still queued when the worker dies would be lost.
        self.writer.flush_queued()
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
