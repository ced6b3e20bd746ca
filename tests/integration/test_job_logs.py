"""Job logs: a running attempt's output shipped to the database in chunks (read back through the API while it
runs: pages of whole lines, tail, a line still being written held back), then stored in object storage when the
attempt ends, with its sha256, the chunks dropped and the reads unchanged; a log past the limit keeps its
beginning and says it was truncated; another team's job is a 404. The end-to-end job test reads a real
training process's log (tests/e2e/test_lora_job.py)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import DEFAULT_TEAM_ID, PRIORITY_RANK, Attempt, AttemptLogChunk, Job
from shared.schemas import JobSpec
from shared.states import JobStatus
from tests.conftest import TINY_MODEL
from worker.logs import LogShipper, log_key
from worker.reporting import AttemptWriter


def running_attempt(settings) -> tuple[str, int]:
    """A job of the default team that a worker runs (attempt 1), as a claim leaves it."""
    spec = JobSpec(base_model=TINY_MODEL, dataset="file-x")
    job_id = f"ftjob-{secrets.token_hex(12)}"
    with session_scope(settings.database_url) as session:
        session.add(
            Job(
                id=job_id,
                team_id=DEFAULT_TEAM_ID,
                status=JobStatus.running.value,
                method=spec.method.value,
                base_model=TINY_MODEL,
                dataset_uri="file-x",
                spec=spec.model_dump(mode="json"),
                priority="normal",
                priority_rank=PRIORITY_RANK["normal"],
                gpus=1,
                nodes=1,
                attempt=1,
                result={},
            )
        )
        session.flush()
        session.add(
            Attempt(
                job_id=job_id,
                team_id=DEFAULT_TEAM_ID,
                number=1,
                worker_id="w-logs",
                host="here",
                gpu_indices=[],
                gpus=1,
                launcher="process",
            )
        )
    return job_id, 1


def chunks(settings, job_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).where(AttemptLogChunk.job_id == job_id))


def test_running_log_is_read_from_chunks_then_from_storage(settings, store, api_client, make_team, tmp_path):
    job_id, attempt = running_attempt(settings)
    path = tmp_path / "training.log"
    shipper = LogShipper(AttemptWriter(settings, job_id, attempt), path, max_bytes=1 << 20, interval=60)
    url = f"/v1/jobs/{job_id}/logs"

    empty = api_client.get(url).json()
    assert (empty["attempt"], empty["lines"], empty["complete"], empty["stored"]) == (1, [], False, False)

    lines = [f'{{"message": "step {i}", "job_id": "{job_id}", "attempt": 1}}' for i in range(300)]
    path.write_text("\n".join(lines[:200]) + "\n" + lines[200][:10])  # the last line is still being written
    assert shipper.ship() == path.stat().st_size
    assert chunks(settings, job_id) >= 1

    page = api_client.get(url).json()
    assert page["lines"] == lines[:200]  # whole lines only: the partial one waits
    assert (page["has_more"], page["complete"], page["stored"]) == (False, False, False)
    assert api_client.get(url, params={"offset": page["next_offset"]}).json()["lines"] == []

    with path.open("a") as handle:
        handle.write(lines[200][10:] + "\n" + "\n".join(lines[201:]) + "\n")
    shipper.ship()
    follow = api_client.get(url, params={"offset": page["next_offset"]}).json()
    assert follow["lines"] == lines[200:]
    assert api_client.get(url, params={"tail": 3}).json()["lines"] == lines[-3:]

    # Small pages: whole lines each, together the whole log.
    read, offset = [], 0
    while True:
        small = api_client.get(url, params={"offset": offset, "limit": 1000}).json()
        assert small["offset"] == offset and len(small["lines"]) >= 1
        read += small["lines"]
        offset = small["next_offset"]
        if not small["has_more"]:
            break
    assert read == lines

    shipper.finish(DEFAULT_TEAM_ID)
    stored = store.read_bytes(log_key(DEFAULT_TEAM_ID, job_id, attempt))
    assert stored == path.read_bytes()
    assert chunks(settings, job_id) == 0
    final = api_client.get(url).json()
    assert final["lines"] == lines
    assert (final["stored"], final["complete"], final["truncated"]) == (True, True, False)
    assert final["sha256"] == hashlib.sha256(stored).hexdigest()
    assert api_client.get(url, params={"tail": 2}).json()["lines"] == lines[-2:]
    assert api_client.get(url, params={"offset": 5000, "limit": 2000}).json()["offset"] == 5000

    # Mistakes and other teams.
    missing = api_client.get(url, params={"attempt": 7})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "attempt"
    both = api_client.get(url, params={"tail": 3, "offset": 0})
    assert both.status_code == 422 and both.json()["error"]["param"] == "tail"
    assert api_client.get(url, params={"limit": 0}).status_code == 422
    _, other_key = make_team()
    other = api_client.get(url, headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 404


def test_a_log_past_the_limit_keeps_its_beginning(settings, store, api_client, tmp_path):
    job_id, attempt = running_attempt(settings)
    path = tmp_path / "training.log"
    path.write_bytes(b"".join(b"line %05d\n" % i for i in range(2000)))  # 22,000 bytes
    shipper = LogShipper(AttemptWriter(settings, job_id, attempt), path, max_bytes=5000, interval=60)
    shipper.finish(DEFAULT_TEAM_ID)
    page = api_client.get(f"/v1/jobs/{job_id}/logs").json()
    assert page["truncated"] and page["stored"] and page["size"] == 5000
    assert page["lines"] == [f"line {i:05d}" for i in range(454)] + ["line 0"]  # 454 lines of 11 bytes
    assert len(store.read_bytes(log_key(DEFAULT_TEAM_ID, job_id, attempt))) == 5000


def test_a_job_that_never_ran_has_an_empty_log(settings, api_client):
    job_id, _ = running_attempt(settings)
    with session_scope(settings.database_url) as session:
        session.execute(Attempt.__table__.delete().where(Attempt.job_id == job_id))
    page = api_client.get(f"/v1/jobs/{job_id}/logs").json()
    assert (page["attempt"], page["attempts"], page["lines"]) == (None, [], [])
    assert api_client.get(f"/v1/jobs/{job_id}/logs", params={"attempt": 1}).status_code == 404
