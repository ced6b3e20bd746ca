"""Fusion: learn how much of each finished adapter to use, on a dataset, with the base and the adapters frozen;
then write the fused model as one plain LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import FusionSpec, Method
from worker.training.adapters import (
    OUTPUT_ADAPTER,
    adapter_param_count,
    add_card_section,
    load_sources,
    load_tokenizer,
    lora_layers,
    probe_input,
    probe_logits,
    refuse_dora,
    save_adapter,
    source_names,
)
from worker.training.model_card import write_model_card
from worker.training.recipes.base import TrainingResult
from worker.training.recipes.lora import LoraRecipe
from worker.training.trainer import (
    sft_trainer,
    started,
    trained_tokens,
    training_args,
    training_datasets,
    training_metrics,
)

# How closely the saved adapter must reproduce the fused model on a probe input, relative to the largest
# logit: float32 sums in another order only; a bfloat16 base rounds each layer's output once more.
REPRODUCTION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


class FusionMixer(nn.Module):
    """The learned mixing weights: the output of each source's lora_B is multiplied by its weight (one per
    source, or one per source and LoRA-wrapped module) through forward hooks.

    The weights start at 1/n each: the uniform average of the sources' changes, which is where a merge with
    the default weights starts too. They are not normalised (no softmax), so training may turn a source up
    beyond 1 (when the sources serve different inputs, the plain sum is often best) or off."""

    def __init__(self, model: nn.Module, names: list[str], per_layer: bool) -> None:
        super().__init__()
        self.names = names
        self.per_layer = per_layer
        layers = list(lora_layers(model, names))
        self.module_names = [name.removeprefix("base_model.model.") for name, _ in layers]
        # Which source each module holds (a source may adapt fewer modules than another).
        self.present = torch.tensor([[source in layer.lora_A for source in names] for _, layer in layers])
        rows = len(layers) if per_layer else 1
        self.weight = nn.Parameter(torch.full((rows, len(names)), 1.0 / len(names)))
        self.handles: list[Any] = []
        for row, (_, layer) in enumerate(layers):
            for col, source in enumerate(names):
                if source in layer.lora_B:
                    hook = self._hook(row if per_layer else 0, col)
                    self.handles.append(layer.lora_B[source].register_forward_hook(hook))

    def _hook(self, row: int, col: int) -> Any:
        def scale(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return output * self.weight[row, col].to(output.dtype)

        return scale

    def weight_of(self, row: int, col: int) -> float:
        """The weight of source `col` in the `row`-th LoRA-wrapped module."""
        return float(self.weight[row if self.per_layer else 0, col])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def rows(self) -> list[tuple[str, list[float | None]]]:
        """The learned weights by row (each module's, or one row for all), None where a source is absent."""
        weights = self.weight.detach().float().cpu()
        if not self.per_layer:
            return [("all modules", [round(float(w), 6) for w in weights[0]])]
        return [
            (name, [round(float(w), 6) if here else None for w, here in zip(row, mask, strict=True)])
            for name, row, mask in zip(self.module_names, weights, self.present, strict=True)
        ]

    def report(self) -> dict[str, Any]:
        """The learned weights: one per source (per layer: its mean over the modules it adapts), and each
        module's when per layer."""
        rows = self.rows()
        if not self.per_layer:
            return {"fusion_weights": rows[0][1]}
        means = []
        for col in range(len(self.names)):
            values = [row[col] for _, row in rows if row[col] is not None]
            means.append(round(sum(values) / len(values), 6) if values else None)
        return {"fusion_weights": means, "fusion_weights_per_module": dict(rows)}


class FusionRecipe(LoraRecipe):
    """Trains only the mixing weights, with LoraRecipe's SFTTrainer setup, and saves the fused model as one
    LoRA adapter: the sources side by side (rank = sum of their ranks), each source's lora_B scaled by its
    learned weight times its own scaling (divided by the new adapter's scaling, 1)."""

    method = Method.fusion

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names: list[str] = []
        self.mixer: FusionMixer | None = None
        self.trainable = 0
        self.total = 0

    @property
    def fusion(self) -> FusionSpec:
        assert self.ctx.spec.fusion is not None
        return self.ctx.spec.fusion

    def setup(self) -> None:
        ctx, fusion, hp = self.ctx, self.fusion, self.ctx.spec.hyperparameters
        assert hp is not None and ctx.train_data is not None
        if len(ctx.sources) != len(fusion.sources) or len(ctx.sources) < 2:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"fusion needs its {len(fusion.sources)} source adapters, got {len(ctx.sources)}",
            )
        # Fusion trains a handful of scalars in few steps: an interrupted attempt starts over rather than
        # keep checkpoints (a trainer checkpoint of a PeftModel would hold the frozen sources, not the weights).
        ctx.checkpoints = None
        ctx.resume_from = None
        torch.manual_seed(hp.seed)
        started(self.progress)
        args = training_args(ctx, hp, self.kernels, has_eval=ctx.eval_data is not None)
        self.tokenizer = load_tokenizer(ctx.model_dir, ctx.spec.chat_template)
        datasets = training_datasets(ctx, self.tokenizer, hp, self.progress)
        ctx.check_stop()

        self.names = source_names(len(ctx.sources))
        model = load_sources(self.load_base_model(), ctx.sources, self.names)
        refuse_dora(model, self.names, "fused")
        # Every source active at once; LoRA layers add up the active adapters' outputs.
        model.base_model.set_adapter(self.names, inference_mode=True)
        self.mixer = FusionMixer(model, self.names, per_layer=fusion.per_layer)
        # A submodule of the model, so the trainer's optimizer finds the weights (and moves them with it).
        model.fusion_mixer = self.mixer
        self.model = model
        self.trainable, self.total = model.get_nb_trainable_parameters()
        ctx.reporter.event(
            "model",
            f"{self.trainable:,} mixing weights over {len(self.names)} adapters "
            f"({'per module' if fusion.per_layer else 'one per adapter'}), starting at {1 / len(self.names):.4g}",
            data={"trainable_params": self.trainable, "total_params": self.total},
        )
        self.trainer = sft_trainer(ctx, model, self.tokenizer, datasets, args, self.progress)

    def fused_adapter(self) -> int:
        """Adds OUTPUT_ADAPTER, the fused model as one LoRA adapter; returns its rank."""
        assert self.model is not None and self.mixer is not None
        model, mixer = self.model, self.mixer
        layers = list(lora_layers(model, self.names))
        ranks = [
            max(layer.lora_A[n].weight.shape[0] for _, layer in layers if n in layer.lora_A)
            for n in self.names
        ]
        rank = sum(ranks)
        first = model.peft_config[self.names[0]]
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,  # scaling 1
            target_modules=sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
            lora_dropout=first.lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model.add_adapter(OUTPUT_ADAPTER, config)
        with torch.no_grad():
            # Zero everywhere first: the leaf names may also reach modules no source adapts (a source trained on
            # some layers only); those stay without effect.
            for _, layer in lora_layers(model, [OUTPUT_ADAPTER]):
                layer.lora_A[OUTPUT_ADAPTER].weight.zero_()
                layer.lora_B[OUTPUT_ADAPTER].weight.zero_()
            for row, (name, layer) in enumerate(layers):
                if OUTPUT_ADAPTER not in layer.lora_A:  # a module the leaf names do not reach
                    raise JobFailure(JobErrorCode.invalid_config, f"cannot place the fused adapter on {name}")
                new_a = layer.lora_A[OUTPUT_ADAPTER].weight
                new_b = layer.lora_B[OUTPUT_ADAPTER].weight
                out_scaling = layer.scaling[OUTPUT_ADAPTER]
                offset = 0
                for col, source in enumerate(self.names):
                    if source in layer.lora_A:
                        a, b = layer.lora_A[source].weight, layer.lora_B[source].weight
                        factor = mixer.weight_of(row, col) * layer.scaling[source] / out_scaling
                        new_a[offset : offset + a.shape[0]] = a.to(new_a.dtype)
                        new_b[:, offset : offset + a.shape[0]] = b.to(new_b.dtype) * factor
                    offset += ranks[col]
        return rank

    def save(self, output_dir: Path) -> TrainingResult:
        assert self.model is not None and self.trainer is not None and self.mixer is not None
        spec, model = self.ctx.spec, self.model
        model.eval()
        device = next(model.parameters()).device
        probe = probe_input(self.tokenizer, device)
        fused = probe_logits(model, probe)
        rank = self.fused_adapter()
        model.base_model.set_adapter(OUTPUT_ADAPTER, inference_mode=True)
        difference = float((probe_logits(model, probe) - fused).abs().max())
        dtype = model.get_base_model().dtype
        tolerance = REPRODUCTION_TOLERANCE.get(dtype, 2e-2) * max(1.0, float(fused.abs().max()))
        if difference > tolerance:
            self.ctx.reporter.event(
                "verification",
                f"the fused adapter reproduces the fused model only to {difference:.3g} (max logit "
                f"difference on a probe input; expected at most {tolerance:.3g} in {dtype})",
                level="warning",
                data={"max_logit_diff": difference, "tolerance": tolerance},
            )
        save_adapter(model, output_dir, spec.base_model)
        self.tokenizer.save_pretrained(output_dir)
        tokens = trained_tokens(self.trainer)
        metrics: dict[str, Any] = {
            **self.mixer.report(),
            "initial_weight": round(1.0 / len(self.names), 6),
            "rank": rank,
            "adapter_params": adapter_param_count(model, OUTPUT_ADAPTER),
            "reproduction_max_logit_diff": difference,
            **training_metrics(self.trainer, self.progress, self.ctx),
        }
        write_model_card(
            output_dir,
            job_id=self.ctx.job_id,
            spec=spec,
            trainable_params=self.trainable,
            total_params=self.total,
            trained_tokens=tokens,
            # Each module's weights get their own table below.
            metrics={k: v for k, v in metrics.items() if k != "fusion_weights_per_module"},
        )
        add_card_section(output_dir, "Fusion", self._card_lines(rank))
        return TrainingResult(
            output_dir=output_dir,
            trainable_params=self.trainable,
            total_params=self.total,
            trained_tokens=tokens,
            metrics=metrics,
            stopped=self.progress.stopped,
        )

    def _card_lines(self, rank: int) -> list[str]:
        assert self.mixer is not None
        lines = [
            f"The mixing weights started at {1 / len(self.names):.4g} each (the uniform average) and were "
            "learned on the dataset with the base model and the source adapters frozen. This adapter holds the "
            f"sources side by side (rank {rank}), each source's lora_B scaled by its learned weight.",
            "",
            "| module | " + " | ".join(f"source {i}" for i in range(len(self.names))) + " |",
            "|---|" + "---|" * len(self.names),
        ]
        for name, row in self.mixer.rows():
            cells = ["-" if w is None else f"{w:.6g}" for w in row]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return lines

    def cleanup(self) -> None:
        if self.mixer is not None:
            self.mixer.remove()
        self.mixer = None
        super().cleanup()
