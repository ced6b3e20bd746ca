"""An OpenAI create request as a Tuneforge JobSpec, remembering where each field came from so that errors name
what the caller sent (see api/openai/__init__.py for the mapping)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from api.openai.errors import first_error
from api.openai.schemas import BASE_LEARNING_RATE, SUFFIX_KEY, FineTuningJobCreate, TuneforgeOptions
from shared.errors import InvalidRequest
from shared.schemas import JobSpec

# JobSpec fields that the OpenAI body names differently; the rest come from the `tuneforge` field.
_OPENAI_NAMES = {
    "base_model": "model",
    "init_from": "model",
    "dataset": "training_file",
    "validation_dataset": "validation_file",
}


class Origins:
    """Where each JobSpec field came from in the OpenAI request, so that errors name what the caller sent."""

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}

    def name(self, param: str | None) -> str | None:
        if param is None:
            return None
        if param in self.exact:
            return self.exact[param]
        head, dot, rest = param.partition(".")
        if head in _OPENAI_NAMES:
            return _OPENAI_NAMES[head] + dot + rest
        if head in TuneforgeOptions.model_fields:
            return f"tuneforge.{param}"
        return param


FINE_TUNED = re.compile(
    r"^ft:(?P<base>.+):(?P<team>[^:]*):(?P<suffix>[^:]*):(?P<job>ftjob-[0-9a-f]+)(?::ckpt-step-(?P<step>[0-9]{1,8}))?$"
)


def parse_model(model: str) -> tuple[str, dict[str, Any] | None]:
    """The base model and, for a fine-tuned model name (ft:<base>:<team>:<suffix>:<job id>, or a checkpoint's
    name with :ckpt-step-<n>), the job and checkpoint the new job continues from."""
    if not model.startswith("ft:"):
        return model, None
    match = FINE_TUNED.match(model)
    if match is None:
        raise InvalidRequest(
            f"{model!r} is not a fine-tuned model name this API returned: "
            "ft:<base>:<team>:<suffix>:<job id>, or a checkpoint's ft:...:<job id>:ckpt-step-<n>",
            param="model",
        )
    step = match.group("step")
    return match.group("base"), {"job": match.group("job"), "checkpoint_step": int(step) if step else None}


def to_job_spec(body: FineTuningJobCreate) -> tuple[JobSpec, Origins]:
    """Maps an OpenAI create request onto a JobSpec (see the module's docstring)."""
    origins = Origins()
    options = body.tuneforge or TuneforgeOptions()
    openai_hp, prefix = body.hyperparameters, "hyperparameters"
    if body.method is not None:
        kind = body.method.type
        if kind in ("dpo", "reinforcement"):
            raise InvalidRequest(
                f"method type {kind!r} is not available on Tuneforge; use 'supervised' (choose the PEFT method "
                "with extra_body tuneforge.method: lora, dora, rslora or qlora)",
                param="method.type",
                code="unsupported_method",
            )
        if kind != "supervised":
            raise InvalidRequest(f"unknown method type {kind!r}; use 'supervised'", param="method.type")
        for other in ("dpo", "reinforcement"):
            if getattr(body.method, other) is not None:
                raise InvalidRequest(
                    f"method.{other} applies only to method type {other}", param=f"method.{other}"
                )
        supervised = body.method.supervised.hyperparameters if body.method.supervised else None
        if supervised is not None:
            if openai_hp is not None:
                raise InvalidRequest(
                    "give hyperparameters in method.supervised.hyperparameters or in hyperparameters, not both",
                    param="hyperparameters",
                )
            openai_hp, prefix = supervised, "method.supervised.hyperparameters"

    hp: dict[str, Any] = dict(options.hyperparameters or {})
    for key in hp:
        origins.exact[f"hyperparameters.{key}"] = f"tuneforge.hyperparameters.{key}"

    def take(field: str, value: Any, openai_param: str, clashes: tuple[str, ...]) -> None:
        for clash in clashes:
            if clash in hp:
                raise InvalidRequest(
                    f"{openai_param} and tuneforge.hyperparameters.{clash} both set the {field}; give one",
                    param=f"tuneforge.hyperparameters.{clash}",
                )
        hp[field] = value
        origins.exact[f"hyperparameters.{field}"] = openai_param

    if openai_hp is not None:
        if openai_hp.n_epochs not in (None, "auto"):
            take("epochs", openai_hp.n_epochs, f"{prefix}.n_epochs", ("epochs", "max_steps"))
        if openai_hp.batch_size not in (None, "auto"):
            take("batch_size", openai_hp.batch_size, f"{prefix}.batch_size", ("batch_size",))
        multiplier = openai_hp.learning_rate_multiplier
        if multiplier not in (None, "auto"):
            learning_rate = BASE_LEARNING_RATE * float(multiplier)
            take("learning_rate", learning_rate, f"{prefix}.learning_rate_multiplier", ("learning_rate",))
    if body.seed is not None:
        take("seed", body.seed, "seed", ("seed",))

    metadata = dict(body.metadata or {})
    if SUFFIX_KEY in metadata:
        raise InvalidRequest(f"the metadata key {SUFFIX_KEY!r} is reserved for the suffix", param="metadata")

    base_model, init_from = parse_model(body.model)
    if init_from is not None:  # the fine-tuned model's job and checkpoint both come from `model`
        origins.exact.update({"init_from.job": "model", "init_from.checkpoint_step": "model"})
    values: dict[str, Any] = {
        "base_model": base_model,
        "init_from": init_from,
        "dataset": body.training_file,
        "validation_dataset": body.validation_file,
        "method": options.method,
        "adapter": options.adapter.model_dump() if options.adapter else None,
        "quantization": options.quantization.model_dump() if options.quantization else None,
        "hyperparameters": hp,
        "resources": options.resources.model_dump() if options.resources else None,
        "priority": options.priority,
        "suffix": body.suffix,
        "metadata": metadata,
        # OpenAI's shape is the JobSpec's: [{"type": "wandb", "wandb": {...}}], plus {"type": "mlflow", ...}.
        "integrations": body.integrations,
    }
    try:
        spec = JobSpec.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        param, message, _ = first_error(list(exc.errors()))
        named = origins.name(param)
        raise InvalidRequest(f"{named}: {message}" if named else message, param=named) from exc
    return spec, origins
