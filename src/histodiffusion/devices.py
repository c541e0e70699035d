"""Devices and numeric precision: where single-process work runs, autocast dtypes, the machine."""

from __future__ import annotations

import ctypes
import functools
import itertools
import multiprocessing
import os
import platform
import signal
import sys
import warnings
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


_FORKED: dict[int, Callable[[int], object]] = {}  # what fork_map's processes call, inherited through fork
_TOKENS = itertools.count()


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    sys.__stderr__.write(warnings.formatwarning(message, category, filename, lineno, line))


def _start_process(parent: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle: it ends the processes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # whatever the caller had redirected (a progress display, the CLI's warning format) is not ours
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    warnings.showwarning = _plain_warning
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the caller, freeing what it held
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _call(token: int, i: int) -> object:
    return _FORKED[token](i)


def fork_map(fn: Callable[[int], T], n: int, processes: int) -> Iterator[tuple[int, T]]:
    """``fn(i)`` for ``i`` in ``range(n)`` in ``processes`` forked CPU processes of one torch thread
    each; iterating the result yields ``(i, fn(i))`` as each one finishes. Linux only.

    Independent CPU trainings run faster side by side with one thread each than one after another
    with all threads (``bench/results/speed.md``: the downstream classifier's step). The processes
    are forked at this call (before any thread or progress display the caller starts next), so
    ``fn`` and what it reads are inherited, not pickled; only results travel back. One thread each:
    GNU OpenMP hangs when a process forked after its parent used OpenMP starts a thread team. CPU
    only (a forked process cannot use CUDA state). When ``fn`` fails, the results that finished
    beside it are yielded first; a failure, Ctrl-C or SIGTERM in the caller, or closing the
    iterator kills the processes. A process that dies (say, killed for memory) raises
    ``concurrent.futures.process.BrokenProcessPool``.
    """
    if sys.platform != "linux":
        raise RuntimeError("fork_map forks worker processes, which needs Linux")
    token = next(_TOKENS)
    _FORKED[token] = fn
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_process, initargs=(os.getpid(),))
    futures = {pool.submit(_call, token, i): i for i in range(n)}  # forks every process now
    return _results(pool, futures, token, before)


def _results(pool: ProcessPoolExecutor, futures: dict, token: int, before: set) -> Iterator[tuple[int, T]]:
    given = set()
    try:
        for future in as_completed(futures):
            if future.exception() is not None:  # first hand back what finished beside it
                for other in futures:
                    if other not in given and other.done() and not other.cancelled() and other.exception() is None:
                        given.add(other)
                        yield futures[other], other.result()
            given.add(future)
            yield futures[future], future.result()
    except BaseException:
        for p in set(multiprocessing.active_children()) - before:
            p.kill()
        pool.shutdown(cancel_futures=True)  # its manager thread finds the processes gone, reaps them and ends
        raise
    finally:
        _FORKED.pop(token, None)
    pool.shutdown()
