"""Merge: combine finished LoRA adapters of one base into a new adapter with peft's add_weighted_adapter,
without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import MergeSpec, Method
from worker.training.adapters import (
    OUTPUT_ADAPTER,
    adapter_param_count,
    load_full_precision_base,
    load_source_tokenizer,
    load_sources,
    lora_layers,
    refuse_dora,
    save_adapter,
    source_names,
)
from worker.training.model_card import write_model_card
from worker.training.recipes.base import Recipe, TrainingContext, TrainingResult

# dare_* drop entries at random: a fixed seed makes a merge reproducible.
MERGE_SEED = 0


class MergeRecipe(Recipe):
    """Loads the base in float32 with every source adapter, combines them into one adapter (cat, svd, linear,
    ties, dare_ties, dare_linear or magnitude_prune) and saves that adapter alone."""

    method = Method.merge
    artifact_kind = "adapter"

    def __init__(self, ctx: TrainingContext) -> None:
        super().__init__(ctx)
        self.model: PeftModel | None = None
        self.tokenizer: Any = None
        self.names: list[str] = []
        self.rank: int | None = None

    @property
    def merge(self) -> MergeSpec:
        assert self.ctx.spec.merge is not None
        return self.ctx.spec.merge

    def setup(self) -> None:
        ctx, merge = self.ctx, self.merge
        if len(ctx.sources) != len(merge.sources) or len(ctx.sources) < 2:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"merge needs its {len(merge.sources)} source adapters, got {len(ctx.sources)}",
            )
        self.tokenizer = load_source_tokenizer(ctx.model_dir, ctx.sources[0])
        self.names = source_names(len(ctx.sources))
        self.model = load_sources(load_full_precision_base(ctx.model_dir), ctx.sources, self.names)
        refuse_dora(self.model, self.names, "merged")
        ranks = [self.model.peft_config[name].r for name in self.names]
        ctx.reporter.event(
            "model",
            f"loaded {len(self.names)} source adapters of ranks {ranks}",
            data={"ranks": ranks},
        )

    def train(self) -> None:
        assert self.model is not None
        merge, model = self.merge, self.model
        if merge.combination_type == "svd" and merge.svd_rank is not None:
            smallest = min(
                min(layer.in_features, layer.out_features) for _, layer in lora_layers(model, self.names)
            )
            if merge.svd_rank > smallest:
                raise JobFailure(
                    JobErrorCode.invalid_config,
                    f"svd_rank {merge.svd_rank} exceeds the smallest adapted layer dimension ({smallest})",
                )
        # add_weighted_adapter copies the first source's config for the new adapter, with lora_alpha = new
        # rank so that its scaling is 1, and folds each source's scaling into the new weights. A copied
        # use_rslora would make that scaling alpha/sqrt(r) = sqrt(r) instead. The sources' layers already hold
        # their own scalings (set when they were loaded), so their configs can drop the flag.
        for name in self.names:
            model.peft_config[name].use_rslora = False
        torch.manual_seed(MERGE_SEED)
        kwargs: dict[str, Any] = {}
        if merge.density is not None:
            kwargs["density"] = merge.density
        if merge.combination_type == "svd":
            # The reduced SVD gives the same leading singular vectors at a fraction of the cost.
            kwargs.update(svd_rank=merge.svd_rank, svd_full_matrices=False)
        assert merge.weights is not None
        try:
            model.add_weighted_adapter(
                adapters=self.names,
                weights=list(merge.weights),
                adapter_name=OUTPUT_ADAPTER,
                combination_type=merge.combination_type,
                **kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"these adapters cannot be merged with {merge.combination_type}: {exc}",
            ) from exc
        self.ctx.check_stop()
        # Keep only the new adapter (trainable, as a fresh load of it would be) so that the counts are its own.
        model.set_adapter(OUTPUT_ADAPTER)
        for name in self.names:
            model.delete_adapter(name)
        self.rank = model.peft_config[OUTPUT_ADAPTER].r

    def save(self, output_dir: Path) -> TrainingResult:
        assert self.model is not None
        spec, merge = self.ctx.spec, self.merge
        save_adapter(self.model, output_dir, spec.base_model)
        self.tokenizer.save_pretrained(output_dir)
        trainable = adapter_param_count(self.model, OUTPUT_ADAPTER)
        total = sum(p.numel() for p in self.model.parameters())
        metrics: dict[str, Any] = {
            "combination_type": merge.combination_type,
            "weights": list(merge.weights or []),
            "rank": self.rank,
            "sources": len(self.names),
        }
        if merge.density is not None:
            metrics["density"] = merge.density
        write_model_card(
            output_dir,
            job_id=self.ctx.job_id,
            spec=spec,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=0,
            metrics=metrics,
        )
        return TrainingResult(
            output_dir=output_dir,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=0,
            metrics=metrics,
        )

    def cleanup(self) -> None:
        self.model = None
