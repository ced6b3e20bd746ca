"""The prepared GPU check: LoRA and QLoRA jobs under DeepSpeed ZeRO-2 and ZeRO-3, through the service, on a
Llama-architecture model with random weights; prints tokens/s and the measured peak GPU memory next to the
plan's estimate for each.

    .venv/bin/python bench/gpu.py [--size 3b] [--gpus N] [--steps 20] [--seq 1024] [--batch 4]

It builds the model (on the GPU when there is one), starts the service on its embedded default in a
temporary folder (SQLite, a local storage folder, the folder broker) with one worker driving all GPUs, and
submits one job per (method, ZeRO stage). Every job goes through validation, the plan, the worker's
launcher (torchrun) and the recipe, as users' jobs do. A job that fails is printed with its error; the
others still run.

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


def gib(value: float | None) -> str:
    return f"{value / 2**30:8.2f}" if value else "       -"


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
    args = parser.parse_args()

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
    try:
        service.start()
        client = service.client(timeout=120)
        file_id = client.upload_file(data)["id"]
        for method in args.methods.split(","):
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
    print(f"\nlogs: {work / 'service.log'}")
    return 0 if all(row[2] == "succeeded" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
