"""Adapter helpers the recipes share: the tokenizer, loading finished adapters onto a base model, saving one
adapter as a plain folder that names its base, the model card's extra sections, and a fixed probe input to
compare two models' logits on. (The trainer setup is worker/training/trainer.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.chat_templates import CHATML, is_template_name
from shared.errors import JobErrorCode, JobFailure

# The name the combined adapter gets: peft saves the adapter called "default" at the top of the folder (others
# go to a subfolder named after them), so the folder loads with PeftModel.from_pretrained(base, folder).
OUTPUT_ADAPTER = "default"
PROBE_TEXT = "What color is the sky? Reverse the word stone. The quick brown fox jumps over the lazy dog."


def source_names(count: int) -> list[str]:
    """The adapter names the sources load under, in spec order."""
    return [f"source_{i}" for i in range(count)]


def chat_template_text(chat_template: str) -> str:
    """The Jinja of a job's chat_template: a named template's text (ChatML, or the file trl ships), or the
    job's own Jinja as it is."""
    if not is_template_name(chat_template):
        return chat_template
    if chat_template == "chatml":
        return CHATML
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{chat_template}.jinja"
    if not path.is_file():
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"chat_template: this worker's trl {trl.__version__} ships no template {chat_template!r}",
        )
    return path.read_text()


def load_tokenizer(model_dir: Path, chat_template: str | None = None) -> Any:
    """The base model's tokenizer, rendering chats with the job's chat_template when it names one (it is saved
    with the adapter's tokenizer, so whatever serves the adapter renders chats the same way)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
    return tokenizer


def load_source_tokenizer(model_dir: Path, source: Path) -> Any:
    """The tokenizer a finished adapter was saved with (its chat template included), or the base model's when
    the adapter folder has none."""
    return load_tokenizer(source if (source / "tokenizer_config.json").is_file() else model_dir)


def load_full_precision_base(model_dir: Path) -> torch.nn.Module:
    """The base model in float32 on the CPU: what merging adapters into weights (or into each other) needs."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def load_sources(base: torch.nn.Module, folders: Sequence[Path], names: Sequence[str]) -> PeftModel:
    """Loads every finished adapter onto `base` under its name, all frozen; the first one is active."""
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in folders]
    for i, config in enumerate(configs):
        if config.get("peft_type") != "LORA":
            raise JobFailure(
                JobErrorCode.invalid_config, f"source {i} is a {config.get('peft_type')} adapter, not LoRA"
            )
    model = PeftModel.from_pretrained(base, folders[0], adapter_name=names[0], is_trainable=False)
    for folder, name in zip(folders[1:], names[1:], strict=True):
        model.load_adapter(folder, adapter_name=name, is_trainable=False)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_initial_adapter(model: PeftModel, folder: Path, label: str) -> None:
    """Copies a finished adapter's weights (`folder`, described as `label` in errors) into the freshly made
    trainable adapter of `model`: the start of a job that continues another (init_from). Its shape was checked
    before queueing; a mismatch found here fails the job naming it."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(folder / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"init_from: {label} does not fit this job's adapter ({len(missing)} weights missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use the source's rank, "
            "target_modules and DoRA setting",
        )
    wrong = [name for name, value in state.items() if value.shape != expected[name].shape]
    if wrong:
        name = wrong[0]
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"init_from: {label} has {name} of shape {tuple(state[name].shape)}, this job "
            f"{tuple(expected[name].shape)}; use the source's rank and target_modules",
        )
    set_peft_model_state_dict(model, state)


def refuse_dora(model: PeftModel, names: Sequence[str], what: str) -> None:
    """DoRA's magnitude vectors rescale whole weights: they do not add up with other adapters."""
    for i, name in enumerate(names):
        if model.peft_config[name].use_dora:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"source {i} is a DoRA adapter; DoRA adapters cannot be {what} (export it into its base instead)",
            )


def lora_layers(model: torch.nn.Module, adapters: Sequence[str]) -> Iterator[tuple[str, LoraLayer]]:
    """The LoRA-wrapped modules holding at least one of `adapters`, with their full names."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and any(a in module.lora_A for a in adapters):
            yield name, module


def adapter_param_count(model: torch.nn.Module, adapter: str) -> int:
    """Parameters of one adapter (what PeftModel.from_pretrained(..., is_trainable=True) would train)."""
    suffix = f".{adapter}."
    return sum(p.numel() for name, p in model.named_parameters() if suffix in name and "lora_" in name)


def save_adapter(model: PeftModel, output_dir: Path, base_model: str | None) -> None:
    """Saves the OUTPUT_ADAPTER alone, at the top of `output_dir`, naming its base by registry name."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # No embedding layer is adapted, so none is saved; this also keeps peft from looking the base model's
    # name up on a model hub (the adapter's base is a registry name, not a path).
    model.save_pretrained(output_dir, selected_adapters=[OUTPUT_ADAPTER], save_embedding_layers=False)
    name_base_model(output_dir, base_model)


def name_base_model(adapter_dir: Path, base_model: str | None) -> None:
    """Makes a saved adapter name its base by registry name, not by this worker's cache path. (Done after
    saving: peft looks the name up while saving, and there is no model hub to ask.)"""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def probe_input(tokenizer: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed input to compare two models' logits on."""
    ids = list(tokenizer(PROBE_TEXT)["input_ids"])[:64]
    return torch.tensor([ids], device=device)


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.float()
    finally:
        model.train(was_training)


def add_card_section(output_dir: Path, title: str, lines: Sequence[str]) -> None:
    """Adds a section to the README.md model card, before its usage section."""
    path = output_dir / "README.md"
    text = path.read_text()
    section = "\n".join([f"## {title}", "", *lines, "", ""])
    marker = "## Use\n"
    text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
    path.write_text(text)
