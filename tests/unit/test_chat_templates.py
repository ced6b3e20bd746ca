"""Chat templates a job names or writes: checked in the spec (a 422 naming chat_template), read on the worker,
and used to render and mask `messages`."""

from pathlib import Path

import pytest
import trl
from pydantic import ValidationError

from shared.chat_templates import CHATML, TRL_TEMPLATES
from shared.datasets import DatasetFormat
from shared.errors import JobFailure
from shared.schemas import JobSpec
from worker.training.adapters import chat_template_text
from worker.training.data import IGNORE, encode_dataset
from worker.training.toy_models import build_tokenizer

CHAT = {
    "messages": [
        {"role": "user", "content": "What color is snow?"},
        {"role": "assistant", "content": "white"},
    ]
}


def spec(**fields) -> JobSpec:
    return JobSpec(base_model="m", dataset="file-0123456789abcdef01234567", **fields)


def test_the_named_templates_are_the_ones_trl_ships():
    folder = Path(trl.__file__).parent / "chat_templates"
    shipped = {p.stem for p in folder.glob("*.jinja") if not p.stem.endswith("_training")}
    assert set(TRL_TEMPLATES) == shipped


def error_of(**fields) -> dict:
    with pytest.raises(ValidationError) as info:
        spec(**fields)
    (error,) = info.value.errors()
    return {"loc": error["loc"], "msg": error["msg"]}


def test_the_spec_checks_the_chat_template():
    assert spec(chat_template="chatml").chat_template == "chatml"
    assert spec(chat_template="llama3").chat_template == "llama3"
    assert spec(chat_template=CHATML).chat_template == CHATML
    unknown = error_of(chat_template="chatml2")
    assert unknown["loc"] == ("chat_template",)
    assert "unknown chat template 'chatml2'; name one of chatml, cohere" in unknown["msg"]
    broken = error_of(chat_template="{% for m in messages %}\n{{ m['content'] }")
    assert broken["loc"] == ("chat_template",)
    assert "the Jinja template does not compile: line 2: unexpected '}'" in broken["msg"]
    assert "never reads `messages`" in error_of(chat_template="{{ bos_token }}")["msg"]
    merge = {"method": "merge", "merge": {"sources": [{"job_id": "a"}, {"job_id": "b"}]}}
    with pytest.raises(ValidationError, match="method merge reads no dataset; remove chat_template"):
        JobSpec(chat_template="chatml", **merge)


def test_template_texts_on_the_worker():
    assert chat_template_text("chatml") == CHATML
    assert "<|start_header_id|>" in chat_template_text("llama3")
    assert chat_template_text(CHATML.replace("im_", "x_")) == CHATML.replace("im_", "x_")


def test_a_base_without_a_template_refuses_messages_and_names_the_option(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = None
    with pytest.raises(JobFailure, match=r"set the job's chat_template \(a name such as chatml or llama3"):
        encode_dataset([CHAT], DatasetFormat.messages, tokenizer, 64)


@pytest.mark.parametrize("name", ["chatml", "llama3", "phi3"])
def test_a_named_template_renders_and_masks_the_assistant_turn(tmp_path, name):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = chat_template_text(name)
    (sample,) = encode_dataset([CHAT], DatasetFormat.messages, tokenizer, 64).samples
    trained = tokenizer.decode(
        [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE]
    )
    assert trained.startswith("white")
    assert "snow" not in trained
