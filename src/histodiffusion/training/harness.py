"""The training harness every trainer uses: accelerator, optimiser and schedule, EMA, checkpoints,
and one flat loop (edm2-style: resume -> for each step: step, EMA, log, sample, checkpoint).

Checkpoints hold no pickle: weights, optimiser moments, EMA and RNG states are safetensors, the
rest JSON, so a run directory from someone else never runs code when it is resumed. Every random
draw a step makes is seeded by ``(seed, step)`` (:mod:`histodiffusion.seeding`; under accelerate
each process takes its slice of the global batch); the global torch RNG (dropout) is saved too,
so a resumed run reaches exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from histodiffusion import io, tracking
from histodiffusion.devices import resolve_mixed_precision
from histodiffusion.errors import UserError
from histodiffusion.progress import console, progress_bar

CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- accelerator
def make_accelerator(device: str, mixed_precision: str) -> Accelerator:
    """An Accelerator for ``device`` (auto/cpu/cuda/mps); multi-process setup comes from the launcher."""
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    # Stages run one after another in one process (``histodiffusion run``) may use different
    # precisions; accelerate keeps one global state, so reset its per-run part (the process
    # group, PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(mixed_precision, "cpu" if cpu else device))


# ---------------------------------------------------------------------- optimiser, schedule
def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then ``constant`` or ``cosine`` decay to
    ``floor`` x the peak at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(params, lr: float, weight_decay: float, multiplier: Callable[[int], float],
                   betas: tuple[float, float] = (0.9, 0.999)) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its LambdaLR schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, multiplier)


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


@dataclass
class TrainState:
    """What a checkpoint holds: the model (maybe wrapped by accelerate), its optimiser and LR
    schedule, and optionally an EMA."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None = None


# ------------------------------------------------------------------------- checkpoints
def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict as (tensors for safetensors, the rest for JSON)."""
    tensors, rest = {}, {"param_groups": sd["param_groups"], "state": {}}
    for index, entry in sd["state"].items():
        rest["state"][str(index)] = {k: v for k, v in entry.items() if not torch.is_tensor(v)}
        tensors.update({f"{index}.{k}": v.detach().cpu().contiguous() for k, v in entry.items() if torch.is_tensor(v)})
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class Checkpointer:
    """``folder/checkpoints/step-000123/``: safetensors and JSON files only; the newest ``keep`` kept.

    Files: ``model`` (unwrapped weights), ``optimizer`` (moments) + ``optimizer.json``,
    ``schedule.json``, ``ema`` + ``ema.json`` (when there is an EMA), ``rng-<process>`` (the global
    torch RNG), ``meta.json`` (written last: a folder without it is never taken for a checkpoint).
    """

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
        """The newest finished checkpoint as (step, path), or None."""
        found = self.all()
        return found[-1] if found else None

    def save(self, state: TrainState, step: int, accelerator: Accelerator | None = None) -> Path:
        """Save the full training state; a half-written checkpoint is never taken for the latest."""
        try:
            return self._save(state, step, accelerator)
        except (OSError, SafetensorError, RuntimeError) as err:
            if io.is_no_space(err):
                raise UserError(f"no space left on the device while writing a checkpoint under {self.root}. "
                                "Free some space and rerun the same command; nothing finished is lost: "
                                "training resumes from the last complete checkpoint.") from err
            raise

    def _save(self, state: TrainState, step: int, accelerator: Accelerator | None) -> Path:
        main = accelerator is None or accelerator.is_main_process
        rank = 0 if accelerator is None else accelerator.process_index
        path = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(accelerator)
        save_file({"cpu": torch.get_rng_state(), **{f"cuda{i}": s for i, s in enumerate(
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])}}, str(tmp / f"rng-{rank}.safetensors"))
        if main:
            model = state.model if accelerator is None else accelerator.unwrap_model(state.model)
            save_file(_tensors(model.state_dict()), str(tmp / "model.safetensors"))
            moments, rest = _split_optimizer(state.optimizer.state_dict())
            save_file(moments, str(tmp / "optimizer.safetensors"))
            io.write_json(tmp / "optimizer.json", rest)
            schedule = {"lr_scheduler": state.lr_scheduler.state_dict()}
            if accelerator is not None and accelerator.scaler is not None:
                schedule["grad_scaler"] = accelerator.scaler.state_dict()
            io.write_json(tmp / "schedule.json", schedule)
            if state.ema is not None:
                save_file(_tensors(state.ema.shadow.state_dict()), str(tmp / "ema.safetensors"))
                io.write_json(tmp / "ema.json", {"decay": state.ema.decay, "num_updates": state.ema.num_updates})
        _barrier(accelerator)
        if main:
            io.write_json(tmp / "meta.json", {"step": step, "time": time.time()})
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(accelerator)
        return path

    def resume(self, state: TrainState, accelerator: Accelerator | None = None) -> int:
        """Load the latest checkpoint into ``state`` if there is one; returns the step to continue from."""
        latest = self.latest()
        if latest is None:
            return 0
        step, path = latest
        rank = 0 if accelerator is None else accelerator.process_index
        try:
            model = state.model if accelerator is None else accelerator.unwrap_model(state.model)
            model.load_state_dict(load_file(str(path / "model.safetensors")))
            state.optimizer.load_state_dict(_join_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                            json.loads((path / "optimizer.json").read_text())))
            schedule = json.loads((path / "schedule.json").read_text())
            state.lr_scheduler.load_state_dict(schedule["lr_scheduler"])
            if accelerator is not None and accelerator.scaler is not None and "grad_scaler" in schedule:
                accelerator.scaler.load_state_dict(schedule["grad_scaler"])
            if state.ema is not None:
                state.ema.shadow.load_state_dict(load_file(str(path / "ema.safetensors")))
                ema = json.loads((path / "ema.json").read_text())
                state.ema.decay, state.ema.num_updates = ema["decay"], ema["num_updates"]
            rng_file = path / f"rng-{rank}.safetensors"
            if rng_file.is_file():  # another process count: each process's RNG starts afresh
                rng = load_file(str(rng_file))
                torch.set_rng_state(rng["cpu"])
                cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
                if cuda:
                    torch.cuda.set_rng_state_all(cuda)
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError) as err:
            # a checkpoint from another model size, a damaged file, or not one of ours
            raise UserError(f"cannot resume from {path} ({type(err).__name__}: {err}). Delete that folder to fall "
                            "back to an older checkpoint, or rerun the stage with --force.") from err
        console.print(f"resumed from {path} (step {step})")
        return step


def _agreed(flag: bool, accelerator: Accelerator | None) -> bool:
    """``flag`` as the main process sees it, on every process (each process's clock differs: a time
    limit decided per process would leave the others waiting in a collective)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([int(flag)], device=accelerator.device)).item())


def _barrier(accelerator: Accelerator | None) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


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


def _drop_records_after(log_path: Path, step: int) -> None:
    """Keep the records of ``log_path`` up to ``step``, the checkpoint training resumes from: those
    logged after it (before a crash) are logged again by the resumed run, so each step appears once."""
    if step == 0:
        log_path.unlink(missing_ok=True)
        return
    records = io.read_jsonl(log_path)
    if any(r.get("step", 0) > step for r in records):
        with io.atomic_path(log_path) as tmp:
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records if r.get("step", 0) <= step),
                           encoding="utf-8")


def run_loop(spec: LoopSpec, step_fn: Callable[[int], dict], *, folder: Path | None = None,
             state: TrainState | None = None, accelerator: Accelerator | None = None,
             on_sample: Callable[[int], None] | None = None, progress: bool = True) -> int:
    """Resume, then run ``step_fn`` for the remaining steps with EMA, logging and checkpoints.

    ``step_fn(step)`` does one optimisation step and returns scalar metrics. With a ``folder``
    (and the ``state`` to checkpoint) the loop resumes from and writes ``folder/checkpoints`` and
    appends to ``folder/metrics.jsonl``; without one it only trains (short in-memory runs such as
    the downstream classifiers). ``on_sample(step)`` runs every ``spec.sample_every`` steps and at
    the end (previews, validation). Returns the last step reached: ``spec.steps``, or less when
    ``spec.time_limit_s`` ran out first (checkpointed then; the next call continues from it).
    """
    main = accelerator is None or accelerator.is_main_process
    processes = 1 if accelerator is None else accelerator.num_processes
    ckpt = Checkpointer(folder, spec.keep_checkpoints) if folder is not None and state is not None else None
    start = ckpt.resume(state, accelerator) if ckpt else 0
    log_path = folder / "metrics.jsonl" if folder is not None else None
    if log_path is not None and main:
        _drop_records_after(log_path, start)
    window: dict[str, list[float]] = {}
    t_start = t_last = time.time()
    n_last = start
    speed: dict[str, float] = {}  # images/s over the last logging window, shown on the bar
    with progress_bar(spec.description, total=spec.steps, enabled=progress and main,
                      unit="steps", completed=start) as advance:
        for step in range(start, spec.steps):
            metrics = step_fn(step)
            if state is not None and state.ema is not None:
                state.ema.update(state.model if accelerator is None else accelerator.unwrap_model(state.model))
            for k, v in metrics.items():
                window.setdefault(k, []).append(float(v))
            done = step + 1
            if done % spec.log_every == 0 or done == spec.steps:
                now = time.time()
                rate = (done - n_last) * spec.images_per_step * processes / max(now - t_last, 1e-9)
                record = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()},
                          "images_per_s": round(rate, 2), "time": now}
                if log_path is not None and main:
                    io.append_jsonl(log_path, record)
                    tracking.log(record, done)
                window, t_last, n_last = {}, now, done
                speed = {"images/s": round(rate, 1)}
            advance(1, **{k: round(float(v), 4) for k, v in metrics.items() if k in ("loss", "lr")}, **speed)
            if on_sample is not None and spec.sample_every and (done % spec.sample_every == 0 or done == spec.steps):
                if main:
                    on_sample(done)
                _barrier(accelerator)
            out_of_time = spec.time_limit_s is not None and _agreed(time.time() - t_start > spec.time_limit_s,
                                                                    accelerator)
            if ckpt is not None and (done % spec.checkpoint_every == 0 or done == spec.steps or out_of_time):
                ckpt.save(state, done, accelerator)
            if out_of_time and done < spec.steps:
                return done
    return spec.steps


def accumulate_step(accelerator: Accelerator | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    micro_loss: Callable[[int], tuple[torch.Tensor, dict]], accumulation: int = 1,
                    grad_clip: float | None = None) -> dict:
    """One optimiser step over ``accumulation`` micro-batches; returns averaged metrics + grad norm.

    ``micro_loss(m)`` returns the loss of micro-batch ``m`` and its scalar metrics. Under
    accelerate, gradients are only all-reduced on the last micro-batch (``no_sync`` before it).
    """
    totals: dict[str, float] = {}
    for m in range(accumulation):
        sync = m == accumulation - 1
        ctx = accelerator.no_sync(model) if accelerator is not None and not sync else contextlib.nullcontext()
        with ctx:
            loss, metrics = micro_loss(m)
            scaled = loss / accumulation
            accelerator.backward(scaled) if accelerator is not None else scaled.backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accumulation
    norm = None
    if grad_clip:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if accelerator is not None else \
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if lr_scheduler is not None and not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if norm is not None:
        totals["grad_norm"] = float(norm)
    return totals
