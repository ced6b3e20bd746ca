"""The prepared GPU check: LoRA and QLoRA jobs under DeepSpeed ZeRO-2 and ZeRO-3, through the service, on a
Llama-architecture model with random weights; prints tokens/s and the measured peak GPU memory next to the
plan's estimate for each. Then the service against a bare transformers + peft script on the same GPU (same
model, batch, sequence length, precision and attention kernel): the ratio of their training loops and both
model FLOPs utilizations.

    .venv/bin/python bench/gpu.py [--size 3b] [--gpus N] [--steps 20] [--seq 1024] [--batch 4]
                                  [--peak-tflops 989] [--skip-zero] [--skip-bare]

It builds the model (on the GPU when there is one), starts the service on its embedded default in a
temporary folder (SQLite, a local storage folder, the folder broker) with one worker driving all GPUs, and
submits one job per (method, ZeRO stage). Every job goes through validation, the plan, the worker's
launcher (torchrun) and the recipe, as users' jobs do. A job that fails is printed with its error; the
others still run.

MFU = non-pad tokens x FLOPs per token / loop seconds / peak, with FLOPs per token = 4N + 6P + 12·L·s·d +
4·h·V (README) and the peak configured (--peak-tflops, e.g. 989 for an H100's dense bf16) or measured (the
best 8192-wide bf16 matmul). It ends with `name value` lines: loop_ratio_gpu, mfu_service, mfu_bare.

On a machine without a GPU, `--size tiny --gpus 2` runs the same path as two CPU processes over gloo (the
peak GPU column is then empty): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import Service, run_service_job  # noqa: E402
from tuneforge_sdk import TuneforgeError  # noqa: E402

# name: hidden, layers, heads, kv heads, intermediate (the shapes of well-known Llama-architecture models;
# the vocabulary is this script's small tokenizer's, so the embeddings are smaller than theirs)
SIZES = {
    "tiny": (64, 2, 4, 2, 128),
    "1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
    "3b": (3072, 28, 24, 8, 8192),  # Llama-3.2-3B
    "8b": (4096, 32, 32, 8, 14336),  # Llama-3.1-8B
}
WORDS = [
    "model",
    "adapter",
    "rank",
    "tensor",
    "gradient",
    "optimizer",
    "shard",
    "layer",
    "token",
    "batch",
    "memory",
    "checkpoint",
    "queue",
    "worker",
    "loss",
    "learning",
    "rate",
    "schedule",
    "warmup",
    "epoch",
    "dataset",
    "sample",
    "sequence",
    "attention",
    "projection",
]


def build_model(out_dir: Path, size: str, seq: int) -> tuple[Path, int, int]:
    """A randomly initialised Llama of the given shape, saved in bf16 (built on the GPU when there is one).
    Returns the folder, parameter count and vocabulary size."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.training.toy_models import build_llama

    hidden, layers, heads, kv_heads, intermediate = SIZES[size]
    on_gpu = torch.cuda.is_available()
    build_llama(
        out_dir,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=2048,
        max_position_embeddings=max(seq, 2048),
        corpus=[" ".join(WORDS)] * 20,
        dtype="bfloat16" if on_gpu else "float32",
        device="cuda" if on_gpu else "cpu",
    )
    if on_gpu:
        torch.cuda.empty_cache()
    config = AutoConfig.from_pretrained(out_dir)
    with init_empty_weights():
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return out_dir, count, config.vocab_size


def write_dataset(path: Path, rows: int, words_per_row: int) -> None:
    """Plain-text rows long enough to fill the sequence length (the tokenizer splits about a word a token)."""
    import random

    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(rows):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words_per_row))}) + "\n")


BARE_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
cfg = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(cfg["model"])
cuda = torch.cuda.is_available()
model = AutoModelForCausalLM.from_pretrained(
    cfg["model"], dtype=torch.bfloat16 if cfg["bf16"] else torch.float32, attn_implementation=cfg["attn"],
    device_map={"": 0} if cuda else None)
rows = [json.loads(line) for line in open(cfg["data"])]
ids = [tok(r["text"], truncation=True, max_length=cfg["seq"])["input_ids"] for r in rows]
ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.05,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                         learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                         bf16=cfg["bf16"], gradient_checkpointing=cfg["checkpointing"], use_cpu=not cuda,
                         disable_tqdm=True, seed=42, include_num_input_tokens_seen="non_padding")
trainer = Trainer(model=model, args=args, train_dataset=ds,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
started = time.perf_counter()
trainer.train()
print(json.dumps({"train": time.perf_counter() - started, "tokens": int(trainer.state.num_input_tokens_seen)}))
"""


def flops_per_token(model_dir: Path, rank: int, seq: int) -> float:
    """4N + 6P + 12·L·s·d + 4·h·V for the benchmark's model and a LoRA of `rank` on every linear layer, its
    samples `seq` tokens long."""
    from transformers import AutoConfig

    from shared.planning import ModelShape, adapter_parameters
    from shared.schemas import JobSpec

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir).to_dict())
    spec = JobSpec(
        base_model="bench", dataset="unused", adapter={"rank": rank, "target_modules": "all-linear"}
    )
    frozen = shape.linear_parameters() + shape.norm_parameters()
    return (
        4 * frozen
        + 6 * adapter_parameters(spec, shape)
        + 12 * shape.num_hidden_layers * seq * shape.q_dim
        + 4 * shape.hidden_size * shape.vocab_size
    )


def measured_peak() -> float:
    """FLOP/s of the best bf16 matmul on the GPU (fp32 on a CPU), as the service measures it."""
    import torch

    from worker.training.efficiency import matmul_flops

    return matmul_flops(torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def compare_with_bare(client, file_id, model_dir: Path, data: Path, work: Path, args) -> dict[str, float]:
    """One LoRA job on one GPU through the service, then the same training in the bare script: their training
    loops and both MFUs against the same peak."""
    import subprocess

    import torch

    cuda = torch.cuda.is_available()
    hp = {
        "max_steps": args.steps,
        "batch_size": args.batch,
        "max_seq_length": args.seq,
        "learning_rate": 1e-4,
        "gradient_checkpointing": True,
        # The bare script pads each batch (here rows of equal length: nothing to save either way).
        "padding_free": False,
    }
    spec = {
        "base_model": "bench",
        "dataset": file_id,
        "adapter": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"},
        "hyperparameters": hp,
    }
    job, _ = run_service_job(client, spec, poll=1.0)
    if job["status"] != "succeeded":
        print(f"  service job {job['status']}: {job.get('error')}")
        return {}
    result = job["result"]
    # The bare script trains as the service chose to by default: its precision and attention kernel.
    bf16, attn = bool(result.get("bf16", cuda)), result.get("attn_implementation", "sdpa")
    cfg = {
        "model": str(model_dir),
        "data": str(data),
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "bf16": bf16,
        "attn": attn,
        "checkpointing": True,
        "out": str(work / "bare"),
    }
    out = subprocess.run(
        [sys.executable, "-c", BARE_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, check=True
    ).stdout
    bare = json.loads(out.strip().splitlines()[-1])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak()
    per_token = flops_per_token(model_dir, args.rank, args.seq)
    service_loop = result["train_runtime_seconds"]
    mfu_service = job["trained_tokens"] * per_token / service_loop / peak
    mfu_bare = bare["tokens"] * per_token / bare["train"] / peak
    print(
        f"\nservice vs bare transformers + peft, 1 device, {args.steps} steps, micro-batch {args.batch}, "
        f"sequence {args.seq}, {attn}, {'bf16' if bf16 else 'fp32'}; peak {peak / 1e12:.1f} TFLOP/s "
        f"({'configured' if args.peak_tflops else 'measured'}), {per_token / 1e9:.2f} GFLOP per token"
    )
    print(
        f"  service loop {service_loop:8.2f} s   {job['trained_tokens'] / service_loop:10.0f} tokens/s   MFU {mfu_service:.1%}"
    )
    print(
        f"  bare loop    {bare['train']:8.2f} s   {bare['tokens'] / bare['train']:10.0f} tokens/s   MFU {mfu_bare:.1%}"
    )
    if result.get("mfu") is not None:
        print(
            f"  the service's own report: MFU {result['mfu']:.1%} against {result['device_peak_flops'] / 1e12:.1f} TFLOP/s"
        )
    return {"loop_ratio_gpu": service_loop / bare["train"], "mfu_service": mfu_service, "mfu_bare": mfu_bare}


def gib(value: float | None) -> str:
    return f"{value / 2**30:8.2f}" if value else "       -"


def gpu_utilization() -> dict[int, float]:
    """Each GPU's utilization now (percent, from nvidia-smi); empty without GPUs."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return {
        int(i): float(u) for i, u in (line.split(",") for line in out.strip().splitlines() if "," in line)
    }


def pool(args: argparse.Namespace) -> int:
    """Twice as many 1-GPU jobs as GPUs, submitted at once to one node worker driving every GPU: how busy each
    GPU is while they run (sampled every half second), how many jobs run at once, and the makespan."""
    import threading

    import torch

    gpus = args.gpus or max(1, torch.cuda.device_count())
    work = Path(tempfile.mkdtemp(prefix="tuneforge-gpu-pool-"))
    model_dir, params, _ = build_model(work / "model", args.size, args.seq)
    data = work / "train.jsonl"
    write_dataset(data, rows=max(64, args.steps * args.batch), words_per_row=args.seq)
    env = dict(os.environ)
    env.update(
        {
            "TUNEFORGE_HOME": str(work / "home"),
            "TUNEFORGE_MODELS": json.dumps({"bench": {"location": f"file://{model_dir}"}}),
            "TUNEFORGE_LOG_LEVEL": "WARNING",
            "TUNEFORGE_MAX_GPUS_PER_JOB": str(gpus),
            "TUNEFORGE_WORKER_GPUS": str(gpus),
            "TUNEFORGE_CHECKPOINT_STEPS": str(10**6),
            "TUNEFORGE_TEAM_MAX_RUNNING_JOBS": str(4 * gpus),
        }
    )
    print(
        f"model: {args.size} Llama, {params / 1e6:,.1f} M parameters; {2 * gpus} 1-GPU jobs on {gpus} GPU(s)"
    )
    service = Service(env, work / "service.log")
    samples: dict[int, list[float]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            for index, value in gpu_utilization().items():
                samples.setdefault(index, []).append(value)

    try:
        service.start()
        client = service.client(timeout=120)
        file_id = client.upload_file(data)["id"]
        spec = {
            "base_model": "bench",
            "dataset": file_id,
            "adapter": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"},
            "hyperparameters": {
                "max_steps": args.steps,
                "batch_size": args.batch,
                "max_seq_length": args.seq,
            },
            "resources": {"gpus": 1},
        }
        threading.Thread(target=sample, daemon=True).start()
        started = time.perf_counter()
        jobs = [client.create_job(spec)["id"] for _ in range(2 * gpus)]
        done = [client.wait(job_id, poll_interval=1.0) for job_id in jobs]
        makespan = time.perf_counter() - started
        stop.set()
        attempts = [a for job_id in jobs for a in client._get(f"/v1/jobs/{job_id}/attempts")["data"]]
    finally:
        stop.set()
        service.stop()
    from datetime import datetime

    spans = [
        (datetime.fromisoformat(a["started_at"]), datetime.fromisoformat(a["ended_at"])) for a in attempts
    ]
    begin = min(a for a, _ in spans)
    most = max(sum(1 for a, b in spans if a <= moment < b) for moment, _ in spans)
    print(f"succeeded: {sum(j['status'] == 'succeeded' for j in done)} of {len(done)}; most at once: {most}")
    for a in attempts:
        print(
            f"  attempt on GPUs {a['gpu_indices']}: {(datetime.fromisoformat(a['started_at']) - begin).total_seconds():6.1f}"
            f" -> {(datetime.fromisoformat(a['ended_at']) - begin).total_seconds():6.1f} s"
        )
    figures = {"pool_makespan_s": round(makespan, 1), "pool_most_jobs_at_once": most}
    for index, values in sorted(samples.items()):
        figures[f"gpu{index}_utilization_pct"] = round(sum(values) / len(values), 1)
    if not samples:
        print("no GPU utilization: nvidia-smi is not here (on CPU the slots stand for GPUs)")
    print()
    for name, value in figures.items():
        print(f"{name} {value}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per job; default: all visible")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=1024, help="max_seq_length")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--zero", default="2,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak; default measured")
    parser.add_argument("--skip-zero", action="store_true", help="leave out the LoRA/QLoRA x ZeRO jobs")
    parser.add_argument(
        "--skip-bare", action="store_true", help="leave out the comparison with a bare script"
    )
    parser.add_argument(
        "--pool",
        action="store_true",
        help="instead: submit twice as many 1-GPU jobs as there are GPUs at once and report each GPU's "
        "utilization while the node runs them side by side",
    )
    args = parser.parse_args()
    if args.pool:
        return pool(args)

    import torch

    gpus = args.gpus or max(1, torch.cuda.device_count())
    work = Path(tempfile.mkdtemp(prefix="tuneforge-gpu-bench-"))
    started = time.perf_counter()
    model_dir, params, vocab = build_model(work / "model", args.size, args.seq)
    print(
        f"model: {args.size} Llama, {params / 1e6:,.1f} M parameters (vocabulary {vocab}), built in "
        f"{time.perf_counter() - started:.0f} s"
    )
    data = work / "train.jsonl"
    write_dataset(data, rows=max(64, args.steps * args.batch * gpus), words_per_row=args.seq)

    env = dict(os.environ)
    env["TUNEFORGE_HOME"] = str(work / "home")
    env["TUNEFORGE_MODELS"] = json.dumps({"bench": {"location": f"file://{model_dir}"}})
    env["TUNEFORGE_LOG_LEVEL"] = "WARNING"
    env["TUNEFORGE_MAX_GPUS_PER_JOB"] = str(gpus)
    env["TUNEFORGE_WORKER_GPUS"] = str(gpus)
    env["TUNEFORGE_CHECKPOINT_STEPS"] = str(10**6)  # measure training, not checkpoint uploads
    if args.peak_tflops:
        env["TUNEFORGE_DEVICE_PEAK_TFLOPS"] = str(args.peak_tflops)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["TUNEFORGE_GPU_MEMORY_GIB"] = f"{props.total_memory / 2**30:.1f}"
        print(
            f"devices: {gpus} x {props.name} ({props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}"
        )
    else:
        print(f"devices: none; {gpus} CPU processes over gloo (a check of the script, not a measurement)")

    service = Service(env, work / "service.log")
    rows = []
    figures: dict[str, float] = {}
    try:
        service.start()
        client = service.client(timeout=120)
        file_id = client.upload_file(data)["id"]
        for method in [] if args.skip_zero else args.methods.split(","):
            for zero in (int(z) for z in args.zero.split(",")):
                spec = {
                    "base_model": "bench",
                    "dataset": file_id,
                    "method": method,
                    "adapter": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"},
                    "hyperparameters": {
                        "max_steps": args.steps,
                        "batch_size": args.batch,
                        "max_seq_length": args.seq,
                        "learning_rate": 1e-4,
                        "gradient_checkpointing": True,
                    },
                    "resources": {"gpus": gpus, "zero_stage": zero},
                }
                try:
                    job, wall = run_service_job(client, spec, poll=1.0)
                except TuneforgeError as exc:
                    rows.append((method, zero, "refused", None, None, None, None, None, None, str(exc)))
                    continue
                result = job.get("result") or {}
                estimate = ((job.get("plan") or {}).get("memory") or {}).get("total")
                error = (job.get("error") or {}).get("message", "")
                rows.append(
                    (
                        method,
                        zero,
                        job["status"],
                        wall,
                        result.get("seconds_per_step"),
                        result.get("tokens_per_second"),
                        result.get("peak_gpu_memory_bytes"),
                        result.get("peak_gpu_reserved_bytes"),
                        estimate,
                        error,
                    )
                )
                print(f"  {method} ZeRO-{zero}: {job['status']} in {wall:.0f} s {error}", flush=True)
        if not args.skip_bare:
            figures = compare_with_bare(client, file_id, model_dir, data, work, args)
    finally:
        service.stop()

    print(
        f"\n{args.steps} steps, micro-batch {args.batch} x {gpus} GPU(s), sequence {args.seq}, rank {args.rank} "
        "on all linear layers, gradient checkpointing on"
    )
    print(
        "peak GPU: torch's allocated and reserved peaks on rank 0 (the plan also counts 1 GiB of CUDA context)"
    )
    print(
        "method  zero  status      wall s   s/step   tokens/s  allocated  reserved  plan GiB  reserved/plan"
    )
    for method, zero, status, wall, sps, tps, peak, reserved, estimate, error in rows:
        ratio = f"{reserved / estimate:13.2f}" if reserved and estimate else "            -"
        print(
            f"{method:7s} {zero:4d}  {status:10s} {wall or 0:7.0f} {sps or 0:8.3f} {tps or 0:10.0f} "
            f"{gib(peak):>10s} {gib(reserved):>9s} {gib(estimate):>9s} {ratio}"
            + (f"\n    {error}" if error else "")
        )
    print(f"\nlogs: {work / 'service.log'}\n")
    for name, value in figures.items():
        print(f"{name} {value:.4g}")
    succeeded = all(row[2] == "succeeded" for row in rows) and (args.skip_bare or bool(figures))
    return 0 if succeeded else 1


if __name__ == "__main__":
    raise SystemExit(main())
