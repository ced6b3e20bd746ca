"""The fast-path job options are refused, naming the field, where they cannot apply: by the spec alone
(pydantic), by the model's architecture (the planner's static refusals) and by what the deployment's training
workers offer (TUNEFORGE_WORKER_FEATURES)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.planning import ModelShape, feature_refusals, static_refusals
from shared.schemas import JobSpec

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
}


def job(resources: dict | None = None, **hp) -> JobSpec:
    return JobSpec(base_model="m", dataset="d", hyperparameters=hp, resources=resources or {})


def error_field(**kwargs) -> str:
    with pytest.raises(ValidationError) as caught:
        job(**kwargs)
    return ".".join(str(part) for part in caught.value.errors()[0]["loc"])


def test_safe_defaults():
    hp = job().hyperparameters
    assert (hp.padding_free, hp.packing, hp.bf16, hp.attn_implementation) == (None, False, None, None)
    assert hp.fused_adamw is True and hp.liger_kernel is False and hp.torch_compile is False
    # With optimizer states offloaded to the CPU, DeepSpeed's CPU Adam updates them.
    offloaded = job(resources={"gpus": 2, "zero_stage": 2, "cpu_offload": True})
    assert offloaded.hyperparameters.fused_adamw is False


def test_options_that_contradict_each_other_are_refused_naming_the_field():
    assert error_field(packing=True, padding_free=False) == "hyperparameters.padding_free"
    assert (
        error_field(attn_implementation="flash_attention_2", bf16=False)
        == "hyperparameters.attn_implementation"
    )
    offload = {"gpus": 2, "zero_stage": 3, "cpu_offload": True}
    assert error_field(resources=offload, fused_adamw=True) == "hyperparameters.fused_adamw"
    assert error_field(attn_implementation="flash_attention_3") == "hyperparameters.attn_implementation"


@pytest.mark.parametrize(
    ("options", "features", "refused"),
    [
        ({"bf16": True}, [], "hyperparameters.bf16"),
        ({"bf16": True}, ["bf16"], None),
        (
            {"attn_implementation": "flash_attention_2"},
            ["cuda", "bf16"],
            "hyperparameters.attn_implementation",
        ),
        (
            {"attn_implementation": "flash_attention_2"},
            ["cuda", "flash_attention_2"],
            "hyperparameters.attn_implementation",
        ),
        ({"attn_implementation": "flash_attention_2"}, ["cuda", "bf16", "flash_attention_2"], None),
        ({"attn_implementation": "sdpa"}, [], None),
        ({"liger_kernel": True}, ["liger_kernel"], "hyperparameters.liger_kernel"),
        ({"liger_kernel": True}, ["cuda", "liger_kernel"], None),
        ({"torch_compile": True, "fused_adamw": False, "padding_free": True}, [], None),
    ],
)
def test_options_the_workers_cannot_run_are_refused(options, features, refused):
    refusals = feature_refusals(job(**options), features)
    assert [r.param for r in refusals][:1] == ([refused] if refused else [])
    if refused:
        assert "this deployment's workers offer" in refusals[0].message


def test_options_the_architecture_cannot_take_are_refused():
    llama = ModelShape.from_config(LLAMA)
    other = ModelShape.from_config(LLAMA | {"model_type": "exotic"})
    for options in ({"padding_free": True}, {"packing": True}, {"liger_kernel": True}):
        assert static_refusals(job(**options), llama) == []
    assert [r.param for r in static_refusals(job(padding_free=True), other)] == [
        "hyperparameters.padding_free"
    ]
    assert [r.param for r in static_refusals(job(packing=True), other)] == ["hyperparameters.packing"]
    assert [r.param for r in static_refusals(job(liger_kernel=True), other)] == [
        "hyperparameters.liger_kernel"
    ]
    # Left to the worker, an unknown architecture trains padded: nothing to refuse.
    assert static_refusals(job(), other) == []
