"""Devices and numeric precision: where single-process work runs, autocast dtypes, the machine."""

from __future__ import annotations

import functools
import os
import platform
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import PartialState

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name ('fp32' -> None, 'bf16' -> torch.bfloat16)."""
    return AUTOCAST_DTYPES[precision]


def inference_device(device: str) -> torch.device:
    """The device for single-process work: the configured one, or CUDA when available ('auto')."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def uses_cpu(device: str) -> bool:
    """True when the configured ``device`` means the CPU: ``cpu``, or ``auto`` without CUDA."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def process_state(device: str) -> PartialState:
    """This launch's processes (accelerate's ``PartialState``): one, or those started by
    ``accelerate launch`` / ``torchrun`` (gloo on the CPU, NCCL on GPUs)."""
    from accelerate import PartialState

    _warn_one_cpu_process()
    # Under a launch the other processes wait at a barrier while the main one runs a single-process
    # stage (data, latents, features, select, report): give such waits hours, not the default minutes.
    return PartialState(cpu=uses_cpu(device), timeout=timedelta(hours=6))


@functools.cache
def _warn_one_cpu_process() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one process, not N: say so (once)."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env and not any(
            k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        from histodiffusion.progress import console

        console.print("[yellow]warning: `accelerate launch --cpu` starts a single process whatever --num_processes "
                      "says. For N processes on the CPU use `accelerate launch --multi_gpu --num_processes N ...` "
                      "(gloo when there is no GPU) or `torchrun --nproc_per_node N -m histodiffusion ...`.[/]")


def resolve_mixed_precision(requested: str, device: str) -> str:
    """``auto``: bf16 on a GPU that supports it, else fp32 ('no'); explicit values pass through."""
    if requested != "auto":
        return requested
    if device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def machine() -> str:
    """A one-line description of this machine (for result files)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}")
