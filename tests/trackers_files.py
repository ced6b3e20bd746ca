"""Readers for what the trackers write on disk, as their own tools would read it: W&B's offline run file
(`run-<id>.wandb`, LevelDB-style log records of W&B's protobuf Records) and TensorBoard event files (TFRecords
of Event protobufs)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

W_AND_B_BLOCK = 32768


def wandb_records(path: Path) -> Iterator[Any]:
    """The Records of a W&B run file (header `:W&B`, then 32 KiB blocks of checksum, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left = W_AND_B_BLOCK - position % W_AND_B_BLOCK
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # the rest of the block is padding
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces + payload if kind == 4 else payload)
            pieces = b""
            yield record
        else:
            pieces = payload if kind == 2 else pieces + payload


def _key(item: Any) -> str:
    # "train/loss" is written as the nested key ["train", "loss"].
    return item.key or "/".join(item.nested_key)


def wandb_run(folder: Path) -> dict[str, Any]:
    """What an offline W&B run holds: its run record, history rows, summary and logged artifacts."""
    (path,) = folder.glob("run-*.wandb")
    run: dict[str, Any] = {"history": [], "summary": {}, "artifacts": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
        elif kind == "history":
            run["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run["summary"].update(
                {_key(i): json.loads(i.value_json) for i in record.summary.update if _key(i)}
            )
        elif kind == "artifact":
            run["artifacts"].append(
                {
                    "name": record.artifact.name,
                    "type": record.artifact.type,
                    "files": [entry.path for entry in record.artifact.manifest.contents],
                }
            )
    return run


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in `folder`, by tag: (step, value) in the order written."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
