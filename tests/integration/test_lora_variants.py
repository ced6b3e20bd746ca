"""Plain DoRA and rsLoRA (on a full-precision base) train for real: the loss falls, the saved adapter says
which variant it is, and loading it with PeftModel.from_pretrained gives exactly the trained model's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.datasets import DatasetFormat, DatasetSummary
from shared.schemas import JobSpec
from tests.conftest import TINY_MODEL
from tests.helpers import color_prompt_completion
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext

PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 12]])
RANK, ALPHA = 8, 16.0


class Events:
    def __init__(self) -> None:
        self.metrics: list[tuple[str, int, dict]] = []

    def event(self, type, message, *, level="info", data=None) -> None:
        pass

    def metric(self, split, step, values) -> None:
        self.metrics.append((split, step, values))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(PROBE).logits


def train_variant(method: str, model_dir: Path, work_dir: Path):
    rows = color_prompt_completion(48)
    reporter = Events()
    ctx = TrainingContext(
        job_id=f"ftjob-{method}",
        spec=JobSpec(
            base_model=TINY_MODEL,
            dataset="unused",
            method=method,
            adapter={"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
            hyperparameters={"max_steps": 20, "learning_rate": 1e-2, "batch_size": 8, "logging_steps": 1},
        ),
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=reporter,
        should_stop=lambda: False,
        train_data=DatasetSummary(DatasetFormat.prompt_completion, len(rows), len(rows), records=rows),
    )
    recipe = recipe_for(ctx.spec.method)(ctx)
    try:
        recipe.setup()
        recipe.train()
        trained = logits(recipe.model)
        result = recipe.save(work_dir / "artifact")
    finally:
        recipe.cleanup()
    return result, trained, reporter


@pytest.mark.parametrize("method", ["dora", "rslora"])
def test_the_variant_trains_and_its_adapter_reloads_exactly(method, tiny_model_dir, tmp_path):
    result, trained, reporter = train_variant(method, tiny_model_dir, tmp_path)

    losses = [values["loss"] for split, _, values in reporter.metrics if split == "train"]
    assert len(losses) == 20
    assert result.metrics["final_train_loss"] < 0.9 * result.metrics["first_train_loss"]

    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    assert config["use_rslora"] is (method == "rslora")
    weights = load_file(result.output_dir / "adapter_model.safetensors")
    magnitudes = [name for name in weights if "lora_magnitude_vector" in name]
    # DoRA trains a magnitude per output feature of every adapted layer (2 layers x 7 linear modules).
    assert len(magnitudes) == (14 if method == "dora" else 0)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = logits(base)
    reloaded = PeftModel.from_pretrained(base, result.output_dir)
    after = logits(reloaded)
    assert torch.allclose(after, trained, atol=1e-5, rtol=0), (after - trained).abs().max()
    assert not torch.allclose(after, before, atol=1e-3)
    if method == "rslora":
        layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj
        assert math.isclose(layer.scaling["default"], ALPHA / math.sqrt(RANK))
