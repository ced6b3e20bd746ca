"""The worker's planner on a tiny Llama: parameter counts from the meta device equal the counts of the models
the real recipes build, dataset reports for the three formats, plans that serialise to JSON, and the
activation formula against what autograd really keeps. No database or object store is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.datasets import DatasetFormat, scan_jsonl
from shared.planning import ModelShape, layer_activation_bytes, targeted_layers
from shared.schemas import JobSpec, Resources
from tests.helpers import color_messages, color_prompt_completion, corpus
from worker.planning import count_parameters, dataset_report, make_plan, model_shape
from worker.training.data import encode_dataset
from worker.training.recipes import recipe_for
from worker.training.recipes.base import TrainingContext
from worker.training.toy_models import build_llama


class Events:
    """A reporter that keeps what a recipe sends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((type, message, data or {}))

    def metric(self, split: str, step: int, values: dict[str, Any]) -> None:
        pass

    def data(self, type: str) -> dict[str, Any]:
        return next(d for t, _, d in self.events if t == type)


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one thread is fastest, and several spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("planning") / "tiny-llama", corpus=corpus())


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def summary(rows: list[dict[str, Any]]):
    return scan_jsonl([json.dumps(r) for r in rows], keep_records=True)


def lora_spec(method: str = "lora", adapter: dict[str, Any] | None = None, **hyperparameters: Any) -> JobSpec:
    return JobSpec(
        base_model="tiny-llama",
        dataset="file:///colors.jsonl",
        method=method,
        adapter={"rank": 8, **(adapter or {})},
        hyperparameters={
            "batch_size": 4,
            "max_seq_length": 64,
            **({} if "epochs" in hyperparameters else {"max_steps": 1}),
            **hyperparameters,
        },
    )


# a. Parameter counts: the meta-device model against the model each real recipe builds with real weights.


@pytest.mark.parametrize(
    ("method", "adapter"),
    [
        pytest.param("lora", {"target_modules": "attention"}, id="lora-attention"),
        pytest.param("lora", {"target_modules": "all-linear"}, id="lora-all-linear"),
        pytest.param("lora", {"target_modules": ["q_proj", "down_proj"]}, id="lora-explicit"),
        pytest.param("dora", {"target_modules": "all-linear"}, id="dora-all-linear"),
        pytest.param("dora", {"target_modules": "attention", "rank": 4}, id="dora-attention"),
        pytest.param("rslora", {"target_modules": "all-linear", "rank": 16}, id="rslora-all-linear"),
        pytest.param("qlora", {"target_modules": "all-linear"}, id="qlora-all-linear"),
        pytest.param("qlora", {"target_modules": "attention", "use_dora": True}, id="qlora-dora-attention"),
        pytest.param("qlora", {"target_modules": "all-linear", "use_rslora": True}, id="qlora-rslora"),
    ],
)
def test_meta_counts_equal_the_recipes_real_model(model_dir, tmp_path, method, adapter):
    spec = lora_spec(method, adapter)
    counted = count_parameters(spec, model_dir)

    reporter = Events()
    ctx = TrainingContext(
        job_id="job-plan",
        spec=spec,
        model_dir=model_dir,
        work_dir=tmp_path,
        reporter=reporter,
        should_stop=lambda: False,
        train_data=summary(color_messages(8)),
    )
    recipe = recipe_for(spec.method)(ctx)
    try:
        recipe.setup()
        real = recipe.model
        assert real is not None
        # The recipe built it from the real weights (4-bit ones for qlora), not on the meta device.
        assert all(p.device.type != "meta" for p in real.parameters())
        reported = reporter.data("model")
        assert counted == (reported["trainable_params"], reported["total_params"])
        assert counted == tuple(real.get_nb_trainable_parameters())
    finally:
        recipe.cleanup()


def test_pure_counts_agree_with_peft_on_a_llama(model_dir):
    from shared.planning import adapter_parameters

    shape = model_shape(model_dir)
    for method, adapter in (
        ("lora", {"target_modules": "all-linear"}),
        ("dora", {"target_modules": "attention"}),
    ):
        spec = lora_spec(method, adapter)
        trainable, total = count_parameters(spec, model_dir)
        assert trainable == adapter_parameters(spec, shape)
        assert total == shape.base_parameters() + trainable


# b. Dataset reports, one per format.


def test_a_large_dataset_is_measured_on_a_spread_sample(tokenizer):
    rows = color_messages(3000, seed=9)
    exact = dataset_report(rows, DatasetFormat.messages, tokenizer, 24, sample_limit=10**9)
    sampled = dataset_report(rows, DatasetFormat.messages, tokenizer, 24, sample_limit=300)
    assert (exact["measured_samples"], sampled["measured_samples"]) == (3000, 300)
    assert sampled["samples"] == exact["samples"] == 3000
    assert sampled["first_sample"] == exact["first_sample"]
    for key in ("truncated_samples", "trained_tokens", "samples_without_trained_tokens"):
        assert sampled[key] == pytest.approx(exact[key], rel=0.15, abs=30), key
    assert sampled["tokens"]["total"] == pytest.approx(exact["tokens"]["total"], rel=0.05)


def test_dataset_report_messages(tokenizer):
    rows = color_messages(12)
    report = dataset_report(rows, DatasetFormat.messages, tokenizer, 64)
    encoded = encode_dataset(rows, DatasetFormat.messages, tokenizer, 64)
    lengths = sorted(len(s.input_ids) for s in encoded.samples)
    assert report["samples"] == 12
    assert report["tokens"]["total"] == sum(lengths) == encoded.total_tokens
    assert report["tokens"]["max"] == lengths[-1]
    assert report["tokens"]["p95"] == lengths[math.ceil(0.95 * 12) - 1]
    assert report["tokens"]["mean"] == pytest.approx(sum(lengths) / 12, abs=0.01)
    assert report["truncated_samples"] == 0
    assert report["trained_tokens"] == sum(s.trained_tokens for s in encoded.samples)
    first = report["first_sample"]
    # color_messages(12)[0]: user, assistant, user, assistant: two trained spans, each an assistant turn
    # with its end-of-turn marker.
    trained = [seg["text"] for seg in first["segments"] if seg["trained"]]
    assert len(trained) == 2
    assert all(text.rstrip("\n").endswith("<|im_end|>") for text in trained)
    assert trained[1].startswith("Yes.")
    assert "[[Yes.<|im_end|>" in first["text"]
    assert "<|im_start|>user" not in "".join(trained)
    assert first["text"].replace("[[", "").replace("]]", "") == "".join(s["text"] for s in first["segments"])
    assert first["trained_tokens"] == encoded.samples[0].trained_tokens


def test_dataset_report_prompt_completion(tokenizer):
    rows = color_prompt_completion(10)
    report = dataset_report(rows, DatasetFormat.prompt_completion, tokenizer, 64)
    first = report["first_sample"]
    assert [seg["trained"] for seg in first["segments"]] == [False, True]
    prompt, completion = first["segments"][0]["text"], first["segments"][1]["text"]
    assert completion.endswith(tokenizer.eos_token)
    assert (prompt + completion).removesuffix(tokenizer.eos_token) == rows[0]["prompt"] + rows[0][
        "completion"
    ]
    assert first["text"] == f"{prompt}[[{completion}]]"
    assert 0 < report["trained_token_share"] < 1


def test_dataset_report_text_and_truncation(tokenizer):
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * n} for n in (1, 2, 8)]
    max_len = 24
    report = dataset_report(rows, DatasetFormat.text, tokenizer, max_len)
    encoded = encode_dataset(rows, DatasetFormat.text, tokenizer, max_len)
    lengths = [len(s.input_ids) for s in encoded.samples]
    assert report["truncated_samples"] == sum(1 for n in lengths if n > max_len) >= 1
    assert report["tokens"]["after_truncation"] == sum(min(n, max_len) for n in lengths)
    # Every token of a text sample carries the loss, up to max_seq_length.
    assert report["trained_tokens"] == report["tokens"]["after_truncation"]
    assert report["trained_tokens_before_truncation"] == sum(lengths)
    first = report["first_sample"]
    assert first["text"].startswith("[[") and first["text"].endswith("]]")
    assert [seg["trained"] for seg in first["segments"]] == [True]
    long = dataset_report(rows[2:], DatasetFormat.text, tokenizer, max_len)["first_sample"]
    assert long["tokens"] == max_len and long["truncated_tokens"] == lengths[2] - max_len


# c. The plan.


def test_make_plan_is_json_and_shows_the_first_sample(model_dir):
    data = summary(color_messages(16))
    spec = lora_spec("lora", {"target_modules": "all-linear"}, batch_size=4, max_seq_length=128, epochs=2)
    plan = make_plan(spec, model_dir, data, data)
    again = json.loads(json.dumps(plan))
    assert again == plan
    assert plan["status"] == "ready" and plan["refusals"] == []
    assert (plan["params"]["trainable"], plan["params"]["total"]) == count_parameters(spec, model_dir)
    assert set(plan["datasets"]) == {"dataset", "validation_dataset"}
    first = plan["datasets"]["dataset"]["first_sample"]
    assert "[[" in first["text"] and "]]" in first["text"]
    assert any(seg["trained"] for seg in first["segments"])
    memory = plan["memory"]
    assert memory["total"] == sum(memory["components"].values())
    # Without packing, a micro-batch is padded to its longest sample, not to max_seq_length.
    assert memory["seq_length"] == plan["datasets"]["dataset"]["longest_kept_sequence"] < 128
    assert plan["schedule"]["steps_per_epoch"] == math.ceil(16 / 4)
    assert plan["schedule"]["total_steps"] == 2 * math.ceil(16 / 4)


def test_make_plan_refusals_name_their_field(model_dir):
    data = summary(color_messages(8))
    # Past the tiny model's 512 positions, a rank above its 32-wide k/v projections, an unknown layer name.
    plan = make_plan(lora_spec("lora", {"rank": 64}, max_seq_length=1024), model_dir, data)
    assert plan["status"] == "refused"
    params = {r["param"] for r in plan["refusals"]}
    assert params == {"hyperparameters.max_seq_length", "adapter.rank"}
    rank = next(r for r in plan["refusals"] if r["param"] == "adapter.rank")
    assert "k_proj (64->32)" in rank["message"] and "v_proj (64->32)" in rank["message"]

    plan = make_plan(lora_spec("lora", {"target_modules": ["q_proj", "wq"]}), model_dir, data)
    assert [r["param"] for r in plan["refusals"]] == ["adapter.target_modules"]
    assert plan["params"] is None and plan["memory"] is None

    # Every answer lies past max_seq_length: nothing would be trained (the recipe fails the same way).
    long_question = [
        {
            "messages": [
                {"role": "user", "content": "What color is snow? " * 12},
                {"role": "assistant", "content": "white"},
            ]
        }
    ]
    plan = make_plan(lora_spec("lora", max_seq_length=16), model_dir, summary(long_question))
    assert [r["code"] for r in plan["refusals"]] == ["no_trained_tokens"]
    assert plan["refusals"][0]["param"] == "hyperparameters.max_seq_length"


def test_make_plan_notes_are_not_refusals(model_dir):
    spec = lora_spec("lora", max_seq_length=64).model_copy(
        update={"resources": Resources(gpus=1, zero_stage=3)}
    )
    plan = make_plan(spec, model_dir, summary(color_messages(8)))
    assert plan["status"] == "ready"
    assert "zero_on_one_gpu" in {n["code"] for n in plan["notes"]}


# d. The activation formula against what autograd keeps, on CPU under bf16 autocast (as the GPU trains).


def saved_bytes_per_layer(model, inputs: dict[str, torch.Tensor], seq: int, batch: int) -> dict[int, int]:
    """Bytes of the activations autograd still holds after the forward pass, by decoder layer: tensors of the
    batch (a dimension of size seq or batch*seq), not parameters and not the adapters' bf16 weight casts."""
    import weakref

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    class Held:
        __slots__ = ("__weakref__", "layer", "tensor")

        def __init__(self, tensor: torch.Tensor, layer: int) -> None:
            self.tensor, self.layer = tensor, layer

    live: weakref.WeakSet[Held] = weakref.WeakSet()
    current = [-1]

    def pack(tensor: torch.Tensor) -> Held:
        held = Held(tensor, current[0])
        live.add(held)
        return held

    layers = model.get_base_model().model.layers
    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, index=index: current.__setitem__(0, index)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor),
    ):
        output = model(**inputs, use_cache=False)
    for hook in hooks:
        hook.remove()
    storages: dict[int, dict[int, int]] = {}
    for held in list(live):
        storage = held.tensor.untyped_storage()
        shape = tuple(held.tensor.shape)
        if storage.data_ptr() in params or not ({seq, batch * seq} & set(shape)):
            continue
        storages.setdefault(held.layer, {})[storage.data_ptr()] = storage.nbytes()
    del output
    return {layer: sum(sizes.values()) for layer, sizes in storages.items()}


@pytest.mark.parametrize(
    ("dropout", "padded", "dora"),
    [
        pytest.param(0.0, False, False, id="no-dropout"),
        pytest.param(0.1, False, False, id="dropout"),
        pytest.param(0.0, True, False, id="padded-batch"),
        pytest.param(0.0, False, True, id="dora"),
    ],
)
def test_activation_formula_matches_autograd(dropout, padded, dora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(
        base,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", use_dora=dora),
    )
    model.train()
    batch, seq = 2, 96
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[0, -10:] = 0
    measured = saved_bytes_per_layer(model, {"input_ids": ids, "attention_mask": mask}, seq, batch)

    shape = ModelShape.from_config(config.to_dict())
    spec = lora_spec("dora" if dora else "lora", {"target_modules": "all-linear", "dropout": dropout})
    expected = layer_activation_bytes(
        shape,
        tokens=batch * seq,
        targets=targeted_layers(spec, shape),
        rank=8,
        dropout=dropout,
        dora=dora,
        attention_mask=padded,
        dropout_mask_bytes=4,  # CPU dropout keeps a float mask; CUDA's is one byte
    )
    total = sum(expected.values())
    if padded:
        total += batch * seq * seq  # the boolean mask, shared by the layers: each one holds it here
    # Layer 1: the first layer's input norm keeps nothing (the embeddings need no gradient).
    assert measured[1] == pytest.approx(total, rel=0.02)
