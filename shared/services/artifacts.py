"""A job's stored outputs: artifacts (adapter, merged model, checkpoint files) and checkpoints. Object storage
holds the bytes; these rows hold keys, sizes and sha256, written only once every byte is stored."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import CHECKPOINT_KIND, Artifact, Checkpoint, Job, utcnow
from shared.services.jobs import add_event, get_job
from shared.storage import StoredObject
from shared.tenancy import TeamID

# The whole of an artifact kind as one tar archive (the one GET /v1/jobs/{id}/artifacts/{kind}.tar streams),
# written to storage once when the job stores it, so that the API can hand out a presigned URL to it instead
# of building the archive on every download. Recorded as an artifact of kind ARCHIVE_KIND named `{kind}.tar`,
# left out of the job's list of artifacts. Only adapters (megabytes to a few GB): a merged model's archive
# would double a large footprint, and checkpoints are rotated.
ARCHIVE_KIND = "archive"
ARCHIVED_KINDS = frozenset({"adapter"})


def archive_name(kind: str) -> str:
    """The name of the archive of `kind` among the job's ARCHIVE_KIND artifacts."""
    return f"{kind}.tar"


def archive_root(job_id: str, kind: str) -> str:
    """The folder every member of a job's `kind` archive is under."""
    return f"{job_id}-{kind}"


def checkpoint_prefix(step: int) -> str:
    """The name prefix of a checkpoint's files among the job's artifacts."""
    return f"step-{step:08d}"


def record_artifacts(
    *, session: Session, job: Job, kind: str, stored: Iterable[tuple[str, StoredObject]]
) -> list[Artifact]:
    """Records uploaded files (name inside the artifact, stored object) as a job's artifacts."""
    rows = [
        Artifact(
            job_id=job.id,
            team_id=job.team_id,
            kind=kind,
            name=name,
            storage_key=obj.key,
            size_bytes=obj.size,
            sha256=obj.sha256,
        )
        for name, obj in stored
    ]
    session.add_all(rows)
    session.flush()
    return rows


def list_artifacts(
    *, session: Session, team_id: TeamID, job_id: str, kind: str | None = None
) -> Sequence[Artifact]:
    """Returns a job's artifacts, by name (without its stored archives, unless `kind` asks for them)."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    query = select(Artifact).where(Artifact.job_id == job_id)
    if kind is not None:
        query = query.where(Artifact.kind == kind)
    else:
        query = query.where(Artifact.kind != ARCHIVE_KIND)
    return session.scalars(query.order_by(Artifact.kind, Artifact.name)).all()


def delete_artifacts(*, session: Session, job_id: str, kind: str, prefix: str | None = None) -> int:
    """Removes a job's artifact records of one kind (under a name prefix); returns how many."""
    query = delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
    if prefix is not None:
        query = query.where(Artifact.name.startswith(prefix + "/"))
    return session.execute(query).rowcount


def latest_checkpoint(*, session: Session, job_id: str) -> tuple[Checkpoint, list[Artifact]] | None:
    """Returns a job's most advanced complete checkpoint and its files, if it has one."""
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    )
    if checkpoint is None:
        return None
    return checkpoint, _checkpoint_files(session, checkpoint)


def list_checkpoints(*, session: Session, team_id: TeamID, job_id: str) -> Sequence[Checkpoint]:
    """Returns a team's job's checkpoints, by step."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    return session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
    ).all()


def get_artifact(*, session: Session, team_id: TeamID, job_id: str, kind: str, name: str) -> Artifact:
    """Returns one of a team's job's artifacts, or raises NotFound."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound(f"job {job_id} has no {kind} artifact named {name!r}", param="name")
    return artifact


def get_kind(
    *, session: Session, team_id: TeamID, job_id: str, kind: str
) -> tuple[Sequence[Artifact], Artifact | None]:
    """Returns a team's job's artifacts of `kind` and their stored archive (None if none was written); raises
    NotFound when the job has none of that kind."""
    artifacts = list_artifacts(session=session, team_id=team_id, job_id=job_id, kind=kind)
    if not artifacts or kind == ARCHIVE_KIND:
        raise NotFound(f"job {job_id} has no {kind} artifacts", param="kind")
    return artifacts, find_archive(session=session, job_id=job_id, kind=kind)


def find_archive(*, session: Session, job_id: str, kind: str) -> Artifact | None:
    """The stored archive of a job's `kind` artifacts, if one was written (see ARCHIVED_KINDS)."""
    return session.scalar(
        select(Artifact).where(
            Artifact.job_id == job_id, Artifact.kind == ARCHIVE_KIND, Artifact.name == archive_name(kind)
        )
    )


def clear_damaged(*, session: Session, row_id: object) -> None:
    """Unmarks stored bytes found intact again (restored from a backup)."""
    session.execute(update(Artifact).where(Artifact.id == row_id).values(damaged_at=None))


def mark_damaged(*, session: Session, row_id: int) -> None:
    """Records that an artifact's stored bytes no longer match its sha256: it is never served again."""
    session.execute(
        update(Artifact)
        .where(Artifact.id == row_id, Artifact.damaged_at.is_(None))
        .values(damaged_at=utcnow())
    )


def get_checkpoint(
    *, session: Session, team_id: TeamID, job_id: str, step: int
) -> tuple[Checkpoint, list[Artifact]]:
    """Returns a team's job's checkpoint at `step` and its files, or raises NotFound."""
    get_job(session=session, team_id=team_id, job_id=job_id)
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    )
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint at step {step}", param="step")
    return checkpoint, _checkpoint_files(session, checkpoint)


def _checkpoint_files(session: Session, checkpoint: Checkpoint) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact)
            .where(
                Artifact.job_id == checkpoint.job_id,
                Artifact.kind == CHECKPOINT_KIND,
                Artifact.name.startswith(checkpoint.prefix + "/"),
            )
            .order_by(Artifact.name)
        )
    )


def record_checkpoint(
    *,
    session: Session,
    job: Job,
    attempt: int,
    step: int,
    stored: Sequence[tuple[str, StoredObject]],
    metrics: dict[str, Any],
) -> Checkpoint:
    """Records a checkpoint whose files (names under its prefix, stored objects) are all in storage. A resumed
    attempt that saves a step again replaces the older record of that step."""
    prefix = checkpoint_prefix(step)
    old = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step))
    if old is not None:
        delete_artifacts(session=session, job_id=job.id, kind=CHECKPOINT_KIND, prefix=old.prefix)
        session.delete(old)
        session.flush()
    record_artifacts(session=session, job=job, kind=CHECKPOINT_KIND, stored=stored)
    checkpoint = Checkpoint(
        job_id=job.id,
        attempt=attempt,
        step=step,
        prefix=prefix,
        num_files=len(stored),
        size_bytes=sum(obj.size for _, obj in stored),
        metrics=metrics,
    )
    session.add(checkpoint)
    add_event(
        session=session,
        job_id=job.id,
        type="checkpoint",
        message=f"checkpoint at step {step} stored ({len(stored)} files)",
        attempt=attempt,
        data={"step": step},
    )
    session.flush()
    return checkpoint
