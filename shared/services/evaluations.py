"""A finished adapter job's evaluation: the base model's and the adapter's answers to its evaluation prompts,
side by side, and the validation perplexity before and after training. The training process writes them
(worker/training/evaluation.py) and the worker stores them as the job's `evaluation` artifact; this reads them
back, checked against their recorded size and sha256."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound, StoredDataDamaged
from shared.models import Artifact
from shared.services.jobs import get_job
from shared.storage import ObjectStore
from shared.tenancy import TeamID

KIND = "evaluation"
SAMPLES_FILE = "samples.json"
# The file holds at most 16 prompts with two answers of at most 512 tokens each.
MAX_BYTES = 4 * 2**20


def read_evaluation(*, session: Session, store: ObjectStore, team_id: TeamID, job_id: str) -> dict[str, Any]:
    """Returns a team's job's evaluation; NotFound while it has none (not finished, or nothing to evaluate)."""
    job = get_job(session=session, team_id=team_id, job_id=job_id)
    artifact = session.scalar(
        select(Artifact).where(
            Artifact.job_id == job.id, Artifact.kind == KIND, Artifact.name == SAMPLES_FILE
        )
    )
    if artifact is None:
        raise NotFound(
            f"job {job_id} has no evaluation: it is not finished, or it has neither eval_prompts nor a "
            "validation_dataset",
            param="job_id",
        )
    data = store.read_bytes(artifact.storage_key, limit=MAX_BYTES)
    if len(data) != artifact.size_bytes or hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise StoredDataDamaged(
            f"the evaluation of job {job_id} no longer matches its sha256 {artifact.sha256}", param="job_id"
        )
    document = json.loads(data)
    return {
        "object": "evaluation",
        "job_id": job.id,
        "status": job.status,
        "base_model": document.get("base_model"),
        "max_new_tokens": document.get("max_new_tokens"),
        "perplexity": document.get("perplexity"),
        "samples": document.get("samples") or [],
        "note": document.get("note"),
        "sha256": artifact.sha256,
    }
