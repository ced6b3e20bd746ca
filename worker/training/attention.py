"""Attention over padding-free rows where no variable-length kernel exists (a CPU): transformers' SDPA
attention, run on each sample of the row on its own.

A padding-free row (trl's collator: the micro-batch's samples concatenated, position ids restarting per sample)
reaches SDPA with a block-diagonal causal mask over the whole row, and torch's SDPA computes every entry of the
(row x row) scores whatever the mask hides: the attention of a row of samples of lengths l1..ln costs
(l1 + ... + ln)^2 instead of l1^2 + ... + ln^2. FlashAttention-2 takes the samples' bounds (cu_seq_lens) and
attends within each; on a CPU this does the same with torch's own kernel: transformers' `sdpa_attention_forward`
on each sample's slice of the row, causal, without a mask. Anything else (padded batches, rows without bounds,
decoding) is transformers' SDPA unchanged, with its masks."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

# The name models are switched to (model.set_attn_implementation) for padding-free training on a CPU.
SDPA_PER_SAMPLE = "sdpa_per_sample"


def sdpa_per_sample_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`sdpa_attention_forward` on each sample of a padding-free row (one row, its samples' bounds in
    `cu_seq_lens_q`, queries and keys the same tokens); transformers' SDPA with its mask otherwise."""
    length = query.shape[2]
    if (
        cu_seq_lens_q is None
        # A sliding window lives in the mask.
        or kwargs.get("sliding_window") is not None
        or query.shape[0] != 1
        or key.shape[2] != length
        or (
            cu_seq_lens_k is not None
            and cu_seq_lens_k is not cu_seq_lens_q
            and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)
        )
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    parts = [
        sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            is_causal=True,
            **kwargs,
        )[0]
        for start, end in pairwise(bounds)
        if end > start
    ]
    # Each part is (1, sample length, heads, head dim).
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


AttentionInterface.register(SDPA_PER_SAMPLE, sdpa_per_sample_forward)
AttentionMaskInterface.register(SDPA_PER_SAMPLE, sdpa_mask)
