"""Export: merge a LoRA adapter into its base model and store the full model (sharded safetensors), for
serving without peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import ExportSpec, Method
from worker.training.adapters import (
    add_card_section,
    load_full_precision_base,
    load_source_tokenizer,
    probe_input,
    probe_logits,
)
from worker.training.model_card import write_model_card
from worker.training.recipes.base import Recipe, TrainingContext, TrainingResult

# How closely the merged float32 weights must reproduce base + adapter on the probe input: at most this
# share of the largest logit (at least this much in absolute terms). Merging only sums in another order.
MERGE_TOLERANCE = 1e-4


class ExportRecipe(Recipe):
    """Loads the base in float32 (never quantized, even for an adapter trained with qlora: the registry's
    base is full precision), merges the adapter into its weights, checks the merged model against base +
    adapter, casts to the asked dtype and saves."""

    method = Method.export
    artifact_kind = "merged"

    def __init__(self, ctx: TrainingContext) -> None:
        super().__init__(ctx)
        self.model: PeftModel | None = None
        self.merged: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.metrics: dict[str, Any] = {}

    @property
    def export(self) -> ExportSpec:
        assert self.ctx.spec.export is not None
        return self.ctx.spec.export

    def setup(self) -> None:
        ctx = self.ctx
        if len(ctx.sources) != 1:
            raise JobFailure(JobErrorCode.invalid_config, f"export needs one adapter, got {len(ctx.sources)}")
        self.tokenizer = load_source_tokenizer(ctx.model_dir, ctx.sources[0])
        base = load_full_precision_base(ctx.model_dir)
        self.model = PeftModel.from_pretrained(base, ctx.sources[0], is_trainable=False)
        self.model.eval()

    def train(self) -> None:
        assert self.model is not None
        export = self.export
        probe = probe_input(self.tokenizer)
        reference = probe_logits(self.model, probe)
        merged = self.model.merge_and_unload()
        self.model = None
        merged.eval()
        self.ctx.check_stop()
        difference = float((probe_logits(merged, probe) - reference).abs().max())
        tolerance = MERGE_TOLERANCE * max(1.0, float(reference.abs().max()))
        if difference > tolerance:
            self.ctx.reporter.event(
                "verification",
                f"the merged model differs from base + adapter by up to {difference:.3g} in its logits on a "
                f"probe input (tolerance {tolerance:.3g})",
                level="warning",
                data={"max_logit_diff": difference, "tolerance": tolerance},
            )
        dtype = getattr(torch, export.dtype)
        merged = merged.to(dtype)
        self.metrics = {
            "dtype": export.dtype,
            "merge_max_logit_diff": difference,
            "merge_tolerance": tolerance,
            "within_tolerance": difference <= tolerance,
            "probe_tokens": int(probe.shape[1]),
        }
        if dtype is not torch.float32:
            # What the cast costs, for information: the stored model against base + adapter in float32.
            self.metrics["export_max_logit_diff"] = float(
                (probe_logits(merged, probe) - reference).abs().max()
            )
        self.merged = merged

    def save(self, output_dir: Path) -> TrainingResult:
        assert self.merged is not None
        spec, export = self.ctx.spec, self.export
        output_dir.mkdir(parents=True, exist_ok=True)
        self.merged.save_pretrained(output_dir, max_shard_size=export.max_shard_size)
        self.tokenizer.save_pretrained(output_dir)
        index = output_dir / "model.safetensors.index.json"
        shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else 1
        metrics = {**self.metrics, "shards": shards}
        total = sum(p.numel() for p in self.merged.parameters())
        write_model_card(
            output_dir,
            job_id=self.ctx.job_id,
            spec=spec,
            trainable_params=0,
            total_params=total,
            trained_tokens=0,
            metrics=metrics,
            full_model=True,
        )
        lines = [
            "The adapter was merged into the base model's weights in float32, then the model was cast to "
            f"{export.dtype}. On a fixed probe input of {metrics['probe_tokens']} tokens, the merged float32 model's "
            f"logits differ from base + adapter by at most {metrics['merge_max_logit_diff']:.3g}; the "
            f"tolerance is {MERGE_TOLERANCE:g} of the largest logit, at least {MERGE_TOLERANCE:g} "
            f"({metrics['merge_tolerance']:.3g} here).",
        ]
        if "export_max_logit_diff" in metrics:
            lines.append(
                f"After the cast to {export.dtype} they differ by at most "
                f"{metrics['export_max_logit_diff']:.3g} (the rounding of the weights to {export.dtype})."
            )
        add_card_section(output_dir, "Verification", lines)
        return TrainingResult(
            output_dir=output_dir, trainable_params=0, total_params=total, trained_tokens=0, metrics=metrics
        )

    def cleanup(self) -> None:
        self.model = None
        self.merged = None
