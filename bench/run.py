"""Benchmarks, printed as figures:

(a) a LoRA job's wall time through the service (HTTP -> queue -> worker -> storage -> database) against the
    same training in a bare transformers + peft script (same model, data, steps, batch, rank);
(b) job-status GET throughput and p50/p99 latency with 64 concurrent clients, next to /healthz of the same app.

By default the service runs on its embedded default (SQLite, a local storage folder, a folder-based broker)
in a temporary folder. Set TUNEFORGE_DATABASE_URL / TUNEFORGE_BROKER_URL (and the S3 settings) to measure
against PostgreSQL, Redis and S3 instead.

    .venv/bin/python bench/run.py [--steps 40] [--model tiny|small] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import Service, run_service_job  # noqa: E402

MODELS = {
    # name: (hidden, layers, heads, kv heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (512, 8, 8, 4, 1408),
}

BARE_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
cfg = json.loads(sys.argv[1])
t_import = time.perf_counter()
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
rows = [json.loads(line) for line in open(cfg["data"])]
ids = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in rows]
ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.05,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                         learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=42)
trainer = Trainer(model=model, args=args, train_dataset=ds,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
t_train = time.perf_counter()
trainer.train()
t_trained = time.perf_counter()
model.save_pretrained(cfg["out"] + "/adapter")
t_end = time.perf_counter()
print(json.dumps({"import": t_import - t0, "setup": t_train - t_import, "train": t_trained - t_train,
                  "total_after_import": t_end - t_import}))
"""


def write_dataset(path: Path, n: int) -> None:
    rng_things = ["apple", "banana", "sky", "grass", "coal", "snow", "plum", "orange"]
    colors = ["red", "yellow", "blue", "green", "black", "white", "purple", "orange"]
    with path.open("w") as out:
        for i in range(n):
            k = i % len(rng_things)
            row = {
                "messages": [
                    {"role": "user", "content": f"What color is {rng_things[k]}? Answer in one sentence."},
                    {"role": "assistant", "content": f"The color of {rng_things[k]} is {colors[k]}."},
                ]
            }
            out.write(json.dumps(row) + "\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def hammer(
    base_url: str, path: str, total: int, concurrency: int, headers: dict[str, str]
) -> dict[str, float]:
    """`concurrency` clients on kept-alive connections send `total` GETs; a first round opens the connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30, headers=headers) as client:
        latencies: list[float] = []
        errors = 0
        remaining = 0

        async def one_client() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.get(path)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        remaining = concurrency * 4
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        latencies.clear()
        remaining = total
        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    value, unit = float(match[1]), match[2]
    return value * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def hammer_with_wrk(
    base_url: str, path: str, seconds: int, concurrency: int, headers: dict[str, str]
) -> dict[str, float]:
    """The same load from wrk (C, one thread): it takes less of the shared CPUs than a Python client."""
    url = base_url + path
    header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", "-d2s", *header_args, url], capture_output=True, check=True
    )  # warm-up
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", *header_args, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", out)[1])
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    return {
        "requests": requests,
        "errors": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": errors[0] if errors else "",
        "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1]),
        "p50_ms": 1000 * _seconds(percentiles["50"]),
        "p99_ms": 1000 * _seconds(percentiles["99"]),
    }


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def run_bare(cfg: dict) -> dict[str, float]:
    """Runs the bare transformers + peft script in a fresh process; returns its phase timings."""
    out = subprocess.run(
        [sys.executable, "-c", BARE_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--requests", type=int, default=4000, help="per endpoint, with the Python client")
    parser.add_argument("--seconds", type=int, default=10, help="per endpoint, with wrk")
    parser.add_argument("--repeats", type=int, default=3, help="service and bare runs for (a)")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    from worker.training.toy_models import build_llama

    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    hidden, layers, heads, kv, inter = MODELS[args.model]
    model_dir = build_llama(
        work / "model",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=inter,
        vocab_size=2048,
        corpus=["What color is apple? The color of apple is red."] * 50,
    )
    data = work / "train.jsonl"
    write_dataset(data, 256)

    env = {k: v for k, v in os.environ.items()}
    env.setdefault("TUNEFORGE_HOME", str(work / "home"))
    env["TUNEFORGE_MODELS"] = json.dumps({"bench": {"location": f"file://{model_dir}"}})
    env["TUNEFORGE_LOG_LEVEL"] = "WARNING"
    stack = Service(env, work / "service.log")
    try:
        stack.start()
        base_url = stack.base_url
        from shared.settings import Settings

        settings = Settings(
            **{
                k.removeprefix("TUNEFORGE_").lower(): v
                for k, v in env.items()
                if k.startswith("TUNEFORGE_") and k != "TUNEFORGE_MODELS"
            }
        )
        print(
            f"stack: database={settings.database_url.split('://')[0]} broker={settings.broker_url.split('://')[0]} "
            f"storage={settings.storage_backend}; model={args.model} (hidden {hidden}, {layers} layers); "
            f"{args.steps} steps, batch {args.batch}, rank {args.rank}; {os.cpu_count()} CPUs"
        )
        client = stack.client()
        headers = {"Authorization": f"Bearer {client.api_key}"}
        file_id = client.upload_file(data)["id"]
        spec = {
            "base_model": "bench",
            "dataset": file_id,
            "adapter": {"rank": args.rank, "target_modules": "all-linear"},
            "hyperparameters": {"max_steps": args.steps, "batch_size": args.batch, "max_seq_length": 512},
        }
        # A warm-up job, so the worker's first-job imports and caches do not count.
        run_service_job(client, {**spec, "hyperparameters": {"max_steps": 1}}, poll=0.2)

        bare_cfg = {
            "model": str(model_dir),
            "data": str(data),
            "steps": args.steps,
            "batch": args.batch,
            "rank": args.rank,
            "out": str(work / "bare"),
        }
        runs = []
        # Alternate service and bare runs so that drift on the shared machine hits both alike.
        for _ in range(args.repeats):
            job, service_wall = run_service_job(client, spec)
            if job["status"] != "succeeded":
                print("job failed:", job["error"])
                return 1
            runs.append((service_wall, job["result"]["train_runtime_seconds"], run_bare(bare_cfg)))
        job_id = job["id"]
        service = statistics.median(r[0] for r in runs)
        service_train = statistics.median(r[1] for r in runs)
        bare_total = statistics.median(r[2]["total_after_import"] for r in runs)
        bare_train = statistics.median(r[2]["train"] for r in runs)
        print(
            f"\n(a) LoRA job: service vs bare transformers+peft script (median of {args.repeats} runs each)"
        )
        print(
            f"  service, submit -> succeeded (wall):         {service:8.2f} s   runs: {fmt([r[0] for r in runs])}"
        )
        print(f"    of which the training loop:                {service_train:8.2f} s")
        print(
            f"  bare script, model load -> adapter saved:    {bare_total:8.2f} s   "
            f"runs: {fmt([r[2]['total_after_import'] for r in runs])}"
        )
        print(f"    of which the training loop:                {bare_train:8.2f} s   (imports not counted)")
        print(f"  ratio service / bare:                        {service / bare_total:8.2f}")
        print(f"  overhead per job:                            {service - bare_total:8.2f} s")

        tool = "wrk" if shutil.which("wrk") else "a Python asyncio client"
        print(
            f"\n(b) GET throughput, {args.concurrency} concurrent connections, load from {tool} on the same CPUs"
        )
        for path in (f"/v1/jobs/{job_id}", "/healthz"):
            if shutil.which("wrk"):
                result = hammer_with_wrk(base_url, path, args.seconds, args.concurrency, headers)
            else:
                result = asyncio.run(hammer(base_url, path, args.requests, args.concurrency, headers))
            print(
                f"  GET {path:42s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
                f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}"
            )
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
