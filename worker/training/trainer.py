"""The trainer setup every training recipe shares: how the job trains on this device (precision, attention
kernel, fused optimizer, Liger, torch.compile), trl's SFTConfig from the job's hyperparameters (with DeepSpeed
or data parallelism for multi-GPU jobs), the tokenized datasets (cached on the worker), padding-free batches
where they pay, the SFTTrainer with the progress callback that reports each logged step and hands each saved
checkpoint to the job's checkpoint sink, and the metrics of a finished run (tokens/s, model FLOPs utilization
and where the time went)."""

from __future__ import annotations

import importlib.util
import logging
import math
import resource
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from shared.errors import JobErrorCode, JobFailure
from shared.planning import PADDING_FREE_MODEL_TYPES
from shared.schemas import Hyperparameters
from worker.training import distributed
from worker.training.attention import SDPA_PER_SAMPLE
from worker.training.efficiency import (
    BatchCounter,
    ModelFlops,
    cpu_bf16_pays,
    device_peak,
    padding_free_pays,
    process_age,
)
from worker.training.recipes.base import TrainingContext
from worker.training.tokenized import TokenizedDataset, cached_tokenize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """How a job trains on this device: its options resolved against the hardware and what is installed."""

    bf16: bool  # bfloat16 autocast (and bfloat16 base weights on a GPU)
    attn_implementation: str  # sdpa, flash_attention_2 or eager
    fused_adamw: bool
    liger_kernel: bool
    torch_compile: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def training_kernels(ctx: TrainingContext, hp: Hyperparameters) -> Kernels:
    """The job's precision, attention kernel and fast paths on this device: what it asked for, checked against
    the hardware (a JobFailure naming the option when it cannot run here), and safe defaults for the rest:
    bf16 on GPUs that have it (on CPUs with native bf16 that the deployment offers bf16 on, where it measured
    faster), FlashAttention-2 where
    installed on a GPU, SDPA otherwise."""
    on_gpu = torch.cuda.is_available()
    gpu_bf16 = on_gpu and torch.cuda.is_bf16_supported()
    if hp.bf16 and on_gpu and not gpu_bf16:
        raise JobFailure(JobErrorCode.invalid_config, "bf16: this worker's GPU has no bfloat16; remove bf16")
    # On a CPU only where the deployment offers bf16: the speed-up is measured on a machine that may be busy, and a
    # default that follows a measurement would change a job's numbers from one run to the next.
    default_bf16 = (
        gpu_bf16 if on_gpu else hp.bf16 is None and ctx.bf16_offered and cpu_bf16_pays(ctx.cache_dir)
    )
    bf16 = hp.bf16 if hp.bf16 is not None else default_bf16
    attn = hp.attn_implementation
    flash = on_gpu and bf16 and _installed("flash_attn")
    if attn == "flash_attention_2" and not flash:
        raise JobFailure(
            JobErrorCode.invalid_config,
            "attn_implementation: flash_attention_2 needs a GPU with flash-attn installed and bf16; choose sdpa",
        )
    if hp.liger_kernel and not (on_gpu and _installed("liger_kernel")):
        raise JobFailure(
            JobErrorCode.invalid_config,
            "liger_kernel: Liger's Triton kernels need a GPU worker with the liger extra installed",
        )
    return Kernels(
        bf16=bf16,
        attn_implementation=attn or ("flash_attention_2" if flash else "sdpa"),
        fused_adamw=hp.fused_adamw is not False,
        liger_kernel=hp.liger_kernel,
        torch_compile=hp.torch_compile,
    )


def training_dtype(kernels: Kernels) -> torch.dtype:
    """The dtype of the frozen base weights: bfloat16 on a GPU training in bf16, float32 otherwise (CPU
    autocast casts each matmul's inputs instead)."""
    if kernels.bf16 and torch.cuda.is_available():
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
    # Preference tuning (trl's DPO logs): the last logged reward margin (chosen over rejected) and the share
    # of pairs whose chosen answer the adapter rewards more, on the training batches and on the eval set.
    rewards: dict[str, float] = field(default_factory=dict)
    stopped: bool = False
    runtime: float = 0.0
    # Where the time went, by phase (tokenize, load, train, checkpoint, save), in seconds.
    timings: dict[str, float] = field(default_factory=dict)
    # What the trainer fed the model, for the FLOPs (None until the trainer exists).
    batches: BatchCounter | None = None
    flops: ModelFlops | None = None
    kernels: Kernels | None = None
    padding_free: bool = False

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


@dataclass
class TrainingData:
    """The job's datasets as the trainer takes them, with the length of each training sample it keeps."""

    train: Dataset
    eval: Dataset | None
    lengths: list[int]


def _tokenized(
    ctx: TrainingContext, tokenizer: Any, hp: Hyperparameters, param: str, data: Any
) -> TokenizedDataset:
    return cached_tokenize(
        data.records,
        data.format,
        tokenizer,
        hp.seq_length,
        packing=hp.packing,
        cache_dir=ctx.cache_dir,
        dataset_sha256=ctx.dataset_sha256.get(param),
    )


def training_datasets(
    ctx: TrainingContext, tokenizer: Any, hp: Hyperparameters, progress: TrainingProgress
) -> TrainingData:
    """Tokenizes the job's dataset (and validation dataset), or reads them from the worker's cache, reporting
    what it found."""
    assert ctx.train_data is not None
    started = time.perf_counter()
    train = _tokenized(ctx, tokenizer, hp, "dataset", ctx.train_data)
    evaluation = None
    if ctx.eval_data is not None:
        evaluation = _tokenized(ctx, tokenizer, hp, "validation_dataset", ctx.eval_data).dataset
    seconds = time.perf_counter() - started
    progress.add_time("tokenize", seconds)
    ctx.reporter.event(
        "dataset",
        f"{train.samples} training samples, {train.tokens} tokens, "
        f"{train.truncated} longer than max_seq_length {hp.seq_length}"
        + (" (tokenized earlier, read from the cache)" if train.cached else ""),
        data={
            "samples": train.samples,
            "tokens": train.tokens,
            "truncated": train.truncated,
            "cached": train.cached,
            "seconds": round(seconds, 3),
        },
    )
    if not train.lengths:
        raise JobFailure(
            JobErrorCode.invalid_dataset,
            f"no sample has a token to learn within max_seq_length {hp.seq_length}; raise it",
        )
    return TrainingData(train.dataset, evaluation, train.lengths)


def _trainer_arguments(
    ctx: TrainingContext, hp: Hyperparameters, kernels: Kernels, *, has_eval: bool
) -> dict[str, Any]:
    """The transformers TrainingArguments every recipe shares: the job's hyperparameters and kernels,
    checkpoints when the job keeps them, and DeepSpeed or data parallelism for multi-GPU jobs."""
    distributed.skip_cpu_shm_op(ctx.spec)
    return {
        "output_dir": str(ctx.work_dir / "trainer"),
        "num_train_epochs": hp.epochs or 1,
        "max_steps": hp.max_steps or -1,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler,
        "warmup_steps": hp.warmup_ratio,
        "weight_decay": hp.weight_decay,
        "logging_steps": hp.logging_steps,
        "eval_strategy": ("steps" if hp.eval_steps else "epoch") if has_eval else "no",
        "eval_steps": hp.eval_steps,
        "save_strategy": "steps" if ctx.checkpoints is not None else "no",
        "save_steps": hp.checkpoint_steps or ctx.checkpoint_steps or 100,
        # The local copy is only a staging area: stored checkpoints are in object storage.
        "save_total_limit": 1,
        "report_to": "none",
        "seed": hp.seed,
        "data_seed": hp.seed,
        "max_length": hp.seq_length,
        "gradient_checkpointing": bool(hp.gradient_checkpointing),
        "bf16": kernels.bf16,
        "optim": "adamw_torch_fused" if kernels.fused_adamw else "adamw_torch",
        "use_liger_kernel": kernels.liger_kernel,
        "torch_compile": kernels.torch_compile,
        "use_cpu": distributed.on_cpu(),
        "ddp_backend": distributed.ddp_backend(),
        "deepspeed": distributed.deepspeed_config(ctx.spec),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def training_args(
    ctx: TrainingContext, hp: Hyperparameters, kernels: Kernels, *, has_eval: bool
) -> SFTConfig:
    """trl's SFTConfig for a job: its hyperparameters and kernels, checkpoints when the job keeps them, and
    DeepSpeed or data parallelism for multi-GPU jobs. Build it before loading the model: under ZeRO-3 the model
    is partitioned while it loads. The datasets come tokenized, cut and packed (training_datasets)."""
    args = SFTConfig(
        **_trainer_arguments(ctx, hp, kernels, has_eval=has_eval),
        packing=hp.packing,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    distributed.init_process_group(ctx.spec)
    return args


def dpo_training_args(
    ctx: TrainingContext, hp: Hyperparameters, kernels: Kernels, *, has_eval: bool
) -> DPOConfig:
    """trl's DPOConfig for a dpo job: what training_args sets, with the job's beta and loss. Dropout stays as
    the adapter asks (trl would switch it off everywhere): it acts on the adapter's branch only, which the
    reference pass switches off. Build it before loading the model, as training_args."""
    dpo = ctx.spec.dpo
    assert dpo is not None
    args = DPOConfig(
        **_trainer_arguments(ctx, hp, kernels, has_eval=has_eval),
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing or 0.0,
        disable_dropout=False,
    )
    distributed.init_process_group(ctx.spec)
    return args


class ProgressCallback(TrainerCallback):
    """Sends each logged step to the job's reporter, hands each saved checkpoint to its checkpoint sink, and
    stops training (after a checkpoint) when the job must stop. Keeps the time checkpoints take on the step
    path and leaves evaluation batches out of the training FLOPs."""

    def __init__(self, ctx: TrainingContext, progress: TrainingProgress) -> None:
        self.ctx = ctx
        self.progress = progress
        self.last_time: float | None = None
        self.last_tokens = 0
        # When the trainer last finished something on the step path (a step, a log, an evaluation).
        self.mark = time.perf_counter()
        self.counted_at_step_end = (0, 0)
        self.last_train: tuple[int, float] | None = None  # the last logged step and its training loss

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_time = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = time.perf_counter()
        batches = self.progress.batches
        if batches is not None:
            self.counted_at_step_end = (batches.tokens, batches.squares)
        # Asked to stop (a warm shutdown): save a checkpoint at this step, then stop. Every rank must agree on
        # the step, or the collectives of the next one would wait forever.
        if distributed.agreed(self.ctx.should_stop()):
            self.progress.stopped = True
            control.should_training_stop = True
            control.should_save = self.ctx.checkpoints is not None
        elif state.global_step >= state.max_steps:
            # The trainer would also save a resumable checkpoint at the last step: nothing resumes from it (the
            # finished adapter is saved and stored anyway), so that time stays off the step path.
            control.should_save = False

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The batches collated since the step ended were the evaluation's.
        batches = self.progress.batches
        if batches is not None:
            batches.tokens, batches.squares = self.counted_at_step_end
        self.mark = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sink = self.ctx.checkpoints
        # The trainer also saves at the last step; the finished job's adapter is stored anyway.
        if sink is None or (state.global_step >= state.max_steps and not self.progress.stopped):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Every rank has written its part of the checkpoint before rank 0 hands the folder over.
        distributed.barrier()
        parts, unique = [], None
        if not distributed.ranks_share_disk():
            # Ranks on other nodes (a Ray job) wrote their shards to their own disks: each stores its own
            # files under this save's prefix, and rank 0 records them with its folder.
            unique = distributed.broadcast(f"attempt-{sink.writer.attempt}-{secrets.token_hex(4)}")
            mine = [] if state.is_world_process_zero else sink.upload_part(state.global_step, folder, unique)
            parts = [part for rank_parts in distributed.gather(mine) for part in rank_parts]
        if state.is_world_process_zero:
            losses = self.progress.losses
            # Stored and recorded by the sink's own thread while the next steps run.
            sink.save(
                state.global_step, folder, {"train_loss": losses[-1] if losses else None}, parts, unique
            )
        distributed.barrier()
        now = time.perf_counter()
        self.progress.add_time("checkpoint", now - self.mark)
        self.mark = now

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        self.mark = time.perf_counter()
        if not state.is_world_process_zero:  # the logged values are already averaged over every rank
            return
        logs = logs or {}
        step = int(state.global_step)
        if "eval_loss" in logs:
            self.ctx.reporter.metric("eval", step, {"loss": logs["eval_loss"], "epoch": logs.get("epoch")})
            self.progress.last_eval_loss = logs["eval_loss"]
            train_loss = self.last_train[1] if self.last_train and self.last_train[0] == step else None
            self._metrics_event(step, state.max_steps, train_loss, float(logs["eval_loss"]))
            log.info("step %d/%d: eval loss %.4f", step, state.max_steps, logs["eval_loss"])
            if self._keep_rewards(logs, "eval_"):
                rewards = self.progress.rewards
                margin, accuracy = rewards["eval_reward_margin"], rewards.get("eval_reward_accuracy")
                self.ctx.reporter.event(
                    "rewards",
                    f"step {step}: on the validation pairs the chosen answers are rewarded {margin:+.4f} over the "
                    "rejected ones"
                    + (f", and preferred in {accuracy:.0%} of pairs" if accuracy is not None else ""),
                    data={"step": step, "reward_margin": margin, "reward_accuracy": accuracy},
                )
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
        log.info(
            "step %d/%d: loss %.4f, learning rate %.3g%s",
            step,
            state.max_steps,
            loss,
            logs.get("learning_rate") or 0.0,
            f", {rate:,.0f} tokens/s" if rate else "",
        )
        self._keep_rewards(logs, "")
        # Queued: the attempt's writer stores it in the background.
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
        self.last_train = (step, loss)
        # A step that evaluates next gets one metrics event, with both losses, once the eval loss is known.
        eval_steps = args.eval_steps if args.eval_strategy == "steps" else None
        if not (self.ctx.eval_data is not None and eval_steps and step % eval_steps == 0):
            self._metrics_event(step, state.max_steps, loss, None)

    def _metrics_event(
        self, step: int, total: int, train_loss: float | None, valid_loss: float | None
    ) -> None:
        """An event of type `metrics` (OpenAI's fine-tuning events carry the losses so; tools plot them)."""
        parts = [f"training loss={train_loss:.4f}"] if train_loss is not None else []
        parts += [f"validation loss={valid_loss:.4f}"] if valid_loss is not None else []
        data: dict[str, Any] = {"step": step, "total_steps": total, "train_loss": train_loss}
        if valid_loss is not None:
            data["valid_loss"] = valid_loss
        self.ctx.reporter.event("metrics", f"Step {step}/{total}: {', '.join(parts)}", data=data)

    def _keep_rewards(self, logs: dict[str, float], prefix: str) -> bool:
        """Keeps the reward margin and accuracy trl's DPOTrainer logged (under `prefix`); False when it logged
        none (any other trainer)."""
        found = False
        for name, key in (("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
            value = logs.get(prefix + key)
            if value is not None and math.isfinite(value):
                self.progress.rewards[f"{prefix or 'train_'}{name}"] = float(value)
                found = found or name == "reward_margin"
        return found


def attends_per_sample(kernels: Kernels, padding_free: bool) -> bool:
    """Whether padding-free rows attend within each sample through torch's SDPA, one sample at a time
    (worker/training/attention.py): on a CPU, where no variable-length kernel exists and SDPA would attend
    over the whole row."""
    return padding_free and kernels.attn_implementation == "sdpa" and not torch.cuda.is_available()


def use_padding_free(
    ctx: TrainingContext,
    hp: Hyperparameters,
    data: TrainingData,
    flops: ModelFlops,
    kernels: Kernels,
    model: Any,
) -> tuple[bool, str]:
    """Whether the micro-batches go padding-free, and why: packed rows always are; otherwise as the job asked,
    or by default where the model keeps packed samples apart and the data's lengths make it cheaper."""
    if hp.packing:
        return True, "samples packed in rows of max_seq_length"
    if hp.padding_free is not None:
        return hp.padding_free, "as the job asked"
    model_type = model.config.get_text_config().model_type
    if model_type not in PADDING_FREE_MODEL_TYPES:
        return False, f"padded: model type {model_type!r} is not known to keep concatenated samples apart"
    flash = kernels.attn_implementation == "flash_attention_2"
    # SDPA one sample at a time attends like FlashAttention-2, but transformers still builds the row's mask.
    pays, ratio = padding_free_pays(
        data.lengths,
        hp.batch_size,
        flops,
        varlen=flash or attends_per_sample(kernels, True),
        builds_mask=not flash,
        seed=hp.seed,
    )
    if pays:
        return True, f"padding-free: {1 - ratio:.0%} less compute than padded batches for these lengths"
    if math.isinf(ratio):
        return False, "padded: a padding-free batch would need a larger attention mask than padded ones"
    return False, f"padded: padding-free batches would not save compute for these lengths ({ratio:.2f}x)"


def sft_trainer(
    ctx: TrainingContext,
    model: torch.nn.Module,
    tokenizer: Any,
    data: TrainingData,
    args: SFTConfig,
    progress: TrainingProgress,
) -> SFTTrainer:
    """trl's SFTTrainer reporting through a ProgressCallback into `progress`, its micro-batches padding-free
    where that pays."""
    hp = ctx.spec.hyperparameters
    kernels = progress.kernels
    assert hp is not None and kernels is not None
    trainable, total = model.get_nb_trainable_parameters()
    progress.flops = ModelFlops.of(model, trainable, total)
    progress.padding_free, why = use_padding_free(ctx, hp, data, progress.flops, kernels, model)
    if not hp.packing:
        args.padding_free = progress.padding_free
        # trl enforces max_length only while preparing datasets; these come cut already.
        args.max_length = None if progress.padding_free else args.max_length
    if attends_per_sample(kernels, progress.padding_free):
        (model.get_base_model() if is_peft_model(model) else model).set_attn_implementation(SDPA_PER_SAMPLE)
        why += ", each sample attending on its own"
    ctx.reporter.event(
        "kernels",
        f"training with {kernels.attn_implementation} attention, {'bf16' if kernels.bf16 else 'fp32'}"
        f"{', fused AdamW' if kernels.fused_adamw else ''}{', Liger kernels' if kernels.liger_kernel else ''}"
        f"{', torch.compile' if kernels.torch_compile else ''}; {why}",
        data={**kernels.to_dict(), "padding_free": progress.padding_free, "packing": hp.packing},
    )
    trainer = LossOnlySFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(ctx, progress)],
    )
    # Progress goes to the database; the trainer's own printing would only flood the worker log.
    trainer.remove_callback(PrinterCallback)
    progress.batches = BatchCounter(trainer.data_collator)
    trainer.data_collator = progress.batches
    return trainer


class LossOnlySFTTrainer(SFTTrainer):
    """trl's SFTTrainer computing the loss and nothing else on each step. trl's own compute_loss also computes
    each token's entropy and whether its label is the top-1 token, inside the fused LM head, and turns their
    means into Python floats on every step, for `entropy` and `mean_token_accuracy` logs this service does not
    keep. Here the fused head computes only the log-probabilities, and the loss is trl's: their negative sum
    over the trained tokens divided by `num_items_in_batch` (their count over the accumulated micro-batches)
    or, without it, by this micro-batch's count; the trained tokens are counted as trl counts them (`num_tokens`,
    trained_tokens). Where trl computes another loss (a custom loss function, label smoothing, DFT, an MoE
    auxiliary loss, sequence parallelism) the trainer is trl's unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        sequence_parallel = (
            parallelism is not None
            and getattr(parallelism, "sp_backend", None) == "deepspeed"
            and getattr(parallelism, "sp_enabled", False)
        )
        self.loss_only = not (
            self.compute_loss_func is not None
            or self.label_smoother is not None
            or self.args.loss_type != "nll"
            or self.aux_loss_enabled
            or sequence_parallel
        )
        if self.loss_only:
            # trl has patched the base model's forward with a fused head computing log-probabilities, entropy
            # and top-1 hits; this one, on top of it, computes the log-probabilities only (called without
            # `fused_lm_head`, it hands over to trl's, which runs the model's own forward).
            add_fused_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not self.loss_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        trained = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        # A micro-batch without a trained token gives a finite zero, as trl's.
        loss = -outputs.log_probs.sum() / torch.as_tensor(trained).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients across ranks.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            # The tokens trl counts: every non-pad token of padded batches, the whole row of padding-free ones.
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += (
                self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
            )
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            # As trl: the fused head builds no logits, so a caller that wants them gets another forward.
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss


class PreferenceTrainer(DPOTrainer):
    """trl's DPOTrainer on pairs tokenized here (prompt_ids, chosen_ids, rejected_ids; worker/training/data.py),
    so that the plan, the cache and training see the same tokens: trl's own preparation is skipped."""

    def _prepare_dataset(
        self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str
    ) -> Dataset:
        return dataset


def dpo_trainer(
    ctx: TrainingContext,
    model: torch.nn.Module,
    peft_config: Any,
    tokenizer: Any,
    data: TrainingData,
    args: DPOConfig,
    progress: TrainingProgress,
) -> PreferenceTrainer:
    """trl's DPOTrainer on the base `model`, wrapping it in the job's adapter (`peft_config`) and reporting
    through a ProgressCallback into `progress`. No reference model is given: trl then scores the reference
    with the adapter switched off, on the same weights."""
    kernels = progress.kernels
    assert kernels is not None
    trainer = PreferenceTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(ctx, progress)],
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    # Each sequence also runs forward once more through the reference, which counts in the FLOPs.
    progress.flops = replace(ModelFlops.of(trainer.model, trainable, total), reference_passes=1)
    progress.batches = BatchCounter(trainer.data_collator)
    trainer.data_collator = progress.batches
    ctx.reporter.event(
        "kernels",
        f"training with {kernels.attn_implementation} attention, {'bf16' if kernels.bf16 else 'fp32'}"
        f"{', fused AdamW' if kernels.fused_adamw else ''}; padded batches of chosen and rejected sequences; "
        "reference: the base model with the adapter switched off",
        data={**kernels.to_dict(), "padding_free": False, "packing": False},
    )
    return trainer


def train(ctx: TrainingContext, trainer: SFTTrainer, progress: TrainingProgress) -> None:
    """Runs the training loop, resuming from the job's checkpoint when there is one, and waits until its last
    checkpoint is stored."""
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
    progress.add_time("train", progress.runtime)
    if ctx.checkpoints is not None:
        waited = time.perf_counter()
        ctx.checkpoints.wait()
        progress.add_time("checkpoint", time.perf_counter() - waited)
        # Beside training, not on the step path.
        progress.add_time("checkpoint_upload", getattr(ctx.checkpoints, "seconds", 0.0))


def started(progress: TrainingProgress) -> None:
    """Counts the training process's start (interpreter, imports, reading the datasets) as the startup phase."""
    age = process_age()
    if age is not None and "startup" not in progress.timings:
        progress.add_time("startup", age)


def trained_tokens(trainer: SFTTrainer) -> int:
    """Tokens of every rank together (the trainer gathers the count)."""
    return int(getattr(trainer, "_total_train_tokens", 0) or 0)


def efficiency(ctx: TrainingContext, trainer: SFTTrainer, progress: TrainingProgress) -> dict[str, Any]:
    """tokens/s, the FLOPs per token and the model FLOPs utilization of the training loop against the device's
    peak (configured or measured; None for an in-process run without a cache to keep the measurement in)."""
    tokens, runtime = trained_tokens(trainer), progress.runtime
    batches, flops, kernels = progress.batches, progress.flops, progress.kernels
    mean_length = batches.mean_length() if batches is not None else None
    result: dict[str, Any] = {
        "tokens_per_second": round(tokens / runtime, 1) if tokens and runtime else None,
        "mean_sample_tokens": round(mean_length, 1) if mean_length else None,
        "padding_free": progress.padding_free,
        **(kernels.to_dict() if kernels is not None else {}),
        "flops_per_token": None,
        "mfu": None,
        "device_peak_flops": None,
        "device_peak_source": None,
    }
    if flops is None or mean_length is None or not tokens or not runtime:
        return result
    per_token = flops.per_token(mean_length)
    result["flops_per_token"] = round(per_token)
    if ctx.device_peak_tflops is None and ctx.cache_dir is None:
        return result
    dtype = torch.bfloat16 if kernels is not None and kernels.bf16 else torch.float32
    peak, source = device_peak(ctx.device_peak_tflops, ctx.cache_dir, dtype)
    devices = distributed.world_size()
    result |= {
        # Four significant digits: on small models the MFU is a fraction of a percent.
        "mfu": float(f"{tokens * per_token / runtime / (peak * devices):.4g}"),
        "device_peak_flops": round(peak),
        "device_peak_source": source,
    }
    return result


def training_metrics(trainer: SFTTrainer, progress: TrainingProgress, ctx: TrainingContext) -> dict[str, Any]:
    """The metrics of a finished run, as the job's result shows them."""
    state = trainer.state
    runtime = progress.runtime
    return {
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0), 4),
        "first_train_loss": progress.losses[0] if progress.losses else None,
        "final_train_loss": progress.losses[-1] if progress.losses else None,
        "eval_loss": progress.last_eval_loss,
        **{name: round(value, 6) for name, value in sorted(progress.rewards.items())},
        "train_runtime_seconds": round(runtime, 3),
        "seconds_per_step": round(runtime / state.global_step, 4) if state.global_step else None,
        **efficiency(ctx, trainer, progress),
        "time_seconds": {phase: round(seconds, 3) for phase, seconds in progress.timings.items()},
        **peak_memory(),
    }
