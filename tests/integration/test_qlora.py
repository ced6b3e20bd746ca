"""QLoRA on CPU with a tiny Llama: the recipe trains a 4-bit base (bitsandbytes), its adapter reloads exactly,
its gradients match a float32 model built from the dequantized weights, a job runs end to end, and its export
merges the adapter into the full-precision base."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from shared.datasets import read_dataset
from shared.db import session_scope
from shared.schemas import JobSpec, Method
from shared.states import JobStatus
from tests.helpers import color_messages, corpus, to_jsonl
from worker.training.quantization import (
    bnb_4bit_config,
    compute_dtype,
    dequantized_weight,
    linear4bit_modules,
)
from worker.training.recipes.base import TrainingContext
from worker.training.recipes.qlora import QLoraRecipe
from worker.training.toy_models import build_llama

HAS_AVX512_BF16 = bool(bnb.functional.has_avx512bf16())


class Events:
    """A reporter that keeps what a recipe sends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics: list[tuple[str, int, dict[str, Any]]] = []

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((type, message, data or {}))

    def metric(self, split: str, step: int, values: dict[str, Any]) -> None:
        self.metrics.append((split, step, values))

    def data(self, type: str) -> dict[str, Any]:
        return next(d for t, _, d in self.events if t == type)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """The models are tiny: one thread is fastest, and several spin-wait on a busy machine (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runner's training process inherits it
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of its own (2 layers, hidden 64), so these tests need no database or object store."""
    return build_llama(tmp_path_factory.mktemp("qlora") / "tiny-llama", corpus=corpus())


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qlora-data") / "colors.jsonl"
    path.write_bytes(to_jsonl(color_messages(32)))
    return path


def make_recipe(
    model_dir: Path,
    dataset_file: Path,
    work_dir: Path,
    *,
    quantization: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
    evaluate: bool = False,
    **hyperparameters: Any,
) -> QLoraRecipe:
    spec = JobSpec(
        base_model="tiny-llama",
        dataset="file:///colors.jsonl",
        method=Method.qlora,
        quantization=quantization,
        adapter={"rank": 8, "target_modules": "all-linear", **(adapter or {})},
        hyperparameters={"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, **hyperparameters},
    )
    data = read_dataset(dataset_file)
    ctx = TrainingContext(
        job_id="job-qlora",
        spec=spec,
        model_dir=model_dir,
        work_dir=work_dir,
        reporter=Events(),
        should_stop=lambda: False,
        train_data=data,
        eval_data=data if evaluate else None,
    )
    return QLoraRecipe(ctx)


def assert_still_4bit(model: torch.nn.Module) -> None:
    """Every quantized layer still holds its 4-bit weight in the layout training uses."""
    layers = linear4bit_modules(model)
    assert layers
    for name, layer in layers:
        assert type(layer.weight).__name__ == "Params4bit", name
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name


# a. QLoRA trains, with plain LoRA, DoRA and rsLoRA adapters.


@pytest.mark.parametrize(
    ("quantization", "adapter", "gradient_checkpointing"),
    [
        pytest.param({}, {}, None, id="nf4-bf16-compute"),
        pytest.param({"compute_dtype": "float32"}, {"use_dora": True}, None, id="dora"),
        pytest.param(
            {"quant_type": "fp4", "double_quant": False}, {"use_rslora": True}, False, id="rslora-fp4"
        ),
    ],
)
def test_qlora_trains_and_the_loss_falls(
    model_dir, dataset_file, tmp_path, quantization, adapter, gradient_checkpointing
):
    recipe = make_recipe(
        model_dir,
        dataset_file,
        tmp_path,
        quantization=quantization,
        adapter=adapter,
        gradient_checkpointing=gradient_checkpointing,
    )
    spec = recipe.ctx.spec
    result = recipe.run()

    losses = recipe.progress.losses
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert result.metrics["steps"] == 12 and not result.stopped

    # The job spec's quantization is what bitsandbytes got.
    events = recipe.ctx.reporter
    quant = events.data("quantization")
    assert quant["quant_type"] == spec.quantization.quant_type
    assert quant["double_quant"] == spec.quantization.double_quant
    assert quant["compute_dtype"] == spec.quantization.compute_dtype == quant["quant_storage"]
    assert quant["quantized_layers"] == 14  # q, k, v, o, gate, up, down in 2 layers; not lm_head
    assert events.data("model")["trainable_params"] == result.trainable_params

    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is bool(adapter.get("use_dora"))
    assert config["use_rslora"] is bool(adapter.get("use_rslora"))
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_the_model_is_4bit_with_the_asked_dtypes_and_checkpointing(model_dir, dataset_file, tmp_path):
    recipe = make_recipe(
        model_dir,
        dataset_file,
        tmp_path,
        quantization={"compute_dtype": "bfloat16"},
        adapter={"use_rslora": True},
    )
    recipe.setup()
    model = recipe.model
    assert model.base_model.model.is_loaded_in_4bit
    assert model.base_model.model.is_gradient_checkpointing  # the qlora default
    assert_still_4bit(model)
    for _, layer in linear4bit_modules(model):
        assert layer.compute_dtype is torch.bfloat16
        # bnb_4bit_quant_storage: the packed 4-bit data lives in a bfloat16 tensor (ZeRO-3 compatible)
        assert layer.weight.dtype is torch.bfloat16 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantization
    # Adapter weights stay float32 (trl would cast them to bfloat16), the rest of the base too.
    for name, param in model.named_parameters():
        if param.requires_grad or type(param).__name__ != "Params4bit":
            assert param.dtype is torch.float32, name
    rank, alpha = 8, 16.0
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert lora.scaling["default"] == pytest.approx(alpha / rank**0.5)  # rsLoRA

    no_checkpointing = make_recipe(model_dir, dataset_file, tmp_path / "b", gradient_checkpointing=False)
    no_checkpointing.setup()
    assert not no_checkpointing.model.base_model.model.is_gradient_checkpointing


# b. The saved adapter on a freshly loaded 4-bit base computes exactly what the trained model does.


def fresh_qlora_base(recipe: QLoraRecipe) -> torch.nn.Module:
    """The base model loaded again, as a new attempt of the same job would load it."""
    again = QLoraRecipe(recipe.ctx)
    return again.prepare_base_model(again.load_base_model())


def test_saved_adapter_reloads_with_identical_logits(model_dir, dataset_file, tmp_path):
    # Evaluating during training puts the model in eval mode between steps: on an AVX512-BF16 CPU that is
    # when bitsandbytes would repack the 4-bit weights (see test_gradients_match_a_dequantized_float32_model).
    recipe = make_recipe(
        model_dir, dataset_file, tmp_path, evaluate=True, eval_steps=4, max_steps=8, adapter={"dropout": 0.1}
    )
    recipe.setup()  # step by step rather than run(), which frees the model once saved
    recipe.train()
    result = recipe.save(tmp_path / "adapter")
    assert recipe.progress.last_eval_loss is not None
    trained = recipe.model
    assert_still_4bit(trained)

    inputs = recipe.tokenizer("What color is snow? snow is white.", return_tensors="pt")
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        with trained.disable_adapter():
            base_only = trained(**inputs).logits
        reloaded = PeftModel.from_pretrained(fresh_qlora_base(recipe), result.output_dir)
        reloaded.eval()
        got = reloaded(**inputs).logits
        again = trained(**inputs).logits
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter learned something
    assert torch.equal(expected, again)  # eval is deterministic (dropout off)
    assert torch.equal(got, expected), (got - expected).abs().max()


# c. Gradients of the LoRA weights on the 4-bit model match those of a float32 model whose base weights are
# the dequantized 4-bit weights.


def dequantized_reference(model: PeftModel, model_dir: Path) -> PeftModel:
    """A float32 copy of `model` without bitsandbytes: each 4-bit weight dequantized, every other weight (the
    adapter and the unquantized base parameters) copied as it is."""
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        copy.deepcopy(model.peft_config["default"]),
    )
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in linear4bit_modules(model):
            params[name + ".weight"].copy_(dequantized_weight(layer, torch.float32))
        sync_parameters(model, reference, only_trainable=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules())
    return reference


def sync_parameters(source: PeftModel, target: PeftModel, *, only_trainable: bool) -> int:
    params = dict(target.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in source.named_parameters():
            if type(param).__name__ == "Params4bit" or (only_trainable and not param.requires_grad):
                continue
            params[name].copy_(param.to(params[name].dtype))
            copied += 1
    return copied


def lora_gradients(model: PeftModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the same dropout masks in both models
    model(**inputs).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


def relative_errors(model: PeftModel, reference: PeftModel, inputs) -> dict[str, float]:
    got, want = lora_gradients(model, inputs), lora_gradients(reference, inputs)
    assert got.keys() == want.keys()
    errors = {}
    for name, ref in want.items():
        assert ref.norm() > 0, f"{name}: zero reference gradient; the comparison would prove nothing"
        errors[name] = ((got[name].float() - ref).norm() / ref.norm()).item()
    return errors


def evaluation_pass(model: PeftModel, inputs) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    model.train()


def gradient_setup(model_dir, dataset_file, tmp_path, compute: str):
    recipe = make_recipe(
        model_dir,
        dataset_file,
        tmp_path,
        quantization={"compute_dtype": compute},
        adapter={"rank": 4, "dropout": 0.1},
    )
    recipe.setup()  # with the trainer, so everything trl does to the model has been done
    model = recipe.model
    model.train()
    # lora_B starts at zero, which makes every lora_A gradient zero: start from a nonzero B instead.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    reference = dequantized_reference(model, model_dir)
    reference.train()
    rows = [recipe.tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in color_messages(4)]
    inputs = dict(recipe.tokenizer(rows, return_tensors="pt", padding=True))
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return model, reference, inputs


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_gradients_match_a_dequantized_float32_model(model_dir, dataset_file, tmp_path, compute, capsys):
    """Relative error of each LoRA gradient <= 1e-2, on a fresh model, after an evaluation pass, and after an
    optimizer step followed by an evaluation pass.

    With compute dtype float32 the 4-bit layers dequantize and multiply exactly as the reference does, so the
    gradients agree to float32 rounding (0.0 measured); with bfloat16 (the default) the base matmuls round to
    bfloat16 and the error is a few 1e-3 on this model (4.8e-3 measured), within the bound, so both are checked.
    The adapter weights must stay float32 for this: with trl's bfloat16 cast of them it was 7e-3 even with
    float32 compute (and 9.2e-3 with bfloat16).

    The evaluation pass is what caught a real bug: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit
    weight for its inference kernel the first time the layer runs in eval mode, and keeps using that kernel
    (no autograd, bfloat16 only) after model.train(): gradients through the frozen base were dropped (relative
    error ~1). The recipe turns that repacking off (worker/training/quantization.py).
    """
    model, reference, inputs = gradient_setup(model_dir, dataset_file, tmp_path, compute)
    bound = 1e-5 if compute == "float32" else 1e-2
    measured = {}

    errors = relative_errors(model, reference, inputs)
    measured["fresh"] = max(errors.values())
    assert len(errors) == 2 * 2 * 7  # A and B of 7 linear layers in 2 decoder layers
    assert measured["fresh"] <= bound, errors

    evaluation_pass(model, inputs)
    errors = relative_errors(model, reference, inputs)
    measured["after eval"] = max(errors.values())
    assert measured["after eval"] <= bound, errors
    assert_still_4bit(model)

    # One optimizer step on the 4-bit model (with its own gradients), an evaluation pass, then the reference
    # takes the updated adapter weights and both compute gradients again.
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    lora_gradients(model, inputs)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    evaluation_pass(model, inputs)
    assert sync_parameters(model, reference, only_trainable=True) == len(trainable)
    errors = relative_errors(model, reference, inputs)
    measured["after step and eval"] = max(errors.values())
    assert measured["after step and eval"] <= bound, errors
    assert_still_4bit(model)
    with capsys.disabled():
        print(f"\n[qlora gradients, compute {compute}] max relative error: {measured}")


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_the_gradient_check_catches_bitsandbytes_cpu_repacking(model_dir, dataset_file, tmp_path):
    """The bug the recipe works around, shown with the workaround undone: after one evaluation pass the
    4-bit layers run bitsandbytes' CPU inference kernel, also in training, and gradients go wrong."""
    model, reference, inputs = gradient_setup(model_dir, dataset_file, tmp_path, "float32")
    for _, layer in linear4bit_modules(model):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    assert max(relative_errors(model, reference, inputs).values()) <= 1e-5
    evaluation_pass(model, inputs)
    if not all(
        getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        for _, layer in linear4bit_modules(model)
    ):
        pytest.skip("this bitsandbytes no longer repacks 4-bit weights in eval mode")
    assert max(relative_errors(model, reference, inputs).values()) > 0.1


# d. A qlora job through the worker's validation and runner, on PostgreSQL and S3.


@pytest.fixture(scope="module")
def qlora_job(settings, store, tiny_model_dir) -> str:
    """A qlora job (attention, 8 steps, evaluated and checkpointed) that succeeded through validation and the
    runner; its id."""
    from tests.integration.test_worker import job, submit
    from worker import runner, validation

    job_id = submit(
        settings,
        store,
        to_jsonl(color_messages(32)),
        method="qlora",
        validation_dataset="same",
        adapter={"rank": 8, "target_modules": "attention"},
        hyperparameters={
            "max_steps": 8,
            "learning_rate": 5e-3,
            "batch_size": 8,
            "eval_steps": 4,
            "checkpoint_steps": 4,
        },
    )
    assert validation.validate_job(settings, job_id) is JobStatus.queued
    assert runner.run_job(settings, job_id) is JobStatus.succeeded, job(settings, job_id).error_message
    return job_id


def test_qlora_job_runs_end_to_end(qlora_job, settings, store, tiny_model_dir, tmp_path):
    from shared.services import artifacts as artifact_service
    from shared.services import jobs as job_service
    from tests.conftest import TINY_MODEL
    from tests.integration.test_worker import TEAM, job

    job_id = qlora_job

    done = job(settings, job_id)
    assert done.status == "succeeded" and done.error_code is None
    assert done.spec["quantization"] == {
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    assert done.result["final_train_loss"] < done.result["first_train_loss"]
    assert done.result["eval_loss"] is not None
    with session_scope(settings.database_url) as session:
        artifacts = artifact_service.list_artifacts(
            session=session, team_id=TEAM, job_id=job_id, kind="adapter"
        )
        checkpoints = artifact_service.list_checkpoints(session=session, team_id=TEAM, job_id=job_id)
        events, _ = job_service.list_events(session=session, team_id=TEAM, job_id=job_id, limit=100)
    quantization = [e for e in events if e.type == "quantization"]
    assert quantization and quantization[-1].data["quant_type"] == "nf4"
    assert quantization[-1].data["quantized_layers"] == 14
    assert 4 in [c.step for c in checkpoints]  # the trainer's checkpoint of a 4-bit model was stored

    adapter_dir = tmp_path / "adapter"
    for artifact in artifacts:
        store.get_file(artifact.storage_key, adapter_dir / artifact.name, expected_sha256=artifact.sha256)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL

    # The job reports peft's own count for the adapter on a 4-bit base...
    spec = JobSpec.model_validate(done.spec)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        quantization_config=bnb_4bit_config(spec.quantization),
        dtype=compute_dtype(spec.quantization),
    )
    tuned = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    trainable, total = tuned.get_nb_trainable_parameters()
    assert (done.trainable_params, done.total_params) == (trainable, total)
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32) + 8 * (64 + 32) + 8 * (64 + 64))
    # ... which counts each 4-bit weight as the full-precision weight it stands for.
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert total == full.get_nb_trainable_parameters()[1]


# e. Exporting a qlora adapter merges it into the registry's full-precision base, never a 4-bit one.


@torch.no_grad()
def chat_loss(model: torch.nn.Module, tokenizer, rows: list[dict]) -> float:
    """Mean next-token cross-entropy over the chat-formatted rows."""
    total = 0.0
    for row in rows:
        ids = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), return_tensors="pt")
        total += float(model.eval()(**ids, labels=ids["input_ids"]).loss)
    return total / len(rows)


def test_export_of_a_qlora_job_merges_into_the_full_precision_base(
    qlora_job, settings, store, tiny_model_dir, tmp_path
):
    from transformers import AutoTokenizer

    from shared.services import artifacts as artifact_service
    from shared.services import jobs as job_service
    from tests.conftest import TINY_MODEL
    from tests.integration.test_worker import TEAM, job
    from worker import runner, validation
    from worker.training.recipes.export import MERGE_TOLERANCE

    with session_scope(settings.database_url) as session:
        spec = JobSpec(method="export", export={"source": {"job_id": qlora_job}, "dtype": "float32"})
        export_id = job_service.create_job(
            session=session, settings=settings, store=store, team_id=TEAM, spec=spec
        ).id
    assert validation.validate_job(settings, export_id) is JobStatus.queued
    assert runner.run_job(settings, export_id) is JobStatus.succeeded, job(settings, export_id).error_message
    done = job(settings, export_id)
    assert done.base_model == TINY_MODEL
    assert done.result["within_tolerance"] and done.result["merge_max_logit_diff"] < 1e-4

    folders = {}
    with session_scope(settings.database_url) as session:
        for job_id, kind in ((qlora_job, "adapter"), (export_id, "merged")):
            folders[kind] = tmp_path / kind
            for artifact in artifact_service.list_artifacts(
                session=session, team_id=TEAM, job_id=job_id, kind=kind
            ):
                store.get_file(
                    artifact.storage_key, folders[kind] / artifact.name, expected_sha256=artifact.sha256
                )
    config = json.loads((folders["merged"] / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(folders["merged"])
    assert merged.dtype is torch.float32
    assert not any(type(p).__name__ == "Params4bit" for p in merged.parameters())

    tokenizer = AutoTokenizer.from_pretrained(folders["merged"])
    inputs = tokenizer("What color is snow? snow is white. Reverse stone: enots", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = color_messages(16, seed=7)
    # Before PeftModel.from_pretrained, which puts the adapter's layers into `base` itself.
    base_loss = chat_loss(base, tokenizer, rows)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        reference = PeftModel.from_pretrained(base, folders["adapter"]).eval()
        expected = reference(**inputs).logits
        got = merged.eval()(**inputs).logits
        quantization = JobSpec.model_validate(job(settings, qlora_job).spec).quantization
        four_bit = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir,
            quantization_config=bnb_4bit_config(quantization),
            dtype=compute_dtype(quantization),
        )
        quantized = PeftModel.from_pretrained(four_bit, folders["adapter"]).eval()
        trained_on = quantized(**inputs).logits.float()
    # The stated tolerance: the export recipe's, 1e-4 of the largest logit (at least 1e-4).
    tolerance = MERGE_TOLERANCE * max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    print(
        f"qlora export: merged float32 vs float32 base + adapter {difference:.3g} (tolerance {tolerance:.3g}); "
        f"vs the 4-bit base + adapter it trained on {float((got - trained_on).abs().max()):.3g}"
    )
    assert difference <= tolerance
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter is in the merged weights
    # What the adapter learned on the 4-bit base carries over to the full-precision one.
    assert chat_loss(merged, tokenizer, rows) < base_loss
