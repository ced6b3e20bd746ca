"""The user commands of `tuneforge`: submit, list, status, events, logs, cancel, download, files.

Every call goes through the SDK (the tuneforge_sdk package). The API's URL and key come from --url / --api-key, or
TUNEFORGE_URL / TUNEFORGE_API_KEY, or (the key) the embedded default's file $TUNEFORGE_HOME/api-key.
Exit codes: 0 done (a followed job succeeded), 1 an API or download error, or a followed job that failed or was
cancelled, 2 bad input, 130 interrupted (a followed job keeps running).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tuneforge_sdk import DEFAULT_URL, TERMINAL_STATUSES, APIConnectionError, Tuneforge, TuneforgeError

METHODS = ("lora", "dora", "rslora", "qlora", "dpo", "merge", "fusion", "export")
TRAINING_METHODS = frozenset({"lora", "dora", "rslora", "qlora", "dpo"})
DATASET_METHODS = TRAINING_METHODS | {"fusion"}
PRIORITIES = ("low", "normal", "high")
TARGET_PRESETS = ("attention", "all-linear")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
DATASET_FIELDS = ("dataset", "validation_dataset")
JOB_STATUSES = (
    "validating",
    "queued",
    "running",
    "cancelling",
    "pausing",
    "paused",
    "succeeded",
    "failed",
    "cancelled",
)

files_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)

F = TypeVar("F", bound=Callable[..., Any])


class SpecError(ValueError):
    """Bad input on the command line or in a spec file; the message says what to change."""


# ------------------------------------------------------------------------------------- building a spec


def parse_metadata(items: list[str] | None) -> dict[str, str]:
    """`KEY=VALUE` pairs (split at the first `=`; the value may be empty); the last of a repeated key wins."""
    metadata: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--metadata expects KEY=VALUE, got {item!r}")
        metadata[key] = value
    return metadata


def parse_target_modules(value: str) -> str | list[str]:
    """`attention`, `all-linear`, or a comma-separated list of module names."""
    value = value.strip()
    if value in TARGET_PRESETS:
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise SpecError("--target-modules expects attention, all-linear or a comma-separated list of names")
    return names


def parse_assignments(items: list[str] | None) -> list[tuple[list[str], Any]]:
    """`--set a.b.c=VALUE` overrides; VALUE is read as YAML (3, 0.1, true, [q_proj, v_proj], text)."""
    import yaml

    parsed = []
    for item in items or []:
        path, sep, raw = item.partition("=")
        keys = [key.strip() for key in path.split(".")]
        if not sep or not all(keys):
            raise SpecError(
                f"--set expects FIELD.PATH=VALUE (e.g. hyperparameters.warmup_ratio=0.1), got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {path}: cannot read {raw!r}: {exc}") from None
        parsed.append((keys, value))
    return parsed


def is_remote_dataset(value: str) -> bool:
    """An uploaded file id or a URI (s3://, file://): passed to the API as it is."""
    return bool(FILE_ID.match(value.strip())) or "://" in value


def load_spec_file(path: Path) -> dict[str, Any]:
    """Reads a JobSpec from YAML or JSON. Local dataset paths in it are relative to the file's folder."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read the spec file {path}: {exc.strerror or exc}") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML or JSON: {exc}") from None
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpecError(f"{path} must hold a mapping of JobSpec fields, not a {type(spec).__name__}")
    for field in DATASET_FIELDS:
        value = spec.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise SpecError(f"{path}: {field} must be a string (a local path, a file id or a URI)")
        if not is_remote_dataset(value):
            local = Path(value).expanduser()
            spec[field] = str(local if local.is_absolute() else (path.parent / local).resolve())
    return spec


def _section(spec: dict[str, Any], name: str) -> dict[str, Any]:
    value = spec.get(name)
    if value is None:
        value = spec[name] = {}
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be a mapping, not {value!r}")
    return value


def build_spec(
    base: dict[str, Any] | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    validation_dataset: str | None = None,
    method: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    target_modules: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    max_seq_length: int | None = None,
    gpus: int | None = None,
    priority: str | None = None,
    metadata: list[str] | None = None,
    assignments: list[str] | None = None,
) -> dict[str, Any]:
    """A JobSpec dict: `base` (from --file) with every given flag laid over it. The API fills in defaults
    and checks values; this checks only what it can say more clearly here."""
    spec = copy.deepcopy(base) if base else {}
    if epochs is not None and max_steps is not None:
        raise SpecError("give --epochs or --max-steps, not both")
    for field, value in (
        ("base_model", model),
        ("dataset", dataset),
        ("validation_dataset", validation_dataset),
        ("method", method),
        ("priority", priority),
    ):
        if value is not None:
            spec[field] = value
    adapter = {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": parse_target_modules(target_modules) if target_modules is not None else None,
    }
    if any(v is not None for v in adapter.values()):
        _section(spec, "adapter").update({k: v for k, v in adapter.items() if v is not None})
    hyper = {
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
    }
    if any(v is not None for v in (epochs, max_steps, *hyper.values())):
        section = _section(spec, "hyperparameters")
        section.update({k: v for k, v in hyper.items() if v is not None})
        # A training length from the command line replaces the file's (the API takes only one of them).
        if epochs is not None:
            section["epochs"] = epochs
            section.pop("max_steps", None)
        if max_steps is not None:
            section["max_steps"] = max_steps
            section.pop("epochs", None)
    if gpus is not None:
        _section(spec, "resources")["gpus"] = gpus
    extra = parse_metadata(metadata)
    if extra:
        _section(spec, "metadata").update(extra)
    for keys, value in parse_assignments(assignments):
        node = spec
        for key in keys[:-1]:
            node = _section(node, key)
        node[keys[-1]] = value
    _check_spec(spec)
    return spec


def _check_spec(spec: dict[str, Any]) -> None:
    method = spec.get("method", "lora")
    if method not in METHODS:
        raise SpecError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method in TRAINING_METHODS and not spec.get("base_model"):
        raise SpecError(f"method {method} needs a base model: --model NAME (or base_model in --file)")
    if method in DATASET_METHODS and not spec.get("dataset"):
        raise SpecError(
            f"method {method} needs a dataset: --dataset PATH|FILE_ID|s3://... (or dataset in --file)"
        )
    for field in DATASET_FIELDS:
        value = spec.get(field)
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{field} must be a string (a local path, a file id or a URI)")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SpecError("metadata must be a mapping of strings")
    spec_meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    if metadata:
        spec["metadata"] = spec_meta


def local_datasets(spec: dict[str, Any]) -> dict[str, Path]:
    """The spec's dataset fields that name local files (to upload); raises on a path that does not exist."""
    local = {}
    for field in DATASET_FIELDS:
        value = spec.get(field)
        if value is None or is_remote_dataset(value):
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            flag = "--" + field.replace("_", "-")
            raise SpecError(
                f"{flag} {value!r}: no such file; give a local JSONL path, an uploaded file id (file-…), "
                "or a URI (s3://bucket/key, file:///path)"
            )
        local[field] = path
    return local


# ------------------------------------------------------------------------------------------- plumbing


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="TUNEFORGE_URL",
        help=f"API base URL (default: {DEFAULT_URL})",
        rich_help_panel="Connection",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TUNEFORGE_API_KEY",
        help="your team's API key (default: the embedded default's, in $TUNEFORGE_HOME/api-key)",
        show_default=False,
        rich_help_panel="Connection",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _print_error(error: TuneforgeError, base_url: str | None) -> None:
    err = _err()
    where = f" (param: {escape(error.param)})" if error.param else ""
    status = f"HTTP {error.status_code}, " if error.status_code is not None else ""
    err.print(f"[red]error:[/red] {escape(error.message)}{where} [dim]({status}{escape(error.code)})[/dim]")
    if error.status_code == 401:
        err.print("hint: pass --api-key or set TUNEFORGE_API_KEY to your team's key")
    if isinstance(error, APIConnectionError):
        err.print(
            f"hint: is the API running at {escape(base_url or DEFAULT_URL)}? set --url or TUNEFORGE_URL"
        )


def _handles_errors(fn: F) -> F:
    """Turns API errors and bad input into a message and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            _err().print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except TuneforgeError as exc:
            _print_error(exc, kwargs.get("url"))
            raise typer.Exit(1) from None
        except OSError as exc:  # a local file or folder: unreadable, unwritable, full disk
            _err().print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _err().print("interrupted (a job keeps running; `tuneforge cancel JOB_ID` stops it)")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _when(value: str | float | None) -> str:
    """A timestamp (ISO 8601 text, or unix seconds as the OpenAI-shaped file objects give) as UTC text."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)[:19].replace("T", " ")


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "cancelling": "yellow",
    "pausing": "blue",
    "paused": "blue",
    "running": "cyan",
}


def _status(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def total_steps(job: dict[str, Any]) -> int | None:
    """The job's optimizer steps when known: max_steps, or the total of its plan's schedule."""
    hyper = job.get("hyperparameters") or {}
    if hyper.get("max_steps"):
        return int(hyper["max_steps"])
    found = ((job.get("plan") or {}).get("schedule") or {}).get("total_steps")
    return int(found) if isinstance(found, int | float) and found > 0 else None


def _event_line(event: dict[str, Any]) -> str:
    level = event.get("level", "info")
    style = {"error": "red", "warning": "yellow"}.get(level, "dim")
    return (
        f"[dim]{_when(event.get('created_at'))[11:]}[/dim] [{style}]{level:<7}[/{style}] "
        f"{escape(event.get('type', '')):<10} {escape(event.get('message', ''))}"
    )


def _summary(job: dict[str, Any], curves: dict[str, Any]) -> str:
    train, evals = curves.get("train") or [], curves.get("eval") or []
    line = f"job {job['id']} {_status(job['status'])}"
    if train:
        first, last = train[0]["loss"], train[-1]["loss"]
        line += f" after {train[-1]['step']} steps: train loss {_loss(first)} → {_loss(last)}"
    if evals:
        line += f", eval loss {_loss(evals[-1]['loss'])}"
    error = job.get("error")
    if error:
        line += f"\n[red]{escape(error.get('code', ''))}[/red]: {escape(error.get('message', ''))}"
    return line


def watch(
    client: Tuneforge,
    job_id: str,
    *,
    interval: float = 2.0,
    show_events: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Shows a live progress bar of the job's steps with its latest train and eval loss (and its events
    as they come) until it ends; returns the final job."""
    console = console or _out()
    after: int | None = None
    curves: dict[str, Any] = {"train": [], "eval": []}
    with Progress(
        TextColumn("{task.fields[status]:>10}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("train loss {task.fields[train]}"),
        TextColumn("eval loss {task.fields[eval]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(job_id, total=None, status="", steps="", train="-", eval="-")
        while True:
            job = client.get_job(job_id)
            if show_events:
                for event in client.events(job_id, after):
                    after = event["id"]
                    progress.console.print(_event_line(event))
            if job["status"] not in ("validating", "queued"):
                curves = client.metrics(job_id)
            train, evals = curves.get("train") or [], curves.get("eval") or []
            step = train[-1]["step"] if train else 0
            total = total_steps(job)
            if job["status"] == "succeeded" and total is None:
                total = step
            progress.update(
                task,
                completed=step,
                total=total,
                status=job["status"],
                steps=f"step {step}/{total if total is not None else '?'}",
                train=_loss(train[-1]["loss"]) if train else "-",
                eval=_loss(evals[-1]["loss"]) if evals else "-",
            )
            if job["status"] in TERMINAL_STATUSES:
                break
            time.sleep(interval)
    console.print(_summary(job, curves))
    return job


def _exit_for(job: dict[str, Any]) -> None:
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


# ------------------------------------------------------------------------------------------- commands


@_handles_errors
def submit(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="a JobSpec in YAML or JSON; flags override its fields", dir_okay=False
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="base model (see GET /v1/models)")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="a local JSONL file (uploaded first), a file id or s3://bucket/key"
        ),
    ] = None,
    validation_dataset: Annotated[
        str | None, typer.Option("--validation-dataset", help="the same, for evaluation")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help=f"{', '.join(METHODS)} (default: lora)", show_default=False)
    ] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA rank", rich_help_panel="Adapter")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (default: 2 x rank)", rich_help_panel="Adapter")
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="LoRA dropout", rich_help_panel="Adapter")
    ] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(help="attention, all-linear, or names: q_proj,v_proj", rich_help_panel="Adapter"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, rich_help_panel="Training")] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="optimizer steps (replaces epochs)", rich_help_panel="Training")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", "--lr", rich_help_panel="Training")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, rich_help_panel="Training")] = None,
    max_seq_length: Annotated[int | None, typer.Option(min=1, rich_help_panel="Training")] = None,
    gpus: Annotated[int | None, typer.Option(min=1, rich_help_panel="Training")] = None,
    priority: Annotated[str | None, typer.Option(help="low, normal or high")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE (repeatable)", show_default=False)
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="any spec field: hyperparameters.warmup_ratio=0.1 (repeatable)", show_default=False
        ),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="watch the job until it ends")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the spec that would be sent; upload and submit nothing")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Submits a fine-tuning job; a local dataset file is uploaded first.

    Example: tuneforge submit -m smollm2-135m-instruct -d train.jsonl --rank 16 --epochs 3 --follow
    """
    if priority is not None and priority not in PRIORITIES:
        raise SpecError(f"--priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    spec = build_spec(
        load_spec_file(file) if file is not None else None,
        model=model,
        dataset=dataset,
        validation_dataset=validation_dataset,
        method=method,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        gpus=gpus,
        priority=priority,
        metadata=metadata,
        assignments=assignments,
    )
    uploads = local_datasets(spec)
    if dry_run:
        _print_json(spec)
        return
    out = _err() if quiet or json_out else _out()
    with Tuneforge(base_url=url, api_key=api_key) as client:
        for field, path in uploads.items():
            record = client.upload_file(path)
            spec[field] = record["id"]
            out.print(
                f"uploaded {escape(str(path))}: {record['num_samples']} samples ({record['format']}) "
                f"as {record['id']}"
            )
        job = client.create_job(spec)
        if json_out:
            _print_json(job)
        elif quiet:
            typer.echo(job["id"])
        else:
            out.print(f"submitted job [bold]{job['id']}[/bold] ({_status(job['status'])})")
        if follow:
            _exit_for(watch(client, job["id"], console=_err() if quiet or json_out else _out()))


@_handles_errors
def list_jobs(
    status: Annotated[
        str | None, typer.Option(help=f"only jobs in this state: {', '.join(JOB_STATUSES)}")
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="at most this many (0: all)")] = 20,
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Lists your team's jobs, newest first."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        jobs = list(client.list_jobs(status=status, limit=limit or None))
    if json_out:
        _print_json(jobs)
        return
    table = Table("id", "status", "method", "base model", "created", "finished", "error")
    table.columns[0].no_wrap = True
    for job in jobs:
        error = job.get("error") or {}
        table.add_row(
            job["id"],
            _status(job["status"]),
            job["method"],
            escape(job.get("base_model") or "-"),
            _when(job.get("created_at")),
            _when(job.get("finished_at")),
            escape(error.get("code", "")),
        )
    console = _out()
    console.print(table)
    if not jobs:
        console.print("no jobs" + (f" in state {status}" if status else ""))


@_handles_errors
def status(
    job_id: str,
    once: Annotated[bool, typer.Option("--once", help="print one snapshot instead of following")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between updates")] = 2.0,
    events: Annotated[bool, typer.Option("--events/--no-events", help="print events as they come")] = True,
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Follows a job with a live progress bar (steps, train and eval loss) until it ends; exits 1 unless it
    succeeded. --once prints one snapshot."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        if not once:
            _exit_for(watch(client, job_id, interval=interval, show_events=events))
            return
        job = client.get_job(job_id)
        curves = client.metrics(job_id)
    if json_out:
        _print_json({"job": job, "metrics": curves})
        return
    train, evals = curves.get("train") or [], curves.get("eval") or []
    total = total_steps(job)
    step = train[-1]["step"] if train else 0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("job", job["id"])
    grid.add_row("status", f"{_status(job['status'])} (attempt {job.get('attempt', 0)})")
    grid.add_row("method", f"{job['method']} on {escape(job.get('base_model') or '-')}")
    if job.get("dataset"):
        grid.add_row("dataset", escape(job["dataset"]))
    if job.get("validation_dataset"):
        grid.add_row("validation", escape(job["validation_dataset"]))
    grid.add_row("progress", f"step {step}/{total if total is not None else '?'}")
    grid.add_row("train loss", f"{_loss(train[-1]['loss'])} (step {step})" if train else "-")
    grid.add_row("eval loss", f"{_loss(evals[-1]['loss'])} (step {evals[-1]['step']})" if evals else "-")
    grid.add_row("created", _when(job.get("created_at")))
    grid.add_row("started", _when(job.get("started_at")))
    grid.add_row("finished", _when(job.get("finished_at")))
    if job.get("metadata"):
        grid.add_row("metadata", escape(", ".join(f"{k}={v}" for k, v in job["metadata"].items())))
    if job.get("error"):
        grid.add_row("error", f"[red]{escape(job['error']['code'])}[/red]: {escape(job['error']['message'])}")
    if job.get("result"):
        shown = {
            k: f"{v:.4g}" if isinstance(v, float) else v
            for k, v in job["result"].items()
            if isinstance(v, int | float | str)
        }
        grid.add_row("result", escape(", ".join(f"{k}={v}" for k, v in shown.items())))
    _out().print(grid)


@_handles_errors
def events(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-F", help="stream new events until the job ends")
    ] = False,
    after: Annotated[int | None, typer.Option(min=0, help="only events after this event id")] = None,
    poll: Annotated[
        bool, typer.Option("--poll", help="with --follow: poll instead of the event stream")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Prints a job's events in order (--follow: as they happen, until the job ends)."""
    console = _out()
    with Tuneforge(base_url=url, api_key=api_key) as client:
        source = (
            client.follow_events(job_id, after, stream=not poll) if follow else client.events(job_id, after)
        )
        for event in source:
            if json_out:
                typer.echo(json.dumps(event))
            else:
                console.print(_event_line(event))


@_handles_errors
def logs(
    job_id: str,
    attempt: Annotated[int | None, typer.Option(min=1, help="the attempt; default: the latest")] = None,
    tail: Annotated[int | None, typer.Option(min=1, help="only the last N lines")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-F", help="print new output as it comes, until the job ends")
    ] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Prints a job's training output (every rank and the launcher), attempt by attempt."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        if follow:
            shown: int | None = None
            for number, line in client.follow_logs(job_id, attempt=attempt, tail=tail):
                if number != shown and attempt is None:
                    _err().print(f"[dim]-- attempt {number} --[/dim]")
                    shown = number
                typer.echo(line)
            return
        page = client.logs(job_id, attempt=attempt, tail=tail)
        while True:
            for line in page["lines"]:
                typer.echo(line)
            if not page["has_more"]:
                break
            page = client.logs(job_id, attempt=page["attempt"], offset=page["next_offset"])
        if page["attempt"] is None:
            _err().print(f"job {job_id} has not started training yet: no output")
        elif page["truncated"]:
            _err().print("[yellow]the output was longer than the server keeps; the rest was dropped[/yellow]")


@_handles_errors
def cancel(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Cancels a job: at once if it waits, within seconds if it trains."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        job = client.cancel_job(job_id)
    note = " (it stops within seconds)" if job["status"] == "cancelling" else ""
    _out().print(f"job {job['id']} {_status(job['status'])}{note}")


@_handles_errors
def pause(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Pauses a job: a queued one at once; a training one checkpoints, then gives its GPUs back."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        job = client.pause_job(job_id)
    note = " (it checkpoints, then pauses)" if job["status"] == "pausing" else ""
    _out().print(f"job {job['id']} {_status(job['status'])}{note}")


@_handles_errors
def resume(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Puts a paused job back in the queue; it continues from its latest checkpoint."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        job = client.resume_job(job_id)
    _out().print(f"job {job['id']} {_status(job['status'])}")


@_handles_errors
def download(
    job_id: str,
    dest: Annotated[Path, typer.Option(help="folder to put <job_id>-<kind>/ in", file_okay=False)] = Path(
        "."
    ),
    kind: Annotated[str, typer.Option(help="adapter or merged")] = "adapter",
    force: Annotated[bool, typer.Option("--force", help="replace an earlier download")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Downloads a finished job's adapter (or merged model) and checks every file's sha256."""
    if kind not in ("adapter", "merged"):
        raise SpecError(f"--kind must be adapter or merged, not {kind!r}")
    with Tuneforge(base_url=url, api_key=api_key) as client:
        folder = client.download_adapter(job_id, dest, kind, overwrite=force)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"]
    size = sum(p.stat().st_size for p in files)
    _out().print(f"downloaded {len(files)} files ({size:,} bytes) to {escape(str(folder))}; sha256 verified")


@files_app.command("upload")
@_handles_errors
def files_upload(
    path: Annotated[Path, typer.Argument(help="a JSONL dataset", dir_okay=False)],
    purpose: str = "fine-tune",
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Uploads a JSONL dataset (every line is checked); prints its file id."""
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    with Tuneforge(base_url=url, api_key=api_key) as client:
        record = client.upload_file(path, purpose=purpose)
    if json_out:
        _print_json(record)
        return
    _out().print(
        f"{record['id']}: {escape(record['filename'])}, {record['num_samples']} samples ({record['format']}), "
        f"{record['bytes']:,} bytes"
    )


@files_app.command("list")
@_handles_errors
def files_list(json_out: JsonOption = False, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Lists your team's uploaded files, newest first."""
    with Tuneforge(base_url=url, api_key=api_key) as client:
        records = client.list_files()
    if json_out:
        _print_json(records)
        return
    table = Table("id", "filename", "format", "samples", "bytes", "created")
    table.columns[0].no_wrap = True
    for record in records:
        table.add_row(
            record["id"],
            escape(record["filename"]),
            record["format"],
            str(record["num_samples"]),
            f"{record['bytes']:,}",
            _when(record.get("created_at")),
        )
    _out().print(table)


def register(app: typer.Typer) -> None:
    """Adds the user commands to the `tuneforge` app."""
    app.command("submit")(submit)
    app.command("list")(list_jobs)
    app.command("status")(status)
    app.command("events")(events)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("download")(download)
    app.add_typer(files_app, name="files")
