"""Preference tuning (method dpo) on a tiny Llama, in the training process's own code: the recipe trains LoRA,
DoRA and a 4-bit (QLoRA) base on each preference format; the saved adapter loads with PeftModel.from_pretrained
and, scored here independently of trl, rewards the chosen answers of held-out pairs over the rejected ones by
the margin trl reported; the reference is the base with the adapter switched off."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.datasets import scan_jsonl
from shared.schemas import JobSpec, QuantizationSpec
from tests.helpers import color_preferences, corpus, to_jsonl
from worker.training.adapters import load_tokenizer
from worker.training.data import EncodedPair, encode_preferences
from worker.training.efficiency import ModelFlops
from worker.training.quantization import bnb_4bit_config
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.toy_models import build_llama

BETA, STEPS, BATCH = 0.5, 40, 8


class Events:
    """A reporter that keeps what a recipe sends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics: list[tuple[str, int, dict[str, Any]]] = []

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((type, message, data or {}))

    def metric(self, split: str, step: int, values: dict[str, Any]) -> None:
        self.metrics.append((split, step, values))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """The models are tiny: one thread is fastest, and several spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of its own (2 layers, hidden 64), so these tests need no database or object store."""
    return build_llama(tmp_path_factory.mktemp("dpo") / "tiny-llama", corpus=corpus())


def held_out(train: list[dict], shape: str, n: int = BATCH) -> list[dict]:
    """n preference pairs that are not among the training pairs (another wrong color, or another thing)."""
    seen = {json.dumps(row, sort_keys=True) for row in train}
    rows: list[dict] = []
    seed = 100
    while len(rows) < n:
        for row in color_preferences(n, seed=seed, shape=shape):
            key = json.dumps(row, sort_keys=True)
            if key not in seen and len(rows) < n:
                seen.add(key)
                rows.append(row)
        seed += 1
    return rows


def answer_logps(model: torch.nn.Module, pairs: list[EncodedPair], answer: str) -> torch.Tensor:
    """Sum of the log-probabilities of each pair's `answer` tokens after its prompt (one sequence at a time)."""
    totals = []
    for pair in pairs:
        sequence = pair.sequence(answer)
        ids = torch.tensor([sequence.input_ids])
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        start = len(pair.prompt_ids)
        targets = ids[0, start:]
        totals.append(logps[start - 1 :].gather(1, targets[:, None]).sum())
    return torch.stack(totals)


@torch.no_grad()
def reward_margins(model: PeftModel, pairs: list[EncodedPair], beta: float) -> torch.Tensor:
    """DPO's implicit reward of chosen over rejected, per pair: beta x (log-ratio of the chosen answer - log-ratio
    of the rejected one), the log-ratios between the adapter and the reference (the base, adapter off)."""
    model.eval()
    policy = {answer: answer_logps(model, pairs, answer) for answer in ("chosen", "rejected")}
    with model.disable_adapter():
        reference = {answer: answer_logps(model, pairs, answer) for answer in ("chosen", "rejected")}
    return beta * ((policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"]))


def train_dpo(model_dir: Path, work_dir: Path, shape: str, variant: str):
    train_rows = color_preferences(48, seed=1, shape=shape)
    test_rows = held_out(train_rows, shape)
    spec = JobSpec(
        base_model="tiny-llama",
        dataset="file:///colors.jsonl",
        method="dpo",
        adapter={"rank": 8, "dropout": 0.0, "use_dora": variant == "dora"},
        # Float32 throughout (bf16 autocast off, 4-bit weights dequantized to float32), so that the margins
        # computed here match trl's exactly.
        quantization={"compute_dtype": "float32"} if variant == "qlora" else None,
        dpo={"beta": BETA},
        hyperparameters={
            "max_steps": STEPS,
            "batch_size": BATCH,
            "learning_rate": 1e-2,
            "eval_steps": STEPS,
            "bf16": False,
            "gradient_checkpointing": variant == "qlora",
        },
    )
    reporter = Events()
    ctx = TrainingContext(
        job_id=f"ftjob-dpo-{variant}",
        spec=spec,
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=reporter,
        should_stop=lambda: False,
        train_data=scan_jsonl(to_jsonl(train_rows).splitlines(), keep_records=True),
        eval_data=scan_jsonl(to_jsonl(test_rows).splitlines(), keep_records=True),
    )
    recipe = recipe_for(spec.method)(ctx)
    try:
        recipe.setup()
        # No second model: the reference is the policy's own base with the adapter switched off.
        assert recipe.trainer.ref_model is None and list(recipe.model.peft_config) == ["default"]
        recipe.train()
        result = recipe.save(work_dir / "artifact")
    finally:
        recipe.cleanup()
    return recipe, result, reporter, test_rows


def reloaded(model_dir: Path, adapter_dir: Path, variant: str) -> PeftModel:
    """The saved adapter on a freshly loaded base, as a user (or a serving stack) would load it."""
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if variant == "qlora":
        kwargs["quantization_config"] = bnb_4bit_config(QuantizationSpec(compute_dtype="float32"))
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return PeftModel.from_pretrained(base, adapter_dir)


@pytest.mark.parametrize(
    ("variant", "shape"),
    [("lora", "prompt"), ("dora", "messages"), ("qlora", "openai")],
)
def test_dpo_raises_the_reward_margin_on_held_out_pairs_and_the_adapter_reloads(
    model_dir, tmp_path, variant, shape
):
    recipe, result, reporter, test_rows = train_dpo(model_dir, tmp_path, shape, variant)
    metrics = result.metrics
    assert metrics["steps"] == STEPS and not result.stopped

    # At the first step the policy is the reference (the adapter's B is zero): the loss is exactly log 2.
    losses = recipe.progress.losses
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.1, losses

    # The adapter, loaded on a fresh base, scored here without trl: the chosen answers of held-out pairs are
    # rewarded over the rejected ones (at the start every margin is 0).
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is (variant == "dora") and config["r"] == 8
    model = reloaded(model_dir, result.output_dir, variant)
    tokenizer = load_tokenizer(model_dir)
    data = scan_jsonl(to_jsonl(test_rows).splitlines(), keep_records=True)
    pairs = encode_preferences(data.records, data.format, tokenizer, 1024).pairs
    margins = reward_margins(model, pairs, BETA)
    assert margins.mean() > 0.2, margins
    assert (margins > 0).float().mean() >= 0.75, margins
    # ... by what trl measured on the same pairs at the last step.
    assert metrics["eval_reward_margin"] == pytest.approx(margins.mean().item(), rel=1e-3, abs=1e-4)
    assert metrics["eval_reward_accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert metrics["train_reward_margin"] > 0
    [rewards] = [data for type, _, data in reporter.events if type == "rewards"]
    assert rewards["step"] == STEPS and rewards["reward_margin"] == pytest.approx(margins.mean().item(), 1e-3)
    assert [step for split, step, _ in reporter.metrics if split == "eval"] == [STEPS]


class KeptCheckpoints:
    """A checkpoint sink that keeps a copy of each saved training state on local disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[int] = []

    def save(self, step: int, folder: Path, metrics: dict, parts=None, unique=None) -> None:
        shutil.copytree(folder, self.folder / folder.name)
        self.steps.append(step)

    def wait(self) -> None:
        pass


def test_a_dpo_run_resumed_from_its_checkpoint_follows_the_uninterrupted_one(model_dir, tmp_path):
    rows = color_preferences(32, seed=1)
    spec = JobSpec(
        base_model="tiny-llama",
        dataset="file:///colors.jsonl",
        method="dpo",
        adapter={"rank": 4, "dropout": 0.0},
        hyperparameters={
            "max_steps": 8,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "bf16": False,
            "checkpoint_steps": 4,
        },
    )
    data = scan_jsonl(to_jsonl(rows).splitlines(), keep_records=True)

    def run(name: str, resume_from: Path | None = None):
        sink = KeptCheckpoints(tmp_path / f"{name}-kept")
        sink.folder.mkdir()
        ctx = TrainingContext(
            job_id=f"ftjob-dpo-{name}",
            spec=spec,
            model_dir=model_dir,
            work_dir=tmp_path / name,
            reporter=Events(),
            should_stop=lambda: False,
            train_data=data,
            checkpoints=sink,
            resume_from=resume_from,
        )
        recipe = recipe_for(spec.method)(ctx)
        result = recipe.run()
        return recipe.progress.losses, result, sink

    straight, straight_result, sink = run("straight")
    assert sink.steps == [4]
    resumed, resumed_result, _ = run("resumed", resume_from=sink.folder / "checkpoint-4")
    # The resumed run logs steps 5 to 8 only, as the uninterrupted run did (same data order, same optimizer).
    assert resumed == pytest.approx(straight[4:], rel=1e-4, abs=1e-6)
    a = load_file(straight_result.output_dir / "adapter_model.safetensors")
    b = load_file(resumed_result.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_the_reference_forward_counts_in_the_flops():
    plain = ModelFlops(frozen=10**6, trainable=10**4, layers=2, attention_width=64, hidden=64, vocab=512)
    dpo = replace(plain, reference_passes=1)
    # One more forward pass per token: 2 FLOPs per frozen weight and per output-head weight, and the
    # attention's forward share (4 L d per position attended).
    assert dpo.per_token(100) - plain.per_token(100) == 2 * 10**6 + 2 * 64 * 512 + 4 * 2 * 64 * 100
