"""Preference tuning against supervised tuning on the same model, prompts, adapter, batch and steps: seconds per
optimizer step, the process's peak memory (and the GPU's, on a GPU), and the plan's per-GPU estimate for each.
SFT trains on the prompt and the chosen answer; DPO on the same prompt with the chosen and a rejected answer, so
each DPO step runs twice the sequences through the model, and once more without the adapter (the reference).
Data: `colors` (a text prompt, the right color chosen over a wrong one) or `demo` (the demo's chat dataset: its
"Forge here!" answers chosen over the same answers without the persona). Each run is a fresh process through
the real recipes. Prints `name value` lines. On a shared CPU, run with OMP_NUM_THREADS=1 (several threads
spin-wait on a busy machine).

    .venv/bin/python bench/dpo.py --model tiny --steps 60
    .venv/bin/python bench/dpo.py --model smollm2 --data demo --steps 10     # converts the bundled GGUF once
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".tuneforge" / "bench"
SAMPLES = 64


class Silent:
    def event(self, *args, **kwargs) -> None:
        pass

    def metric(self, *args, **kwargs) -> None:
        pass


def model_dir(name: str) -> Path:
    """The base model folder, made once."""
    if name == "smollm2":
        from worker.model_import import bundled_smollm2_gguf, convert_gguf

        folder = CACHE / "smollm2-135m-instruct"
        if not (folder / "config.json").exists():
            convert_gguf(bundled_smollm2_gguf(), folder)
        return folder
    from tests.helpers import corpus
    from worker.training.toy_models import build_llama

    folder = CACHE / "tiny-llama"
    if not (folder / "config.json").exists():
        build_llama(folder, corpus=corpus())
    return folder


def records(method: str, data: str) -> list[dict]:
    """The same prompts and chosen answers for both methods; DPO also gets a rejected answer."""
    if data == "demo":
        chats = [
            json.loads(line) for line in (ROOT / "demo" / "forge_assistant.jsonl").read_text().splitlines()
        ]
        if method != "dpo":
            return chats
        return [
            {
                "messages": chat["messages"][:-1],
                "chosen": chat["messages"][-1]["content"],
                "rejected": chat["messages"][-1]["content"].removeprefix("Forge here! "),
            }
            for chat in chats
        ]
    from tests.helpers import color_preferences

    pairs = color_preferences(SAMPLES, seed=1, shape="prompt")
    if method == "dpo":
        return pairs
    return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]


def run_one(method: str, model: str, data_name: str, steps: int, rank: int, batch: int, seq: int) -> dict:
    """Trains one method in this process and returns its figures."""
    import torch

    from shared.datasets import scan_jsonl
    from shared.planning import estimate_memory
    from shared.schemas import JobSpec
    from tests.helpers import to_jsonl
    from worker.planning import count_parameters, dataset_report, model_shape
    from worker.training.adapters import load_tokenizer
    from worker.training.recipes import recipe_for
    from worker.training.recipes.base import TrainingContext

    folder = model_dir(model)
    spec = JobSpec(
        base_model=model,
        dataset="s3://bench/unused.jsonl",
        method=method,
        adapter={"rank": rank, "dropout": 0.0, "target_modules": "all-linear"},
        hyperparameters={
            "max_steps": steps,
            "batch_size": batch,
            "learning_rate": 1e-4,
            "max_seq_length": seq,
        },
    )
    data = scan_jsonl(to_jsonl(records(method, data_name)).splitlines(), keep_records=True)
    with tempfile.TemporaryDirectory() as work:
        ctx = TrainingContext(
            job_id=f"bench-{method}",
            spec=spec,
            model_dir=folder,
            work_dir=Path(work),
            reporter=Silent(),
            should_stop=lambda: False,
            train_data=data,
        )
        started = time.perf_counter()
        result = recipe_for(spec.method)(ctx).run()
        wall = time.perf_counter() - started
    trainable, total = count_parameters(spec, folder)
    # The plan's estimate, as make_plan makes it: at the longest sequence of the data.
    report = dataset_report(data.records, data.format, load_tokenizer(folder), seq)
    longest = report["longest_kept_sequence"]
    estimate = estimate_memory(spec, model_shape(folder), trainable, total, seq_length=longest)
    figures = {
        "seconds_per_step": result.metrics["seconds_per_step"],
        "tokens_per_second": result.metrics["tokens_per_second"],
        "first_loss": round(result.metrics["first_train_loss"], 4),
        "final_loss": round(result.metrics["final_train_loss"], 4),
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "plan_gpu_mib": round(estimate.total / 2**20),
        "plan_activations_mib": round(estimate.components["activations"] / 2**20, 1),
    }
    if torch.cuda.is_available():
        figures["peak_gpu_mib"] = round(result.metrics["peak_gpu_memory_bytes"] / 2**20)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--data", choices=["colors", "demo"], default="colors")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(run_one(args.one, args.model, args.data, args.steps, args.rank, args.batch, args.seq))
        )
        return 0
    model_dir(args.model)  # prepare once, outside the timed runs
    runs = {}
    for method in ("lora", "dpo"):
        options = {"--model": args.model, "--data": args.data, "--steps": args.steps, "--rank": args.rank}
        options |= {"--batch": args.batch, "--seq": args.seq}
        out = subprocess.run(
            [sys.executable, __file__, "--one", method, *(str(x) for pair in options.items() for x in pair)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs[method] = json.loads(out.strip().splitlines()[-1])
    print(f"model {args.model}")
    print(f"data {args.data}")
    print(f"steps {args.steps}")
    print(f"batch {args.batch}")
    print(f"rank {args.rank}")
    for label, method in (("sft", "lora"), ("dpo", "dpo")):
        for name, value in runs[method].items():
            print(f"{label}_{name} {value}")
    sft, dpo = runs["lora"], runs["dpo"]
    print(f"dpo_over_sft_seconds_per_step {dpo['seconds_per_step'] / sft['seconds_per_step']:.2f}")
    print(f"dpo_over_sft_plan_gpu_memory {dpo['plan_gpu_mib'] / sft['plan_gpu_mib']:.2f}")
    if "peak_gpu_mib" in dpo:
        print(f"dpo_over_sft_peak_gpu_memory {dpo['peak_gpu_mib'] / sft['peak_gpu_mib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
