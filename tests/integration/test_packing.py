"""Packing that stays right: samples concatenated without padding (position ids restarting per sample, trl's
collator, transformers' attention) give the loss the padded batches give, from the first step on, and the
service packs by default only where the model keeps packed samples apart and it saves compute.

The recipe runs in this process on a tiny Llama whose final norm is scaled up, so its logits depend on the
context and attention across samples would show in the loss."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shared.datasets import DatasetFormat, DatasetSummary
from shared.planning import PADDING_FREE_MODEL_TYPES
from shared.schemas import JobSpec
from tests.helpers import corpus
from worker.training.efficiency import ModelFlops, padding_free_pays
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.toy_models import build_llama

WORDS = ["stone", "river", "cloud", "plant", "metal", "apple", "grass", "snow", "coal", "plum", "sky"]


class Reporter:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.losses: list[float] = []

    def event(self, type, message, *, level="info", data=None) -> None:
        self.events.append((type, message, data or {}))

    def metric(self, split, step, values) -> None:
        if split == "train":
            self.losses.append(values["loss"])


def mixed_lengths(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs from two words to forty: most of a padded batch would be padding."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 20, 40]))]
        rows.append({"prompt": f"Reverse {words[0]}: ", "completion": " ".join(w[::-1] for w in words)})
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharp-llama")
    build_llama(folder, corpus=corpus())
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    model.save_pretrained(folder)
    return folder


def recipe(model_dir: Path, work_dir: Path, rows: list[dict], **hp):
    ctx = TrainingContext(
        job_id="ftjob-packing",
        spec=JobSpec(
            base_model="tiny",
            dataset="unused",
            adapter={"rank": 8, "dropout": 0.0},
            hyperparameters={"batch_size": 4, "max_seq_length": 256, "learning_rate": 1e-2, **hp},
        ),
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=Reporter(),
        should_stop=lambda: False,
        train_data=DatasetSummary(DatasetFormat.prompt_completion, len(rows), len(rows), records=rows),
    )
    return recipe_for(ctx.spec.method)(ctx)


def initial_loss(model_dir: Path, work_dir: Path, rows: list[dict], *, drop_positions=False, **hp):
    """The loss per trained token at initialisation over one epoch of the recipe's own batches, with the
    trainer's fused head; and one of those batches."""
    training = recipe(model_dir, work_dir, rows, max_steps=1, **hp)
    training.setup()
    try:
        model = training.trainer.model.eval()
        total, tokens, first = 0.0, 0, None
        with torch.no_grad():
            for batch in training.trainer.get_train_dataloader():
                first = first or batch
                if drop_positions:
                    batch = {k: v for k, v in batch.items() if k != "position_ids"}
                out = model(**batch, use_cache=False, fused_lm_head=True)
                total += float(-out.log_probs.double().sum())
                tokens += int(out.label_mask.sum())
        return total / tokens, tokens, first
    finally:
        training.cleanup()


def test_packed_batches_give_the_padded_loss_at_initialisation(model_dir, tmp_path):
    rows = mixed_lengths(24)
    padded, padded_tokens, padded_batch = initial_loss(model_dir, tmp_path / "a", rows, padding_free=False)
    free, free_tokens, free_batch = initial_loss(model_dir, tmp_path / "b", rows, padding_free=True)
    rows_loss, rows_tokens, rows_batch = initial_loss(model_dir, tmp_path / "c", rows, packing=True)

    # Padded batches are rows with padding; padding-free ones one row whose positions restart per sample.
    assert "attention_mask" in padded_batch and not padded_batch["attention_mask"].all()
    for batch in (free_batch, rows_batch):
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        assert int((batch["position_ids"][0] == 0).sum()) > 1
    assert padded_tokens == free_tokens == rows_tokens
    assert abs(free - padded) <= 1e-3, (free, padded)
    assert abs(rows_loss - padded) <= 1e-3, (rows_loss, padded)
    # Without the restarting positions the samples attend to each other, and the loss shows it.
    leaked, _, _ = initial_loss(model_dir, tmp_path / "d", rows, padding_free=True, drop_positions=True)
    assert abs(leaked - padded) > 1e-3, (leaked, padded)


def test_the_default_packs_mixed_lengths_and_trains_step_for_step_like_padding(model_dir, tmp_path):
    rows = mixed_lengths(32)
    runs = {}
    for name, hp in (("padded", {"padding_free": False}), ("default", {})):
        training = recipe(model_dir, tmp_path / name, rows, max_steps=6, **hp)
        training.setup()
        training.train()
        runs[name] = training
        training.cleanup()
    kernels = next(data for type, _, data in runs["default"].ctx.reporter.events if type == "kernels")
    assert kernels["padding_free"] is True and kernels["attn_implementation"] == "sdpa"
    padded, packed = runs["padded"].ctx.reporter.losses, runs["default"].ctx.reporter.losses
    assert len(padded) == len(packed) == 6
    for a, b in zip(padded, packed, strict=True):
        assert b == pytest.approx(a, rel=1e-3), (padded, packed)
    # The same samples, minus the padding.
    assert runs["default"].progress.batches.tokens < runs["padded"].progress.batches.tokens * 1.01


def test_the_default_pads_where_packing_would_not_pay():
    flops = ModelFlops(frozen=10**6, trainable=10**4, layers=2, attention_width=64, hidden=64, vocab=512)
    # Equal lengths: nothing to save; concatenating only grows the attention.
    pays, ratio = padding_free_pays([40] * 50, 8, flops, varlen=False)
    assert not pays and ratio > 1
    pays, ratio = padding_free_pays([4, 8, 12, 200] * 10, 4, flops, varlen=False)
    assert pays and ratio < 0.9
    # A variable-length kernel attends within each sample: it pays even more.
    assert padding_free_pays([4, 8, 12, 200] * 10, 4, flops, varlen=True)[1] < ratio
    # A (tokens x tokens) mask far beyond the padded batches' is refused.
    assert padding_free_pays([100, 8000], 64, flops, varlen=False) == (False, float("inf"))


@pytest.mark.parametrize("model_type", sorted(PADDING_FREE_MODEL_TYPES))
def test_each_model_type_packed_by_default_keeps_concatenated_samples_apart(model_type):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    first, second = torch.randint(3, 128, (1, 9)), torch.randint(3, 128, (1, 5))
    positions = torch.cat([torch.arange(9), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        packed = model(torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
        leaking = model(torch.cat([first, second], dim=1), use_cache=False).logits
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    assert not torch.allclose(leaking[:, 9:], alone[:, 9:], atol=1e-4)
