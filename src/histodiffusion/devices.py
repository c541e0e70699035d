"""Devices and numeric precision: where single-process work runs, autocast dtypes, the machine."""

from __future__ import annotations

import os
import platform

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name ('fp32' -> None, 'bf16' -> torch.bfloat16)."""
    return AUTOCAST_DTYPES[precision]


def inference_device(device: str) -> torch.device:
    """The device for single-process work: the configured one, or CUDA when available ('auto')."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
