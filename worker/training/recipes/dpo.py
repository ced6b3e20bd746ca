"""DPO: preference tuning of a LoRA adapter (DoRA and rsLoRA too, on a 4-bit base when the job gives
`quantization`) with trl's DPOTrainer. The reference model is the base with the adapter switched off, on the
same weights: no second copy of the model is loaded."""

from __future__ import annotations

import time

import torch

from shared.schemas import Method
from worker.training.adapters import load_tokenizer
from worker.training.lora_config import lora_config
from worker.training.recipes.lora import LoraRecipe
from worker.training.recipes.qlora import QLoraRecipe, keep_adapter_in_float32
from worker.training.trainer import dpo_trainer, dpo_training_args, started, training_datasets


class DpoRecipe(QLoraRecipe):
    """Trains on preference pairs: each step scores prompt + chosen and prompt + rejected under the policy (base
    with adapter) and the reference (adapter off), and minimises the job's preference loss (sigmoid: DPO's
    -log sigmoid(beta x (chosen log-ratio - rejected log-ratio))). Saves the adapter as LoraRecipe does."""

    method = Method.dpo

    def load_base_model(self) -> torch.nn.Module:
        if not self.ctx.spec.quantized:
            return LoraRecipe.load_base_model(self)
        return super().load_base_model()

    def prepare_base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.ctx.spec.quantized:
            return model
        return super().prepare_base_model(model)

    def setup(self) -> None:
        spec, ctx = self.ctx.spec, self.ctx
        hp, adapter = spec.hyperparameters, spec.adapter
        assert hp is not None and adapter is not None and ctx.train_data is not None
        started(self.progress)
        args = dpo_training_args(ctx, hp, self.kernels, has_eval=ctx.eval_data is not None)
        self.tokenizer = load_tokenizer(ctx.model_dir)
        datasets = training_datasets(ctx, self.tokenizer, hp, self.progress)
        ctx.check_stop()

        loading = time.perf_counter()
        base = self.prepare_base_model(self.load_base_model())
        # trl seeds (hp.seed) before wrapping the base in the adapter, as LoraRecipe does.
        self.trainer = dpo_trainer(
            ctx, base, lora_config(spec, base), self.tokenizer, datasets, args, self.progress
        )
        self.model = self.trainer.model
        if spec.quantized:
            keep_adapter_in_float32(self.model)
        trainable, total = self.model.get_nb_trainable_parameters()
        self.progress.add_time("load", time.perf_counter() - loading)
        ctx.reporter.event(
            "model",
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%); the reference "
            "is the base model with the adapter switched off",
            data={"trainable_params": trainable, "total_params": total},
        )
