"""Training utilities shared by every training stage: accelerator, EMA, checkpoints, the loop.

The loop is flat (edm2-style): resume from the latest checkpoint, then for each step call the
stage's ``step_fn(step)``, update the EMA, log, checkpoint, sample. Every source of randomness a
step uses is seeded by ``(seed, step, process)`` (see :func:`step_generator`), so a resumed run
reaches exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from histodiffusion import io
from histodiffusion.errors import UserError
from histodiffusion.progress import console, progress_bar

CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- accelerator
def resolve_mixed_precision(requested: str, device: str) -> str:
    """``auto``: bf16 on a GPU that supports it, else fp32 ('no'); explicit values pass through."""
    if requested != "auto":
        return requested
    if device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(device: str, mixed_precision: str) -> Accelerator:
    """An Accelerator for ``device`` (auto/cpu/cuda/mps); multi-process setup comes from the launcher."""
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    # Stages run one after another in one process (``histodiffusion run``) may use different
    # precisions; accelerate keeps one global state, so reset its per-run part (the process
    # group, PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(mixed_precision, "cpu" if cpu else device))


def inference_device(device: str) -> torch.device:
    """The device for single-process inference: the configured one, or CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu",
                   stream: int = 0) -> torch.Generator:
    """A torch generator for one (seed, step, process, stream): resumable and batch-order free."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0]))
    return g


def step_rng(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """A numpy generator for one (seed, step, process, stream)."""
    return np.random.default_rng([seed, step, rank, stream])


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of sample ``index``: tile k is the same whatever the batch size or process count."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, 1_000_003, index]).generate_state(1)[0]))
    return g


# ------------------------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of a model's parameters, with warm-up of the decay.

    decay_t = min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the random
    initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards the current parameters (buffers are copied)."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        for s, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            s.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])


# ---------------------------------------------------------------------------- schedules
def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then constant."""
    return lambda step: min(1.0, (step + 1) / max(warmup_steps, 1))


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def with_cooldown(schedule: Callable[[int], float], total_steps: int, cooldown_steps: int) -> Callable[[int], float]:
    """``schedule`` times a linear fall to 0 over the last ``cooldown_steps`` of ``total_steps``
    (warmup-stable-decay when ``schedule`` is constant after its warm-up). Step ``total_steps - 1``,
    the last one trained, gets ``1 / cooldown_steps`` of the rate."""
    if cooldown_steps <= 0:
        return schedule

    def f(step: int) -> float:
        return schedule(step) * min(1.0, max(0.0, (total_steps - step) / cooldown_steps))
    return f


def lr_multiplier(train) -> Callable[[int], float]:
    """The LR multiplier of a ``TrainCfg``: warm-up, then constant or cosine, then its cooldown."""
    if train.lr_schedule == "cosine":
        base = warmup_cosine(train.warmup_steps, train.steps)
    else:
        base = warmup_constant(train.warmup_steps)
    return with_cooldown(base, train.steps, train.cooldown_steps)


# ------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """``folder/checkpoints/step-000123/``: accelerate state + meta.json; the newest ``keep`` kept."""

    def __init__(self, folder: Path, keep: int):
        self.root = Path(folder) / CHECKPOINTS
        self.keep = keep

    def all(self) -> list[tuple[int, Path]]:
        """Finished checkpoints as (step, path), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, accelerator: Accelerator, step: int, meta: dict | None = None) -> Path:
        """Save the full training state; a half-written checkpoint is never taken for the latest.

        Every process writes its part (model shards, its RNG state) into one temporary folder;
        the main process adds meta.json and renames the folder into place.
        """
        try:
            return self._save(accelerator, step, meta)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise UserError(f"no space left on the device while writing a checkpoint under {self.root}. "
                                "Free some space and rerun: training resumes from the last complete "
                                "checkpoint.") from err
            raise

    def _save(self, accelerator: Accelerator, step: int, meta: dict | None) -> Path:
        path = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            io.write_json(tmp / "meta.json", {"step": step, "time": time.time(), **(meta or {})})
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def resume(self, accelerator: Accelerator) -> int:
        """Load the latest checkpoint if any; returns the step to continue from (0 if none)."""
        latest = self.latest()
        if latest is None:
            return 0
        step, path = latest
        try:
            accelerator.load_state(str(path))
        except Exception as err:  # a checkpoint from another model size or a damaged file
            raise UserError(f"cannot resume from {path} ({err}). Delete that folder to fall back to an "
                            "older checkpoint, or rerun the stage with --force.") from err
        console.print(f"resumed from {path} (step {step})")
        return step


# --------------------------------------------------------------------------------- loop
@dataclass
class LoopSpec:
    """How long to train and how often to log, checkpoint and sample."""

    steps: int
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    images_per_step: int = 1
    description: str = "train"
    time_limit_s: float | None = None


def run_loop(folder: Path, accelerator: Accelerator, spec: LoopSpec, step_fn: Callable[[int], dict],
             ema: EMA | None = None, model: torch.nn.Module | None = None,
             on_sample: Callable[[int], None] | None = None, progress: bool = True) -> int:
    """Resume, then run ``step_fn`` for the remaining steps with EMA, logging and checkpoints.

    ``step_fn(step)`` does one optimisation step and returns scalar metrics (floats). Returns
    the last step reached: ``spec.steps``, or less when ``spec.time_limit_s`` ran out first (the
    state is checkpointed then, and the next call continues from it).
    """
    ckpt = Checkpointer(folder, spec.keep_checkpoints)
    start = ckpt.resume(accelerator)
    log_path = folder / "metrics.jsonl"
    if start == 0:
        log_path.unlink(missing_ok=True)
    window: dict[str, list[float]] = {}
    t_start = t_last = time.time()
    n_last = start
    speed: dict[str, float] = {}  # images/s over the last logging window, shown on the bar
    with progress_bar(spec.description, total=spec.steps, enabled=progress and accelerator.is_main_process,
                      unit="steps", completed=start) as advance:
        for step in range(start, spec.steps):
            metrics = step_fn(step)
            if ema is not None and model is not None:
                ema.update(accelerator.unwrap_model(model))
            for k, v in metrics.items():
                window.setdefault(k, []).append(float(v))
            done = step + 1
            if done % spec.log_every == 0 or done == spec.steps:
                now = time.time()
                rate = (done - n_last) * spec.images_per_step * accelerator.num_processes / max(now - t_last, 1e-9)
                record = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()},
                          "images_per_s": round(rate, 2), "time": now}
                if accelerator.is_main_process:
                    io.append_jsonl(log_path, record)
                window, t_last, n_last = {}, now, done
                speed = {"images/s": round(rate, 1)}
            advance(1, **{k: round(float(v), 4) for k, v in metrics.items() if k in ("loss", "lr")}, **speed)
            if on_sample is not None and spec.sample_every and (done % spec.sample_every == 0 or done == spec.steps):
                if accelerator.is_main_process:
                    on_sample(done)
                accelerator.wait_for_everyone()
            out_of_time = spec.time_limit_s is not None and time.time() - t_start > spec.time_limit_s
            if done % spec.checkpoint_every == 0 or done == spec.steps or out_of_time:
                ckpt.save(accelerator, done)
            if out_of_time and done < spec.steps:
                return done
    return spec.steps


def accumulate_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    micro_loss: Callable[[int], tuple[torch.Tensor, dict]], accumulation: int,
                    grad_clip: float | None) -> dict:
    """One optimiser step over ``accumulation`` micro-batches; returns averaged metrics + grad norm.

    ``micro_loss(m)`` returns the loss of micro-batch ``m`` and its scalar metrics. Gradients are
    only all-reduced on the last micro-batch (``no_sync`` before it).
    """
    totals: dict[str, float] = {}
    for m in range(accumulation):
        sync = m == accumulation - 1
        ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx:
            loss, metrics = micro_loss(m)
            accelerator.backward(loss / accumulation)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accumulation
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if norm is not None:
        totals["grad_norm"] = float(norm)
    return totals


def read_metrics(folder: Path) -> list[dict]:
    """The metrics.jsonl records of a training stage."""
    return io.read_jsonl(Path(folder) / "metrics.jsonl")
