"""Devices and numeric precision: where single-process work runs, autocast dtypes, the machine."""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import platform
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from accelerate import PartialState

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
T = TypeVar("T")


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


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_FORKED: dict[int, Callable[[int], object]] = {}  # what fork_map's workers call, inherited through fork
_TOKENS = itertools.count()


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle: it ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call(token: int, i: int) -> object:
    return _FORKED[token](i)


def fork_map(fn: Callable[[int], T], n: int, workers: int) -> Iterator[tuple[int, T]]:
    """``fn(i)`` for ``i`` in ``range(n)``, in ``workers`` forked CPU processes with
    ``cpu_cores() // workers`` torch threads each; yields ``(i, fn(i))`` as each one finishes.

    Independent CPU trainings run faster side by side with one thread each than one after another
    with all threads (``bench/results/speed.md``: the downstream classifier's step). The workers
    are forked, so ``fn`` and what it reads are inherited, not pickled; only results travel back.
    CPU only (a forked process cannot use CUDA state). An exception in ``fn`` or in the caller
    (Ctrl-C, SIGTERM, leaving the loop early) kills the workers; results already yielded stand.
    """
    token = next(_TOKENS)
    _FORKED[token] = fn
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                               initargs=(max(1, cpu_cores() // workers),))
    try:
        futures = {pool.submit(_call, token, i): i for i in range(n)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        for p in set(multiprocessing.active_children()) - before:
            p.kill()
        pool.shutdown(cancel_futures=True)  # its manager thread finds the workers gone, reaps them and ends
        raise
    finally:
        _FORKED.pop(token, None)
    pool.shutdown()
