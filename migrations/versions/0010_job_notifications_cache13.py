"""Job change notifications: on PostgreSQL, every change to what a job's status answer shows (its row, its latest
attempt's placement, its training progress, its place in the queue) is announced with pg_notify on the channel
`tuneforge_jobs`, so that API processes can cache the answers and drop one as soon as it changes
(api/status_cache.py). The payload is the job's id, followed by ` queue` when the change moves the queue places
of other jobs (a job entering or leaving `queued`, or a queued job's priority changing). Notifications are sent
at commit; a rolled back change sends none. SQLite (the embedded default) has no LISTEN: nothing here.

Revision ID: 0010_cache13
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_cache13"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "tuneforge_jobs"

JOB_CHANGED = f"""
CREATE FUNCTION tuneforge_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_id text := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
    was_queued boolean := TG_OP <> 'INSERT' AND OLD.status = 'queued';
    is_queued boolean := TG_OP <> 'DELETE' AND NEW.status = 'queued';
BEGIN
    IF was_queued <> is_queued OR (
        is_queued AND TG_OP = 'UPDATE'
        AND (OLD.priority_rank, OLD.created_at) IS DISTINCT FROM (NEW.priority_rank, NEW.created_at)
    ) THEN
        PERFORM pg_notify('{CHANNEL}', row_id || ' queue');
    ELSIF TG_OP <> 'INSERT' THEN
        -- A new job that is not queued changes no answer that exists yet (a 404 is not cached).
        PERFORM pg_notify('{CHANNEL}', row_id);
    END IF;
    RETURN NULL;
END $$
"""

# The latest attempt's placement (host, GPUs, launcher) is part of the answer; its other columns (GPU-seconds
# charged, log bytes shipped) change often and are not.
ATTEMPT_CHANGED = f"""
CREATE FUNCTION tuneforge_attempt_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', CASE WHEN TG_OP = 'DELETE' THEN OLD.job_id ELSE NEW.job_id END);
    RETURN NULL;
END $$
"""

# A training job's progress comes from its metric points: one notification per job a statement touched (the
# workers write points in batches), whatever the batch's size.
METRICS_CHANGED = f"""
CREATE FUNCTION tuneforge_metrics_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{CHANNEL}', job_id) FROM (SELECT DISTINCT job_id FROM old_points) AS changed;
    ELSE
        PERFORM pg_notify('{CHANNEL}', job_id) FROM (SELECT DISTINCT job_id FROM new_points) AS changed;
    END IF;
    RETURN NULL;
END $$
"""

TRIGGERS = (
    "CREATE TRIGGER tuneforge_job_changed AFTER INSERT OR DELETE ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION tuneforge_job_changed()",
    # A lease renewal (heartbeat_at moved, updated_at and status kept: claims.KEEP_UPDATED_AT) changes nothing the
    # answer shows. Left out, as the nodes renew every running job every few seconds, and every transaction
    # that notifies takes PostgreSQL's one notification-queue lock at commit.
    "CREATE TRIGGER tuneforge_job_updated AFTER UPDATE ON jobs FOR EACH ROW WHEN ("
    "OLD.heartbeat_at IS NOT DISTINCT FROM NEW.heartbeat_at OR OLD.updated_at IS DISTINCT FROM NEW.updated_at "
    "OR OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION tuneforge_job_changed()",
    "CREATE TRIGGER tuneforge_attempt_changed AFTER INSERT OR DELETE OR UPDATE OF job_id, number, host, "
    "gpu_indices, launcher ON attempts FOR EACH ROW EXECUTE FUNCTION tuneforge_attempt_changed()",
    # A trigger with transition tables takes one event.
    "CREATE TRIGGER tuneforge_metrics_inserted AFTER INSERT ON job_metrics REFERENCING NEW TABLE AS new_points "
    "FOR EACH STATEMENT EXECUTE FUNCTION tuneforge_metrics_changed()",
    "CREATE TRIGGER tuneforge_metrics_updated AFTER UPDATE ON job_metrics REFERENCING NEW TABLE AS new_points "
    "FOR EACH STATEMENT EXECUTE FUNCTION tuneforge_metrics_changed()",
    "CREATE TRIGGER tuneforge_metrics_deleted AFTER DELETE ON job_metrics REFERENCING OLD TABLE AS old_points "
    "FOR EACH STATEMENT EXECUTE FUNCTION tuneforge_metrics_changed()",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in (JOB_CHANGED, ATTEMPT_CHANGED, METRICS_CHANGED, *TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for trigger, table in (
        ("tuneforge_metrics_deleted", "job_metrics"),
        ("tuneforge_metrics_updated", "job_metrics"),
        ("tuneforge_metrics_inserted", "job_metrics"),
        ("tuneforge_attempt_changed", "attempts"),
        ("tuneforge_job_updated", "jobs"),
        ("tuneforge_job_changed", "jobs"),
    ):
        op.execute(f"DROP TRIGGER {trigger} ON {table}")
    for function in ("tuneforge_metrics_changed", "tuneforge_attempt_changed", "tuneforge_job_changed"):
        op.execute(f"DROP FUNCTION {function}()")
