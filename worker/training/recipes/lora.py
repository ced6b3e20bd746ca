"""LoRA: low-rank adapters on the chosen linear layers, trained with trl's SFTTrainer."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTTrainer

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import JobSpec, Method
from worker.training import distributed
from worker.training.adapters import (
    load_tokenizer,
    name_base_model,
    sft_trainer,
    training_args,
    training_datasets,
)
from worker.training.model_card import write_model_card
from worker.training.recipes.base import Recipe, TrainingContext, TrainingResult

ATTENTION_HINTS = ("attn", "attention")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Returns the full names of the model's linear layers, the output head excluded."""
    output_head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_head
    ]


def resolve_target_modules(model: torch.nn.Module, target: str | list[str]) -> str | list[str]:
    """Turns a preset or an explicit list into what peft takes, refusing names the model lacks."""
    if target == "all-linear":
        return "all-linear"
    linear = linear_module_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if target == "attention":
        found = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name in linear
                if any(hint in name.rsplit(".", 1)[0].lower() for hint in ATTENTION_HINTS)
            }
        )
        if not found:
            raise JobFailure(
                JobErrorCode.invalid_config,
                f"found no attention projections in this model; name target_modules from: {leaves}",
            )
        return found
    missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise JobFailure(
            JobErrorCode.invalid_config,
            f"target_modules {missing} are not linear layers of this model; choose from {leaves}",
        )
    return list(target)


def agreed(flag: bool) -> bool:
    """True on every rank if it is true on any (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def lora_config(spec: JobSpec, model: torch.nn.Module) -> LoraConfig:
    """peft's LoraConfig for the job on this model: rank, scaling, dropout, resolved target modules and the
    DoRA / rsLoRA variants. The planner builds the same one on the meta device to count parameters."""
    adapter = spec.adapter
    assert adapter is not None
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=resolve_target_modules(model, adapter.target_modules),
        task_type="CAUSAL_LM",
        use_dora=bool(adapter.use_dora),
        use_rslora=bool(adapter.use_rslora),
    )


def peak_memory() -> dict[str, int]:
    """This process's peak memory so far: the GPU's (allocated by torch) where there is one, and the host's
    resident set. Compared with the plan's estimate in the job's result and events."""
    peaks = {"peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        # Tensors at their peak, and what the caching allocator held (the plan's estimate also counts the
        # CUDA context, which neither figure sees).
        peaks["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        peaks["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return peaks


def training_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class ProgressCallback(TrainerCallback):
    """Sends each logged step to the reporter and stops training when the job must stop."""

    def __init__(self, recipe: LoraRecipe) -> None:
        self.recipe = recipe
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_time = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Asked to stop (a warm shutdown): save a checkpoint at this step, then stop. Every rank must
        # agree on the step, or the collectives of the next one would wait forever.
        if agreed(self.recipe.ctx.should_stop()):
            self.recipe.stopped = True
            control.should_training_stop = True
            control.should_save = self.recipe.ctx.checkpoints is not None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sink = self.recipe.ctx.checkpoints
        # The trainer also saves at the last step; the finished job's adapter is stored anyway.
        if sink is None or (state.global_step >= state.max_steps and not self.recipe.stopped):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Every rank has written its part of the checkpoint before rank 0 uploads the folder.
        barrier()
        if state.is_world_process_zero:
            losses = self.recipe.losses
            sink.save(state.global_step, folder, {"train_loss": losses[-1] if losses else None})
        barrier()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero:  # the logged values are already averaged over every rank
            return
        logs = logs or {}
        step = int(state.global_step)
        if "eval_loss" in logs:
            self.recipe.ctx.reporter.metric(
                "eval", step, {"loss": logs["eval_loss"], "epoch": logs.get("epoch")}
            )
            self.recipe.last_eval_loss = logs["eval_loss"]
            return
        if "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise JobFailure(
                JobErrorCode.training_diverged,
                f"the training loss became {loss} at step {step}; lower the learning rate",
            )
        now = time.perf_counter()
        tokens = int(logs.get("num_tokens", 0))
        elapsed = now - (self.last_time or now)
        rate = (tokens - self.last_tokens) / elapsed if elapsed > 0 and tokens else None
        self.last_time, self.last_tokens = now, tokens
        self.recipe.losses.append(loss)
        self.recipe.ctx.reporter.metric(
            "train",
            step,
            {
                "loss": loss,
                "epoch": logs.get("epoch"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": rate,
                "num_tokens": tokens or None,
            },
        )


class LoraRecipe(Recipe):
    method = Method.lora

    def __init__(self, ctx: TrainingContext) -> None:
        super().__init__(ctx)
        self.stopped = False
        self.losses: list[float] = []
        self.last_eval_loss: float | None = None
        self.trainer: SFTTrainer | None = None
        self.model: PeftModel | None = None
        self.tokenizer: Any = None
        self.started = 0.0
        self.runtime = 0.0

    def load_base_model(self) -> torch.nn.Module:
        """Loads the frozen base model the adapter trains on."""
        return AutoModelForCausalLM.from_pretrained(self.ctx.model_dir, dtype=training_dtype())

    def prepare_base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Readies the base model for adapter training (a hook for quantized variants)."""
        return model

    def setup(self) -> None:
        spec, ctx = self.ctx.spec, self.ctx
        hp, adapter = spec.hyperparameters, spec.adapter
        assert hp is not None and adapter is not None and ctx.train_data is not None
        args = training_args(self, hp, has_eval=ctx.eval_data is not None)
        self.tokenizer = load_tokenizer(ctx.model_dir)
        train_dataset, eval_dataset = training_datasets(ctx, self.tokenizer, hp)
        ctx.check_stop()

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
        trainable, total = self.model.get_nb_trainable_parameters()
        ctx.reporter.event(
            "model",
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)",
            data={"trainable_params": trainable, "total_params": total},
        )
        self.trainer = sft_trainer(self, self.model, train_dataset, eval_dataset, args)

    def train(self) -> None:
        assert self.trainer is not None
        self.started = time.perf_counter()
        resume = str(self.ctx.resume_from) if self.ctx.resume_from else None
        if resume:
            self.ctx.reporter.event("resume", f"resuming from {self.ctx.resume_from.name}")
        try:
            self.trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError as exc:
            raise JobFailure(
                JobErrorCode.out_of_memory,
                "out of GPU memory; lower batch_size or max_seq_length, or raise gradient_accumulation_steps",
            ) from exc
        self.runtime = time.perf_counter() - self.started

    def save(self, output_dir: Path) -> TrainingResult:
        assert self.model is not None and self.trainer is not None
        spec = self.ctx.spec
        output_dir.mkdir(parents=True, exist_ok=True)
        trainable, total = self.model.get_nb_trainable_parameters()
        if distributed.world_size() > 1:
            # Every rank takes part: under ZeRO-3 saving gathers the sharded adapter weights.
            self.trainer.save_model(str(output_dir))
            (output_dir / "training_args.bin").unlink(missing_ok=True)
            barrier()
            if not distributed.is_main_process():
                return TrainingResult(output_dir, trainable, total, 0, {}, stopped=self.stopped)
        else:
            self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        name_base_model(output_dir, spec.base_model)
        state = self.trainer.state
        trained_tokens = int(getattr(self.trainer, "_total_train_tokens", 0) or 0)
        metrics: dict[str, Any] = {
            "steps": int(state.global_step),
            "epochs": round(float(state.epoch or 0), 4),
            "first_train_loss": self.losses[0] if self.losses else None,
            "final_train_loss": self.losses[-1] if self.losses else None,
            "eval_loss": self.last_eval_loss,
            "train_runtime_seconds": round(self.runtime, 3),
            "seconds_per_step": round(self.runtime / state.global_step, 4) if state.global_step else None,
            # Tokens of every rank together (the trainer gathers the count), per second of training.
            "tokens_per_second": round(trained_tokens / self.runtime, 1)
            if trained_tokens and self.runtime
            else None,
            **peak_memory(),
        }
        write_model_card(
            output_dir,
            job_id=self.ctx.job_id,
            spec=spec,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=trained_tokens,
            metrics=metrics,
        )
        return TrainingResult(
            output_dir=output_dir,
            trainable_params=trainable,
            total_params=total,
            trained_tokens=trained_tokens,
            metrics=metrics,
            stopped=self.stopped,
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
