"""How efficiently a job trains: the batches it fed (tokens and sample lengths), its model FLOPs per token
and utilization against the device's peak (configured, or measured once per machine and cached), whether
packing samples without padding pays for a dataset, and whether bfloat16 autocast pays on this CPU.

FLOPs per token = 4N + 6P + 12·L·s·d + 4·h·V: the frozen weights N outside the embeddings and the output
head cost a forward and an input-gradient matmul (2 + 2 FLOPs per weight), the trainable weights P also their
weight gradient (6), attention's scores and weighted sum 12·L·s·d over the s tokens a token attends to (the
token-weighted mean sample length; d the attention width), and the output head 4·h·V (it is frozen).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Padding-free batches are chosen when they cost at most this share of the padded ones.
PADDING_FREE_MAX_COST = 0.9
# Random micro-batches drawn to compare padded and padding-free costs.
COST_SAMPLE_BATCHES = 256
# Without a variable-length attention kernel, a padding-free row's (tokens x tokens) mask may grow this large.
PADDING_FREE_MASK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ModelFlops:
    """The parts of a model the FLOPs formula needs."""

    frozen: int  # N: frozen parameters outside the input embeddings and the output head
    trainable: int  # P
    layers: int  # L
    attention_width: int  # d: heads x head dim
    hidden: int  # h
    vocab: int  # V
    # Forward passes of each token without the adapter and without gradients (DPO's reference: 1).
    reference_passes: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module, trainable: int, total: int) -> ModelFlops:
        """From a loaded model and its (peft-counted) trainable and total parameters."""
        config = model.config.get_text_config()
        embeddings = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        head_params = 0
        if head is not None and head.weight.data_ptr() != embeddings.data_ptr():
            head_params = head.weight.numel()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            frozen=max(total - trainable - embeddings.numel() - head_params, 0),
            trainable=trainable,
            layers=config.num_hidden_layers,
            attention_width=heads * head_dim,
            hidden=config.hidden_size,
            vocab=config.vocab_size,
        )

    def linear_per_token(self) -> float:
        """The FLOPs per token that do not depend on the sequence length."""
        reference = self.reference_passes * (2 * self.frozen + 2 * self.hidden * self.vocab)
        return 4 * self.frozen + 6 * self.trainable + 4 * self.hidden * self.vocab + reference

    def attention_per_token_and_position(self) -> float:
        return (12 + 4 * self.reference_passes) * self.layers * self.attention_width

    def per_token(self, mean_length: float) -> float:
        """FLOPs per token when a token attends to `mean_length` positions on average."""
        return self.linear_per_token() + self.attention_per_token_and_position() * mean_length


class BatchCounter:
    """Wraps the trainer's data collator and counts what each batch holds: real tokens and the sum of squared
    sample lengths (for the attention FLOPs), from the attention mask of padded batches or the position ids
    that restart per sample in padding-free ones."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens = 0
        self.squares = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(dim=-1)
        elif "position_ids" in batch:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
            ends = [*starts[1:], batch["position_ids"].shape[-1]]
            lengths = torch.tensor([end - start for start, end in zip(starts, ends, strict=True)])
        else:
            lengths = torch.tensor([batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0])
        self.tokens += int(lengths.sum())
        self.squares += int((lengths.long() ** 2).sum())
        return batch

    def mean_length(self) -> float | None:
        """The token-weighted mean sample length so far (what a token attends to on average)."""
        return self.squares / self.tokens if self.tokens else None


def process_age() -> float | None:
    """Seconds since this process started (interpreter start and imports included); None off Linux."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    # Field 22 of /proc/self/stat (the 20th after the command name): the start time, in clock ticks since boot.
    return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)


# ------------------------------------------------------------------------------------------------- device peak


def _cached(cache_dir: Path | None, key: str, measure: Any) -> Any:
    """A per-machine measurement: read from cache_dir/efficiency.json when it is there, else measured and
    written there."""
    path = cache_dir / "efficiency.json" if cache_dir is not None else None
    known: dict[str, Any] = {}
    if path is not None and path.is_file():
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        return known[key]
    value = measure()
    if path is not None:
        known[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(known, indent=2))
            temporary.replace(path)
        except OSError:  # measured again next time
            log.warning("could not keep the measurement in %s", path, exc_info=True)
    return value


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{os.cpu_count()}"


def matmul_flops(dtype: torch.dtype, budget_seconds: float = 1.0) -> float:
    """FLOP/s of this process's best square matmul in `dtype` (8192 wide on a GPU, 2048 on CPUs), timed again
    and again for about `budget_seconds` (at least twice)."""
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, runs, spent = float("inf"), 0, 0.0
    while runs < 2 or (spent < budget_seconds and runs < 20):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - started
        best, runs, spent = min(best, took), runs + 1, spent + took
    return 2 * n**3 / best


def device_peak(
    configured_tflops: float | None, cache_dir: Path | None, dtype: torch.dtype
) -> tuple[float, str]:
    """The peak FLOP/s of one training device and where the figure comes from: the deployment's setting, or
    a timed matmul in the training dtype with this process's threads, measured once per machine."""
    if configured_tflops is not None:
        return configured_tflops * 1e12, "configured"
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and not cpu_bf16_instructions():
        # Without native bf16 a CPU only emulates it (orders of magnitude slower): fp32 is its peak.
        dtype = torch.float32
    key = f"peak/{_device_name()}/{str(dtype).removeprefix('torch.')}/{torch.get_num_threads()}/{torch.__version__}"
    return float(_cached(cache_dir, key, lambda: matmul_flops(dtype))), "measured"


# ------------------------------------------------------------------------------------------------- CPU bf16


def cpu_bf16_instructions() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere autocast only emulates it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_autocast_speedup(steps: int = 5) -> float:
    """fp32 time / bf16-autocast time of a small MLP's forward and backward on this CPU (above 1: faster)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.SiLU(), torch.nn.Linear(4096, 1024))
    data = torch.randn(512, 1024)

    def timed(autocast: bool) -> float:
        best = float("inf")
        for _ in range(steps):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(data).float().pow(2).mean()
            loss.backward()
            best = min(best, time.perf_counter() - started)
        return best

    return timed(False) / timed(True)


def cpu_bf16_pays(cache_dir: Path | None) -> bool:
    """Whether bfloat16 autocast should be this CPU's default: only with native bf16 instructions, and only if
    it measured faster (once per machine). Its loss follows fp32's as on GPUs (bench/run.py compares them)."""
    if not cpu_bf16_instructions():
        return False
    key = f"cpu-bf16-speedup/{_device_name()}/{torch.get_num_threads()}/{torch.__version__}"
    speedup = float(_cached(cache_dir, key, bf16_autocast_speedup))
    return speedup > 1.1


# ------------------------------------------------------------------------------------------------- packing


def padding_free_pays(
    lengths: list[int],
    batch_size: int,
    flops: ModelFlops,
    *,
    varlen: bool,
    builds_mask: bool | None = None,
    seed: int = 0,
) -> tuple[bool, float]:
    """Whether concatenating each micro-batch's samples without padding costs less than padding them to the
    batch's longest, for these sample lengths; returns the choice and the cost ratio (padding-free / padded).

    With a variable-length kernel (FlashAttention-2, or SDPA one sample at a time on a CPU) each sample attends
    only to itself; without one (SDPA, eager) the concatenated row computes every score of the whole row. Where
    the row builds a (tokens x tokens) mask (`builds_mask`: all but FlashAttention-2 by default), it is chosen
    only while that mask stays within the padded batches' (the plan's estimate) or under 64 MiB."""
    builds_mask = not varlen if builds_mask is None else builds_mask
    if not lengths or batch_size < 2:
        return False, 1.0
    rng = random.Random(seed)
    linear, attention = flops.linear_per_token(), flops.attention_per_token_and_position()
    mask_budget = max(batch_size * max(lengths) ** 2, PADDING_FREE_MASK_BYTES)
    padded = flattened = 0.0
    for _ in range(COST_SAMPLE_BATCHES):
        batch = [rng.choice(lengths) for _ in range(batch_size)]
        longest, total = max(batch), sum(batch)
        padded += len(batch) * longest * (linear + attention * longest)
        if builds_mask and total * total > mask_budget:
            return False, float("inf")
        if varlen:
            flattened += total * linear + attention * sum(n * n for n in batch)
        else:
            flattened += total * (linear + attention * total)
    ratio = flattened / padded
    return ratio <= PADDING_FREE_MAX_COST, ratio
