"""Measures each training method on the same model, data and steps: trainable parameters, adapter size,
seconds per step, first and final training loss, and the process's peak memory. Each method runs in a
fresh process (its peak memory is its own) through the real recipes.

    .venv/bin/python bench/methods.py --model tiny --steps 30
    .venv/bin/python bench/methods.py --model smollm2 --steps 20      # converts the bundled GGUF once
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

METHODS = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "rslora": {"method": "rslora"},
    "qlora": {"method": "qlora"},
    "qlora+dora": {"method": "qlora", "adapter": {"use_dora": True}},
    "qlora+rslora": {"method": "qlora", "adapter": {"use_rslora": True}},
}
CACHE = ROOT / ".tuneforge" / "bench"


class Silent:
    def event(self, *args, **kwargs) -> None:
        pass

    def metric(self, *args, **kwargs) -> None:
        pass


def model_and_data(name: str) -> tuple[Path, Path]:
    """The base model folder and a dataset for it."""
    if name == "smollm2":
        from worker.model_import import bundled_smollm2_gguf, convert_gguf

        folder = CACHE / "smollm2-135m-instruct"
        if not (folder / "config.json").exists():
            convert_gguf(bundled_smollm2_gguf(), folder)
        return folder, ROOT / "demo" / "forge_assistant.jsonl"
    from tests.helpers import color_messages, corpus, to_jsonl
    from worker.training.toy_models import build_llama

    folder = CACHE / "tiny-llama"
    if not (folder / "config.json").exists():
        build_llama(folder, corpus=corpus())
    data = CACHE / "colors.jsonl"
    data.write_bytes(to_jsonl(color_messages(64)))
    return folder, data


def run_one(label: str, model: str, steps: int, rank: int, batch: int) -> dict:
    """Trains one method in this process and returns its figures."""
    from shared.datasets import read_dataset
    from shared.schemas import JobSpec
    from worker.training.recipes import recipe_for
    from worker.training.recipes.base import TrainingContext

    model_dir, data = model_and_data(model)
    base = METHODS[label]
    spec = JobSpec(
        base_model=model,
        dataset="s3://bench/unused.jsonl",
        method=base["method"],
        adapter={"rank": rank, "target_modules": "all-linear", **base.get("adapter", {})},
        hyperparameters={
            "max_steps": steps,
            "batch_size": batch,
            "learning_rate": 1e-3,
            "max_seq_length": 256,
        },
    )
    with tempfile.TemporaryDirectory() as work:
        ctx = TrainingContext(
            job_id=f"bench-{label}",
            spec=spec,
            model_dir=model_dir,
            work_dir=Path(work),
            reporter=Silent(),
            should_stop=lambda: False,
            train_data=read_dataset(data),
        )
        started = time.perf_counter()
        result = recipe_for(spec.method)(ctx).run()
        wall = time.perf_counter() - started
        adapter_bytes = (result.output_dir / "adapter_model.safetensors").stat().st_size
    return {
        "method": label,
        "model": model,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "adapter_mib": round(adapter_bytes / 2**20, 2),
        "seconds_per_step": result.metrics["seconds_per_step"],
        "first_loss": round(result.metrics["first_train_loss"], 4),
        "final_loss": round(result.metrics["final_train_loss"], 4),
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.steps, args.rank, args.batch)))
        return 0
    model_and_data(args.model)  # prepare once, outside the timed runs
    rows = []
    for label in args.methods.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                label,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--rank",
                str(args.rank),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.model}: {args.steps} steps, batch {args.batch}, rank {args.rank} on all linear layers, CPU\n"
    )
    print("| method | trainable params | adapter | s/step | loss first → final | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%) "
            f"| {r['adapter_mib']} MiB | {r['seconds_per_step']} | {r['first_loss']} → {r['final_loss']} "
            f"| {r['peak_rss_mib']:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
