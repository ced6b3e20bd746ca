"""LoRA: low-rank adapters on the chosen linear layers, trained with trl's SFTTrainer (DoRA and rsLoRA are the
same recipe with peft's use_dora / use_rslora)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from shared.schemas import Method
from worker.training import distributed
from worker.training.adapters import load_initial_adapter, load_tokenizer, name_base_model
from worker.training.evaluation import Evaluation, evaluate_adapter
from worker.training.lora_config import lora_config
from worker.training.model_card import write_model_card
from worker.training.recipes.base import Recipe, TrainingContext, TrainingResult
from worker.training.trainer import (
    Kernels,
    TrainingProgress,
    sft_trainer,
    started,
    train,
    trained_tokens,
    training_args,
    training_datasets,
    training_dtype,
    training_kernels,
    training_metrics,
)


class LoraRecipe(Recipe):
    method = Method.lora

    def __init__(self, ctx: TrainingContext) -> None:
        super().__init__(ctx)
        self.progress = TrainingProgress()
        self.trainer: SFTTrainer | None = None
        self.model: PeftModel | None = None
        self.tokenizer: Any = None
        self.evaluation = Evaluation({}, None)

    @property
    def kernels(self) -> Kernels:
        """How this job trains on this device (resolved once, in setup)."""
        if self.progress.kernels is None:
            hp = self.ctx.spec.hyperparameters
            assert hp is not None
            self.progress.kernels = training_kernels(self.ctx, hp)
        return self.progress.kernels

    def load_base_model(self) -> torch.nn.Module:
        """Loads the frozen base model the adapter trains on."""
        kernels = self.kernels
        return AutoModelForCausalLM.from_pretrained(
            self.ctx.model_dir, dtype=training_dtype(kernels), attn_implementation=kernels.attn_implementation
        )

    def prepare_base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Readies the base model for adapter training (a hook for quantized variants)."""
        return model

    def setup(self) -> None:
        spec, ctx = self.ctx.spec, self.ctx
        hp, adapter = spec.hyperparameters, spec.adapter
        assert hp is not None and adapter is not None and ctx.train_data is not None
        started(self.progress)
        args = training_args(ctx, hp, self.kernels, has_eval=ctx.eval_data is not None)
        self.tokenizer = load_tokenizer(ctx.model_dir, spec.chat_template)
        datasets = training_datasets(ctx, self.tokenizer, hp, self.progress)
        ctx.check_stop()

        loading = time.perf_counter()
        base = self.load_base_model()
        # Seeded after loading (which draws random numbers differently under ZeRO-3), so every topology
        # starts from the same adapter initialisation.
        torch.manual_seed(hp.seed)
        self.model = get_peft_model(
            self.prepare_base_model(base),
            lora_config(spec, base),
            # Under ZeRO-3 every parameter of one group must share a dtype: keep the adapter in the base's.
            autocast_adapter_dtype=spec.resources.zero_stage != 3,
        )
        init = spec.init_from
        if init is not None and ctx.init_from is not None and ctx.resume_from is None:
            # Resumed attempts take the adapter from their own checkpoint instead.
            source = f"job {init.job}" + (
                f" at step {init.checkpoint_step}" if init.checkpoint_step else " (its final adapter)"
            )
            load_initial_adapter(self.model, ctx.init_from, source)
            ctx.reporter.event(
                "init_from", f"the adapter starts from {source}", data=init.model_dump(mode="json")
            )
        trainable, total = self.model.get_nb_trainable_parameters()
        self.progress.add_time("load", time.perf_counter() - loading)
        ctx.reporter.event(
            "model",
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)",
            data={"trainable_params": trainable, "total_params": total},
        )
        self.trainer = sft_trainer(ctx, self.model, self.tokenizer, datasets, args, self.progress)

    def train(self) -> None:
        assert self.trainer is not None
        train(self.ctx, self.trainer, self.progress)
        if not self.progress.stopped:
            # The base model's and the adapter's answers, and the validation perplexity before and after.
            evaluating = time.perf_counter()
            self.evaluation = evaluate_adapter(
                self.ctx, self.model, self.tokenizer, self.trainer, self.trainer.eval_dataset
            )
            self.progress.add_time("evaluate", time.perf_counter() - evaluating)

    def save(self, output_dir: Path) -> TrainingResult:
        assert self.model is not None and self.trainer is not None
        spec = self.ctx.spec
        output_dir.mkdir(parents=True, exist_ok=True)
        trainable, total = self.model.get_nb_trainable_parameters()
        # DeepSpeed's bf16 mode casts the module's weights to bfloat16 (the Trainer would save those): save the
        # float32 masters the optimizer stepped, as a single process saves its float32 weights. Every rank takes
        # part, under ZeRO the weights are gathered from their partitions.
        masters = None
        if self.trainer.is_deepspeed_enabled:
            masters = distributed.float32_trainable_weights(self.model)
        if masters is not None or distributed.world_size() > 1:
            if masters is None:
                self.trainer.save_model(str(output_dir))
                (output_dir / "training_args.bin").unlink(missing_ok=True)
            elif distributed.is_main_process():
                self.model.save_pretrained(output_dir, state_dict=masters)
            distributed.barrier()
            if not distributed.is_main_process():
                return TrainingResult(output_dir, trainable, total, 0, {}, stopped=self.progress.stopped)
        else:
            saving = time.perf_counter()
            self.model.save_pretrained(output_dir)
            self.progress.add_time("save", time.perf_counter() - saving)
        self.tokenizer.save_pretrained(output_dir)
        name_base_model(output_dir, spec.base_model)
        tokens = trained_tokens(self.trainer)
        metrics = training_metrics(self.trainer, self.progress, self.ctx) | self.evaluation.metrics
        write_model_card(
            output_dir,
            job_id=self.ctx.job_id,
            spec=spec,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=tokens,
            metrics=metrics,
        )
        return TrainingResult(
            output_dir=output_dir,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=tokens,
            metrics=metrics,
            stopped=self.progress.stopped,
            extras={"evaluation": self.evaluation.folder} if self.evaluation.folder else {},
        )

    def cleanup(self) -> None:
        self.trainer = None
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class DoraRecipe(LoraRecipe):
    """DoRA: LoRA on the direction of each weight plus a trained magnitude vector (use_dora)."""

    method = Method.dora


class RsLoraRecipe(LoraRecipe):
    """rsLoRA: LoRA scaled by alpha/sqrt(r) instead of alpha/r, which keeps high ranks learning (use_rslora)."""

    method = Method.rslora
