import pytest
from pydantic import ValidationError

from shared.schemas import AdapterSpec, Hyperparameters, JobSpec


def test_defaults_are_filled():
    spec = JobSpec(base_model="m", dataset="file-" + "0" * 24)
    assert spec.method == "lora"
    assert spec.adapter.rank == 16
    assert spec.adapter.alpha == 32.0  # 2 x rank unless given
    assert spec.hyperparameters.epochs == 3
    assert spec.hyperparameters.max_steps is None
    assert spec.resources.gpus == 1


def test_alpha_default_follows_rank():
    assert AdapterSpec(rank=4).alpha == 8.0
    assert AdapterSpec(rank=4, alpha=1.5).alpha == 1.5


@pytest.mark.parametrize(
    ("adapter", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 1025}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj; rm -rf"]}, "target_modules"),
        ({"target_modules": "everything"}, "target_modules"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_adapter_settings_name_the_field(adapter, field):
    with pytest.raises(ValidationError) as info:
        AdapterSpec(**adapter)
    assert any(field in ".".join(map(str, e["loc"])) for e in info.value.errors())


def test_epochs_and_max_steps_are_exclusive():
    with pytest.raises(ValidationError, match="either epochs or max_steps"):
        Hyperparameters(epochs=2, max_steps=10)
    assert Hyperparameters(max_steps=10).epochs is None


def test_unknown_method_is_refused():
    with pytest.raises(ValidationError) as info:
        JobSpec(base_model="m", dataset="x", method="prefix-tuning")
    assert info.value.errors()[0]["loc"] == ("method",)


def test_spec_round_trips_through_json():
    spec = JobSpec(base_model="m", dataset="s3://b/k.jsonl", adapter={"target_modules": ["q_proj", "v_proj"]})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_dpo_fills_its_defaults_and_trains_lora_dora_or_a_4bit_base():
    spec = JobSpec(base_model="m", dataset="d", method="dpo")
    assert (spec.dpo.beta, spec.dpo.loss_type, spec.dpo.label_smoothing) == (0.1, "sigmoid", None)
    assert spec.adapter.rank == 16 and not spec.adapter.use_dora
    assert spec.hyperparameters.learning_rate == 5e-5
    assert spec.quantization is None and not spec.quantized
    assert spec.hyperparameters.gradient_checkpointing is False

    dora_4bit = JobSpec(
        base_model="m",
        dataset="d",
        method="dpo",
        adapter={"use_dora": True},
        quantization={},
        dpo={"beta": 0.5, "loss_type": "robust"},
    )
    assert dora_4bit.adapter.use_dora and dora_4bit.quantized
    assert dora_4bit.hyperparameters.gradient_checkpointing is True  # as for qlora
    assert dora_4bit.dpo.label_smoothing == 0.0
    assert JobSpec.model_validate_json(dora_4bit.model_dump_json()) == dora_4bit


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"method": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
        ({"method": "dpo", "dpo": {"loss_type": "kto"}}, "dpo.loss_type"),
        ({"method": "dpo", "dpo": {"label_smoothing": 0.1}}, "dpo.label_smoothing"),
        ({"method": "dpo", "dpo": {"loss_type": "exo_pair", "label_smoothing": 0}}, "dpo.label_smoothing"),
        ({"method": "dpo", "hyperparameters": {"packing": True}}, "hyperparameters.packing"),
        ({"method": "dpo", "hyperparameters": {"padding_free": True}}, "hyperparameters.padding_free"),
        ({"method": "lora", "dpo": {}}, "dpo"),
        ({"method": "dora", "quantization": {}}, "quantization"),
        # Its reference is the base with the adapter switched off; it reports reward margins, not answers.
        ({"method": "dpo", "init_from": {"job": "ftjob-x"}}, "init_from"),
        ({"method": "dpo", "eval_prompts": ["Snow?"]}, "eval_prompts"),
        ({"method": "dpo", "validation_dataset": "v", "eval_samples": 2}, "eval_samples"),
    ],
)
def test_bad_dpo_settings_name_the_field(fields, loc):
    with pytest.raises(ValidationError) as info:
        JobSpec(base_model="m", dataset="d", **fields)
    assert ".".join(map(str, info.value.errors()[0]["loc"])) == loc, info.value.errors()
