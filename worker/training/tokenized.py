"""Tokenized datasets, ready for the trainer and cached on the worker: a dataset is encoded (worker/training/
data.py), cut to max_seq_length, rid of samples with nothing to learn and, for `packing`, packed into rows by
trl, once per (dataset sha256, tokenizer, chat template, format, max_seq_length, packing); retries, resumed
attempts and other jobs on the same data load the stored Arrow files instead. Preference pairs (dpo) become
prompt_ids/chosen_ids/rejected_ids columns, each pair cut to max_seq_length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trl
from datasets import Dataset, load_from_disk
from trl import pack_dataset

from shared.datasets import PREFERENCE_FORMATS, DatasetFormat
from worker.training.data import encode_dataset, encode_preferences

log = logging.getLogger(__name__)

# Bump when the encoding changes, so that no cache made by older code is read.
ENCODING_VERSION = 1
META_FILE = "tokenized.json"


@dataclass
class TokenizedDataset:
    """A dataset as the trainer takes it, with what the encoding found."""

    # input_ids and labels (and seq_lengths, packed in rows); prompt_ids, chosen_ids and rejected_ids for
    # preference pairs
    dataset: Dataset
    samples: int  # records encoded
    tokens: int  # their tokens, before cutting to max_seq_length
    truncated: int  # samples longer than max_seq_length
    lengths: list[int]  # tokens of each sample kept, after cutting (of a pair: its longer sequence)
    cached: bool = False  # read from the cache

    def meta(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "lengths": self.lengths,
        }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that decides the token ids: its vocabulary and merges, special
    tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    special = {
        "class": type(tokenizer).__name__,
        "special": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(
    *, dataset_sha256: str, tokenizer: Any, fmt: DatasetFormat, max_length: int, packing: bool
) -> str:
    """The cache entry of one tokenized dataset."""
    parts = {
        "version": ENCODING_VERSION,
        "dataset": dataset_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": fmt.value,
        "max_length": max_length,
        # Packed rows are trl's (best-fit decreasing); another trl may pack them differently.
        "packing": f"bfd/trl-{trl.__version__}" if packing else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def tokenize(
    records: list[dict[str, Any]], fmt: DatasetFormat, tokenizer: Any, max_length: int, *, packing: bool
) -> TokenizedDataset:
    """Encodes the records, cuts each sample to `max_length`, drops the samples left with no token to learn,
    and packs the rest into rows of `max_length` when `packing`."""
    if fmt in PREFERENCE_FORMATS:
        preferences = encode_preferences(records, fmt, tokenizer, max_length)
        pairs = preferences.columns(max_length)
        return TokenizedDataset(
            dataset=Dataset.from_dict(pairs),
            samples=len(preferences.pairs),
            tokens=preferences.total_tokens,
            truncated=preferences.truncated,
            lengths=[
                len(prompt) + max(len(chosen), len(rejected))
                for prompt, chosen, rejected in zip(*pairs.values(), strict=True)
            ],
        )
    encoded = encode_dataset(records, fmt, tokenizer, max_length)
    columns = encoded.columns(max_length)
    dataset = Dataset.from_dict(columns)
    if packing and len(dataset):
        dataset = pack_dataset(dataset, max_length, "bfd")
    return TokenizedDataset(
        dataset=dataset,
        samples=len(encoded.samples),
        tokens=encoded.total_tokens,
        truncated=encoded.truncated,
        lengths=[len(ids) for ids in columns["input_ids"]],
    )


def cached_tokenize(
    records: list[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: Any,
    max_length: int,
    *,
    packing: bool,
    cache_dir: Path | None,
    dataset_sha256: str | None,
) -> TokenizedDataset:
    """`tokenize`, through the cache under `cache_dir` when the dataset's sha256 is known."""
    if cache_dir is None or dataset_sha256 is None:
        return tokenize(records, fmt, tokenizer, max_length, packing=packing)
    key = cache_key(
        dataset_sha256=dataset_sha256, tokenizer=tokenizer, fmt=fmt, max_length=max_length, packing=packing
    )
    folder = cache_dir / "tokenized" / key
    if (folder / META_FILE).is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text())
            return TokenizedDataset(dataset=load_from_disk(str(folder / "data")), cached=True, **meta)
        except (OSError, ValueError, TypeError):
            log.warning("tokenized dataset %s is unreadable; encoding again", folder, exc_info=True)
            shutil.rmtree(folder, ignore_errors=True)
    result = tokenize(records, fmt, tokenizer, max_length, packing=packing)
    _store(result, folder)
    return result


def _store(result: TokenizedDataset, folder: Path) -> None:
    """Writes an entry beside its final place and renames it there, so a reader sees all of it or nothing
    (two processes storing the same entry: the first rename wins, the other copy is dropped)."""
    staging = folder.with_name(f".{folder.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        result.dataset.save_to_disk(str(staging / "data"))
        (staging / META_FILE).write_text(json.dumps(result.meta()))
        with contextlib.suppress(OSError):  # stored meanwhile by another process: keep that one
            staging.rename(folder)
    except OSError:
        log.warning("could not cache the tokenized dataset in %s", folder, exc_info=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
