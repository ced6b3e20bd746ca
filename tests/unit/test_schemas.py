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
