"""Multi-GPU training: the DeepSpeed configuration generated from a job, and the process-group setup.

A job with `resources.gpus` N runs as N processes started by torchrun (one per GPU; on a CPU-only machine,
N processes over gloo). ZeRO stage 0 is plain data parallelism; stages 2 and 3 go through DeepSpeed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from shared.schemas import JobSpec


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def agreed(flag: bool) -> bool:
    """True on every rank if it is true on any (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    # NCCL reduces only tensors on the GPU; one element a step, on the device the step already waits for.
    on_gpu = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    """Waits for every rank (a no-op without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def ranks_share_disk() -> bool:
    """Whether every rank writes its checkpoint files into one folder (one node under torchrun), or each rank
    to a disk of its own (a Ray job's ranks: TUNEFORGE_RANKS_SHARE_DISK=0)."""
    return os.environ.get("TUNEFORGE_RANKS_SHARE_DISK", "1") != "0" or world_size() == 1


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def deepspeed_config(spec: JobSpec) -> dict[str, Any] | None:
    """The DeepSpeed config for a job (None for ZeRO stage 0). Batch sizes, accumulation, clipping and
    precision stay "auto": the Trainer fills them from the job's hyperparameters."""
    resources = spec.resources
    if resources.zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": resources.zero_stage,
        # Overlapping communication with computation needs CUDA streams.
        "overlap_comm": not on_cpu(),
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if resources.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Gather the sharded weights when the adapter is saved, so the saved file is complete.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if resources.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu()}
        if resources.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu()}
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if on_cpu():
        # Keep the Trainer's torch AdamW: DeepSpeed's CPU Adam would be compiled first (minutes).
        config["zero_force_ds_cpu_optimizer"] = False
    elif resources.cpu_offload:
        # Offloaded optimizer states are updated on the CPU by DeepSpeed's own Adam (DeepSpeed refuses a torch
        # optimizer there); the Trainer fills in its settings.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def float32_trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The float32 master copies DeepSpeed's optimizer keeps of the trainable weights, gathered whole, by
    parameter name, on the CPU; None where a trainable weight has none (no DeepSpeed optimizer). Under bf16 or
    fp16 the module itself holds only rounded 16-bit copies. A collective: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            if full is None:
                return None
            weights[name] = full.detach().float().cpu()
    return weights


def ddp_backend() -> str | None:
    """gloo between CPU processes; the Trainer's default (NCCL) on GPUs."""
    return "gloo" if on_cpu() and world_size() > 1 else None


def skip_cpu_shm_op(spec: JobSpec) -> None:
    """On CPU, DeepSpeed would compile a shared-memory all-reduce op the first time its communication layer
    starts (minutes on a fresh machine) for a speed-up only CPU training sees; gloo's all-reduce is as exact.
    Call before the training arguments exist: they may start that layer."""
    if spec.resources.zero_stage and on_cpu():
        # The module itself: the package's attribute of that name is PyTorch.
        backend = importlib.import_module("deepspeed.comm.torch")
        backend.build_shm_op = lambda: None


def init_process_group(spec: JobSpec) -> None:
    """Called after the training arguments exist and before the model is loaded. On CPU the Trainer starts
    torch.distributed (gloo) but not DeepSpeed's communication layer, which ZeRO-3 asks for the world
    size while it partitions the model during loading."""
    if spec.resources.zero_stage and world_size() > 1 and on_cpu():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


# glibc malloc in training processes (and the warm runtime they fork from): blocks up to 64 MiB come from the
# heap, and up to 1 GiB freed at its top stays mapped. By default glibc maps and unmaps blocks from 128 KiB up
# (a limit it raises only to 32 MiB) and gives memory back once 128 KiB or so are free at the top, so each step's
# activations and gradients are mapped again, page by page, zeroed by the kernel: some 5,000 page faults a step
# with the small benchmark model on a CPU, about 500 with these (the training loop's kernel time 0.41 s instead
# of 0.71 s over 10 steps). Larger blocks, such as weights read while a model loads, are still mapped and given
# back on their own. An operator's own settings win.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def child_environment(cache_dir: str) -> dict[str, str]:
    """Environment for training processes: DeepSpeed's compiled ops cached across jobs, CPU accelerator
    without GPUs, malloc that keeps the memory of each step for the next (MALLOC_ENV)."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.join(cache_dir, "torch_extensions")
    }
    # Both or neither: setting one of them alone turns glibc's adjustment of the other off.
    if not any(name in os.environ for name in MALLOC_ENV):
        env |= MALLOC_ENV
    if on_cpu():
        env["DS_ACCELERATOR"] = "cpu"
    return env
