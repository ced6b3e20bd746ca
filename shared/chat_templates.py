"""Chat templates a job may name (or give as its own Jinja) for rendering `messages` datasets: ChatML, and the
templates trl ships (llama3, qwen2_5, gemma, phi3, …). The API checks the choice; the worker reads the
template's text (worker/training/adapters.py) and saves it with the adapter's tokenizer."""

from __future__ import annotations

import re

# ChatML as OpenAI defined it, the layout most open chat models use.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The templates trl ships in trl/chat_templates/<name>.jinja (its `_training` variants left out: masking here
# does not need their generation markers). tests/unit/test_chat_templates.py checks this list against trl.
TRL_TEMPLATES = [
    "cohere",
    "cohere2",
    "deepseek_r1_distill",
    "deepseekv3",
    "diffusion_gemma",
    "gemma",
    "gemma3",
    "gemma4",
    "gemma4_v2",
    "gemma4_v3",
    "gemma4_v4",
    "gemma4_v5",
    "glm4moe",
    "gptoss",
    "idefics3",
    "lfm2",
    "lfm2_2_5",
    "lfm2_2_5_v2",
    "lfm2_2_5_vl",
    "lfm2_v2",
    "llama3",
    "llama3_1",
    "llama3_2",
    "llava_next",
    "muse_glimmer",
    "nemotron_3_5_lightning",
    "nemotron_3_nano",
    "nemotron_3_super",
    "nemotron_3_ultra",
    "phi3",
    "phi3_5",
    "qwen2_5",
    "qwen2_5_vl",
    "qwen3",
    "qwen3_5_nothink",
    "qwen3_5_think",
    "qwen3_6",
    "qwen3_8",
    "qwen3_instruct_2507",
    "qwen3_vl",
    "smolvlm",
]
NAMED_TEMPLATES = ("chatml", *TRL_TEMPLATES)
MAX_TEMPLATE_CHARS = 65_536
# A template's name; anything else is taken for Jinja source.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_template_name(value: str) -> bool:
    return bool(_NAME.match(value))


def check_chat_template(value: str) -> None:
    """Raises ValueError saying what is wrong with a job's chat_template: an unknown name, or Jinja that does
    not compile (with its line)."""
    if is_template_name(value):
        if value not in NAMED_TEMPLATES:
            raise ValueError(
                f"unknown chat template {value!r}; name one of {', '.join(NAMED_TEMPLATES)}, or give the "
                "template itself as Jinja"
            )
        return
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers renders templates in this sandbox, with these extensions.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    try:
        env.parse(value)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the Jinja template does not compile: line {exc.lineno}: {exc.message}") from None
    if "messages" not in value:
        raise ValueError("the Jinja template never reads `messages`, so it cannot render a conversation")
