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
    kind = body.method.type if body.method is not None else "supervised"
    dpo: dict[str, Any] | None = None
    if body.method is not None:
        if kind == "reinforcement":
            raise InvalidRequest(
                "method type 'reinforcement' is not available on Tuneforge; use 'supervised' or 'dpo' (choose the "
                "PEFT method with extra_body tuneforge.method: lora, dora, rslora or qlora)",
                param="method.type",
                code="unsupported_method",
            )
        if kind not in ("supervised", "dpo"):
            raise InvalidRequest(
                f"unknown method type {kind!r}; use 'supervised' or 'dpo'", param="method.type"
            )
        for other in ("supervised", "dpo", "reinforcement"):
            if other != kind and getattr(body.method, other) is not None:
                raise InvalidRequest(
                    f"method.{other} applies only to method type {other}", param=f"method.{other}"
                )
        section = getattr(body.method, kind)
        given = section.hyperparameters if section is not None else None
        if given is not None:
            if openai_hp is not None:
                raise InvalidRequest(
                    f"give hyperparameters in method.{kind}.hyperparameters or in hyperparameters, not both",
                    param="hyperparameters",
                )
            openai_hp, prefix = given, f"method.{kind}.hyperparameters"
    if kind == "dpo":
        dpo = options.dpo.model_dump(exclude_unset=True) if options.dpo else {}
        for key in dpo:
            origins.exact[f"dpo.{key}"] = f"tuneforge.dpo.{key}"
        beta = getattr(openai_hp, "beta", None)
        if beta not in (None, "auto"):
            if "beta" in dpo:
                raise InvalidRequest(
                    f"{prefix}.beta and tuneforge.dpo.beta both set beta; give one",
                    param="tuneforge.dpo.beta",
                )
            dpo["beta"] = beta
            origins.exact["dpo.beta"] = f"{prefix}.beta"
    elif options.dpo is not None:
        raise InvalidRequest("tuneforge.dpo applies only to method type dpo", param="tuneforge.dpo")

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
    adapter = options.adapter.model_dump() if options.adapter else None
    quantization = options.quantization.model_dump() if options.quantization else None
    method = options.method
    if dpo is not None:
        # DPO trains the adapter tuneforge.method names: dora and rslora are flags of the adapter, qlora is a
        # 4-bit base.
        method = "dpo"
        flag = {"dora": "use_dora", "rslora": "use_rslora"}.get(options.method)
        if flag is not None:
            if adapter is not None and adapter.get(flag) is False:
                raise InvalidRequest(
                    f"tuneforge.method {options.method} implies {flag}=true",
                    param=f"tuneforge.adapter.{flag}",
                )
            adapter = {**(adapter or {}), flag: True}
        if options.method == "qlora":
            quantization = quantization or {}
        elif quantization is not None:
            raise InvalidRequest(
                "quantization applies to tuneforge.method qlora (DPO on a 4-bit base)",
                param="tuneforge.quantization",
            )
    values: dict[str, Any] = {
        "base_model": base_model,
        "init_from": init_from,
        "dataset": body.training_file,
        "validation_dataset": body.validation_file,
        "method": method,
        "adapter": adapter,
        "quantization": quantization,
        "dpo": dpo,
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
