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
from trl import SFTTrainer

from shared.datasets import DatasetFormat, DatasetSummary
from shared.planning import PADDING_FREE_MODEL_TYPES
from shared.schemas import JobSpec
from tests.helpers import corpus
from worker.training import trainer as trainer_setup
from worker.training.attention import SDPA_PER_SAMPLE
from worker.training.efficiency import ModelFlops, padding_free_pays
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.toy_models import build_llama, build_tokenizer

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


def recipe(model_dir: Path, work_dir: Path, rows: list[dict], fmt=DatasetFormat.prompt_completion, **hp):
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
        train_data=DatasetSummary(fmt, len(rows), len(rows), records=rows),
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
                    # The samples' positions and bounds: what keeps them apart in the attention.
                    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels")}
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
    runs, attention = {}, {}
    for name, hp in (("padded", {"padding_free": False}), ("default", {})):
        training = recipe(model_dir, tmp_path / name, rows, max_steps=6, **hp)
        training.setup()
        training.train()
        runs[name], attention[name] = training, training.model.config._attn_implementation
        training.cleanup()
    kernels = next(data for type, _, data in runs["default"].ctx.reporter.events if type == "kernels")
    assert kernels["padding_free"] is True and kernels["attn_implementation"] == "sdpa"
    # On a CPU the samples of a padding-free row attend one at a time.
    assert attention == {"padded": "sdpa", "default": SDPA_PER_SAMPLE}
    padded, packed = runs["padded"].ctx.reporter.losses, runs["default"].ctx.reporter.losses
    assert len(padded) == len(packed) == 6
    for a, b in zip(padded, packed, strict=True):
        assert b == pytest.approx(a, rel=1e-3), (padded, packed)
    # The same samples, minus the padding.
    assert runs["default"].progress.batches.tokens < runs["padded"].progress.batches.tokens * 1.01


def step_loss(training, batch: dict, num_items_in_batch=None) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training step's loss as the recipe's trainer computes it, the gradients it gives the adapter, and
    the tokens the trainer counted."""
    trainer = training.trainer
    model = trainer.model.train()
    model.zero_grad()
    counted = trainer._total_train_tokens
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, trainer._total_train_tokens - counted


def full_logits_loss(training, batch: dict, num_items_in_batch=None) -> float:
    """The loss transformers' Trainer computes: cross-entropy over the full logits, shifted by one."""
    model = training.trainer.model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return float(total / (num_items_in_batch or (labels != -100).sum()))


@pytest.mark.parametrize("layout", ["padded", "padding_free", "packing"])
@pytest.mark.parametrize("fmt", [DatasetFormat.prompt_completion, DatasetFormat.text])
def test_the_step_computes_trls_loss_and_nothing_else(model_dir, tmp_path, monkeypatch, layout, fmt):
    """The service's step computes the loss trl's SFTTrainer computes (and the bare Trainer's), on padded,
    padding-free and packed batches, completion-only or not, alone or as one of accumulated micro-batches
    (`num_items_in_batch`), with the same gradients and the same tokens counted; without trl's per-token
    entropy and top-1 statistics."""
    rows = mixed_lengths(16)
    if fmt is DatasetFormat.text:
        rows = [{"text": row["prompt"] + row["completion"]} for row in rows]
    hp = {
        "padded": {"padding_free": False},
        "padding_free": {"padding_free": True},
        "packing": {"packing": True},
    }
    ours = recipe(model_dir, tmp_path / "ours", rows, fmt, max_steps=1, **hp[layout])
    ours.setup()
    # trl's own SFTTrainer, on the same model, data and adapter initialisation.
    monkeypatch.setattr(trainer_setup, "LossOnlySFTTrainer", SFTTrainer)
    theirs = recipe(model_dir, tmp_path / "theirs", rows, fmt, max_steps=1, **hp[layout])
    theirs.setup()
    assert type(ours.trainer) is not SFTTrainer and type(theirs.trainer) is SFTTrainer
    try:
        batch = next(iter(ours.trainer.get_train_dataloader()))
        trained = int((batch["labels"][:, 1:] != -100).sum())
        if layout == "padded":
            real, samples = int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]
        else:
            real, samples = batch["input_ids"].numel(), int((batch["position_ids"] == 0).sum())
        # Plain text trains on every token but each sample's first; prompt/completion on the completions only.
        assert samples > 1 and (
            trained == real - samples if fmt is DatasetFormat.text else trained < real - samples
        )
        for items in (None, torch.tensor(3 * trained)):
            loss, grads, tokens = step_loss(ours, batch, items)
            expected, expected_grads, expected_tokens = step_loss(theirs, batch, items)
            assert loss == pytest.approx(expected, rel=1e-6, abs=1e-7)
            assert loss == pytest.approx(full_logits_loss(ours, batch, items), rel=1e-5)
            assert grads.keys() == expected_grads.keys() and grads
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7)
            assert tokens == expected_tokens > 0
        # trl's step also logs each token's entropy and top-1 accuracy; this one only counts the tokens.
        assert set(ours.trainer._metrics["train"]) == {"num_tokens"}
        assert {"entropy", "mean_token_accuracy"} <= set(theirs.trainer._metrics["train"])
    finally:
        ours.cleanup()
        theirs.cleanup()


def test_a_caller_that_wants_the_logits_gets_them_with_the_same_loss(model_dir, tmp_path):
    training = recipe(model_dir, tmp_path, mixed_lengths(8), max_steps=1, padding_free=False)
    training.setup()
    try:
        batch = next(iter(training.trainer.get_train_dataloader()))
        model = training.trainer.model.eval()
        with torch.no_grad():
            loss = training.trainer.compute_loss(model, dict(batch))
            again, outputs = training.trainer.compute_loss(model, dict(batch), return_outputs=True)
        assert float(again) == float(loss)
        assert outputs.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    finally:
        training.cleanup()


def test_a_loss_trl_computes_otherwise_stays_trls(tmp_path):
    """An MoE model adds the router's load-balancing loss: trl's step, with its fused head, unchanged."""
    folder = tmp_path / "mixtral"
    tokenizer = build_tokenizer(folder, corpus())
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    training = recipe(folder, tmp_path / "work", mixed_lengths(8), max_steps=1, padding_free=False)
    training.setup()
    try:
        trainer = training.trainer
        assert trainer.aux_loss_enabled and not trainer.loss_only
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model.train(), dict(batch))
        loss.backward()
        assert torch.isfinite(loss)
        assert {"entropy", "mean_token_accuracy", "aux_loss", "num_tokens"} <= set(trainer._metrics["train"])
    finally:
        training.cleanup()


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
    # SDPA one sample at a time on a CPU costs what a variable-length kernel does, but still builds the mask.
    assert padding_free_pays([4, 8, 12, 200] * 10, 4, flops, varlen=True, builds_mask=True)[1] < ratio
    assert padding_free_pays([100, 8000], 64, flops, varlen=True, builds_mask=True) == (False, float("inf"))
    assert padding_free_pays([100, 8000], 64, flops, varlen=True)[0]


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
    bounds = torch.tensor([0, 9, 14], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        packed = model(torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
        leaking = model(torch.cat([first, second], dim=1), use_cache=False).logits
        # On a CPU, padding-free rows attend one sample at a time (trl's collator gives the bounds).
        model.set_attn_implementation(SDPA_PER_SAMPLE)
        per_sample = model(
            torch.cat([first, second], dim=1),
            position_ids=positions,
            cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds,
            max_length_q=9,
            max_length_k=9,
            use_cache=False,
        ).logits
        padded = model(
            torch.cat([first, torch.cat([second, torch.zeros(1, 4, dtype=torch.long)], dim=1)]),
            attention_mask=torch.tensor([[1] * 9, [1] * 5 + [0] * 4]),
            use_cache=False,
        ).logits
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    assert not torch.allclose(leaking[:, 9:], alone[:, 9:], atol=1e-4)
    assert torch.allclose(per_sample, alone, atol=1e-4), (per_sample - alone).abs().max()
    # Padded batches keep transformers' SDPA and its mask.
    assert torch.allclose(torch.cat([padded[:1], padded[1:, :5]], dim=1), alone, atol=1e-4)
