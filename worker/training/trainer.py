"""The trainer setup every training recipe shares: the training dtype, trl's SFTConfig from the job's
hyperparameters (with DeepSpeed or data parallelism for multi-GPU jobs), the encoded datasets, the
SFTTrainer with the progress callback that reports each logged step and hands each saved checkpoint to the
job's checkpoint sink, and the metrics of a finished run."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from shared.errors import JobErrorCode, JobFailure
from shared.schemas import Hyperparameters
from worker.training import distributed
from worker.training.data import encode_dataset
from worker.training.recipes.base import TrainingContext


def training_dtype() -> torch.dtype:
    """bfloat16 on GPUs that have it, float32 otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


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


@dataclass
class TrainingProgress:
    """What the trainer reported so far: the logged training losses, the last eval loss, whether training
    stopped early on request, and how long the training loop ran."""

    losses: list[float] = field(default_factory=list)
    last_eval_loss: float | None = None
    stopped: bool = False
    runtime: float = 0.0


def training_datasets(
    ctx: TrainingContext, tokenizer: Any, hp: Hyperparameters
) -> tuple[Dataset, Dataset | None]:
    """Encodes the job's dataset (and validation dataset), reporting what it found."""
    assert ctx.train_data is not None
    train = encode_dataset(ctx.train_data.records, ctx.train_data.format, tokenizer, hp.seq_length)
    ctx.reporter.event(
        "dataset",
        f"{len(train.samples)} training samples, {train.total_tokens} tokens, "
        f"{train.truncated} longer than max_seq_length {hp.seq_length}",
        data={"samples": len(train.samples), "tokens": train.total_tokens, "truncated": train.truncated},
    )
    columns = train.columns(hp.seq_length)
    if not columns["input_ids"]:
        raise JobFailure(
            JobErrorCode.invalid_dataset,
            f"no sample has a token to learn within max_seq_length {hp.seq_length}; raise it",
        )
    eval_dataset = None
    if ctx.eval_data is not None:
        encoded = encode_dataset(ctx.eval_data.records, ctx.eval_data.format, tokenizer, hp.seq_length)
        eval_dataset = Dataset.from_dict(encoded.columns(hp.seq_length))
    return Dataset.from_dict(columns), eval_dataset


def training_args(ctx: TrainingContext, hp: Hyperparameters, *, has_eval: bool) -> SFTConfig:
    """trl's SFTConfig for a job: its hyperparameters, checkpoints when the job keeps them, and DeepSpeed or
    data parallelism for multi-GPU jobs. Build it before loading the model: under ZeRO-3 the model is
    partitioned while it loads."""
    args = SFTConfig(
        output_dir=str(ctx.work_dir / "trainer"),
        num_train_epochs=hp.epochs or 1,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        logging_steps=hp.logging_steps,
        eval_strategy=("steps" if hp.eval_steps else "epoch") if has_eval else "no",
        eval_steps=hp.eval_steps,
        save_strategy="steps" if ctx.checkpoints is not None else "no",
        save_steps=hp.checkpoint_steps or ctx.checkpoint_steps or 100,
        # The local copy is only a staging area: stored checkpoints are in object storage.
        save_total_limit=1,
        report_to="none",
        seed=hp.seed,
        data_seed=hp.seed,
        max_length=hp.seq_length,
        packing=hp.packing,
        gradient_checkpointing=bool(hp.gradient_checkpointing),
        bf16=training_dtype() is torch.bfloat16,
        use_cpu=distributed.on_cpu(),
        ddp_backend=distributed.ddp_backend(),
        deepspeed=distributed.deepspeed_config(ctx.spec),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    distributed.init_process_group(ctx.spec)
    return args


class ProgressCallback(TrainerCallback):
    """Sends each logged step to the job's reporter, hands each saved checkpoint to its checkpoint sink, and
    stops training (after a checkpoint) when the job must stop."""

    def __init__(self, ctx: TrainingContext, progress: TrainingProgress) -> None:
        self.ctx = ctx
        self.progress = progress
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_time = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Asked to stop (a warm shutdown): save a checkpoint at this step, then stop. Every rank must agree on
        # the step, or the collectives of the next one would wait forever.
        if distributed.agreed(self.ctx.should_stop()):
            self.progress.stopped = True
            control.should_training_stop = True
            control.should_save = self.ctx.checkpoints is not None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sink = self.ctx.checkpoints
        # The trainer also saves at the last step; the finished job's adapter is stored anyway.
        if sink is None or (state.global_step >= state.max_steps and not self.progress.stopped):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Every rank has written its part of the checkpoint before rank 0 uploads the folder.
        distributed.barrier()
        if state.is_world_process_zero:
            losses = self.progress.losses
            sink.save(state.global_step, folder, {"train_loss": losses[-1] if losses else None})
        distributed.barrier()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero:  # the logged values are already averaged over every rank
            return
        logs = logs or {}
        step = int(state.global_step)
        if "eval_loss" in logs:
            self.ctx.reporter.metric("eval", step, {"loss": logs["eval_loss"], "epoch": logs.get("epoch")})
            self.progress.last_eval_loss = logs["eval_loss"]
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
        self.progress.losses.append(loss)
        self.ctx.reporter.metric(
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


def sft_trainer(
    ctx: TrainingContext,
    model: torch.nn.Module,
    tokenizer: Any,
    datasets: tuple[Dataset, Dataset | None],
    args: SFTConfig,
    progress: TrainingProgress,
) -> SFTTrainer:
    """trl's SFTTrainer reporting through a ProgressCallback into `progress`."""
    train_dataset, eval_dataset = datasets
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(ctx, progress)],
    )
    # Progress goes to the database; the trainer's own printing would only flood the worker log.
    trainer.remove_callback(PrinterCallback)
    return trainer


def train(ctx: TrainingContext, trainer: SFTTrainer, progress: TrainingProgress) -> None:
    """Runs the training loop, resuming from the job's checkpoint when there is one."""
    resume = str(ctx.resume_from) if ctx.resume_from else None
    if ctx.resume_from is not None:
        ctx.reporter.event("resume", f"resuming from {ctx.resume_from.name}")
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError as exc:
        raise JobFailure(
            JobErrorCode.out_of_memory,
            "out of GPU memory; lower batch_size or max_seq_length, or raise gradient_accumulation_steps",
        ) from exc
    progress.runtime = time.perf_counter() - started


def trained_tokens(trainer: SFTTrainer) -> int:
    """Tokens of every rank together (the trainer gathers the count)."""
    return int(getattr(trainer, "_total_train_tokens", 0) or 0)


def training_metrics(trainer: SFTTrainer, progress: TrainingProgress) -> dict[str, Any]:
    """The metrics of a finished run, as the job's result shows them."""
    state = trainer.state
    tokens = trained_tokens(trainer)
    runtime = progress.runtime
    return {
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0), 4),
        "first_train_loss": progress.losses[0] if progress.losses else None,
        "final_train_loss": progress.losses[-1] if progress.losses else None,
        "eval_loss": progress.last_eval_loss,
        "train_runtime_seconds": round(runtime, 3),
        "seconds_per_step": round(runtime / state.global_step, 4) if state.global_step else None,
        "tokens_per_second": round(tokens / runtime, 1) if tokens and runtime else None,
        **peak_memory(),
    }
