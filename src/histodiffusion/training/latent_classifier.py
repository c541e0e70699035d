"""Training the noise-aware latent classifier p(y | x_t, t) that guides synthesis.

The classifier sees the noise it will be asked about: every training latent is noised at a
uniformly random t (guided-diffusion's ``classifier_train.py``), with dihedral augmentation and
class-balanced batches. Validation reports accuracy per noise quartile and keeps the checkpoint
with the lowest valid loss — on the valid split, never the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from histodiffusion import io
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.latents import LatentSet
from histodiffusion.models.latent_classifier import CLASSIFIER, LatentClassifier
from histodiffusion.seeding import process_rows, step_generator, step_rng
from histodiffusion.training.harness import (
    LoopSpec,
    TrainState,
    accumulate_step,
    lr_lambda,
    make_accelerator,
    make_optimizer,
    run_loop,
)

QUARTILES = 4


def class_balanced_weights(labels: torch.Tensor) -> np.ndarray:
    """Sampling weight 1 / (count of the item's class): every class drawn equally often."""
    counts = torch.bincount(labels).double()
    return (1.0 / counts[labels]).numpy()


def noised_valid(latents: LatentSet, labels: torch.Tensor, scheduler: DDPMScheduler, seed: int) -> list[tuple]:
    """Fixed (x_t, t, y) per noise quartile for the valid latents: the same at every evaluation."""
    g = torch.Generator().manual_seed(seed + 4242)
    z = latents.sample(torch.arange(len(latents)), g).cpu()
    T = scheduler.config.num_train_timesteps
    out = []
    for q in range(QUARTILES):
        lo, hi = q * T // QUARTILES, (q + 1) * T // QUARTILES
        t = torch.randint(lo, hi, (len(z),), generator=g)
        out.append((scheduler.add_noise(z, torch.randn(z.shape, generator=g), t), t, labels))
    return out


@torch.no_grad()
def evaluate_latent_classifier(model: LatentClassifier, noised: list[tuple], device,
                               batch_size: int = 256) -> dict:
    """Valid loss and accuracy per noise quartile (q1 = least noise)."""
    model.eval()
    metrics, losses = {}, []
    for q, (x_t, t, y) in enumerate(noised, start=1):
        logits = torch.cat([model(x_t[i:i + batch_size].to(device), t[i:i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(x_t), batch_size)])
        loss = float(F.cross_entropy(logits, y))
        metrics[f"acc_q{q}"] = float((logits.argmax(1) == y).float().mean())
        metrics[f"loss_q{q}"] = loss
        losses.append(loss)
    metrics["val_loss"] = float(np.mean(losses))
    metrics["val_acc"] = float(np.mean([metrics[f"acc_q{q}"] for q in range(1, QUARTILES + 1)]))
    return metrics


def latent_classifier_step_loss(model: LatentClassifier, noise_scheduler: DDPMScheduler, labeled: LatentSet,
                                by_class: list[np.ndarray], batch_size: int, seed: int, index: int, rank: int = 0,
                                world: int = 1, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """The loss (and accuracy) of process ``rank``'s share of micro-batch ``index``: a class-balanced
    batch of labeled latents (``by_class``: the latent rows of each class), dihedral-augmented,
    noised at a uniform t. Seeded by (seed, index) and drawn for the global batch of ``batch_size``
    x ``world`` items, of which this process takes rows ``[rank*batch_size, (rank+1)*batch_size)``;
    the caller wraps it in autocast."""
    n, mine = batch_size * world, process_rows(batch_size, rank)
    rng = step_rng(seed, index, stream=5)
    ks = rng.integers(0, len(by_class), size=n)  # class-balanced batches
    items = np.array([rng.choice(by_class[k]) for k in ks])
    g = step_generator(seed, index, stream=5)
    z = random_dihedral(labeled.sample(items, g).cpu(), g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    x_t = noise_scheduler.add_noise(z, torch.randn(z.shape, generator=g), t)
    logits = model(x_t[mine].to(device), t[mine].to(device))
    y = torch.as_tensor(ks[mine], device=device)
    return F.cross_entropy(logits.float(), y), float((logits.argmax(1) == y).float().mean())


def train_latent_classifier(folder: Path, model: LatentClassifier, noise_scheduler: DDPMScheduler,
                            labeled: LatentSet, y: torch.Tensor, valid: LatentSet, y_valid: torch.Tensor, train,
                            *, seed: int, eval_every: int, device: str = "auto") -> dict:
    """Train p(y | x_t, t) on noised labeled latents; keep the lowest-valid-loss model in
    ``folder/classifier`` (with ``best.json``); returns the kept model's valid metrics.

    ``train`` is a ``TrainCfg``; checkpoints and logs go to ``folder/classifier_training``.
    """
    num_classes = int(model.config.num_classes)
    accelerator = make_accelerator(device, train.mixed_precision)
    opt, sched = make_optimizer(model.parameters(), train.lr, train.weight_decay,
                                lr_lambda(train.lr_schedule, train.warmup_steps, train.steps))
    # The schedule is not prepared: accelerate would step it once per process per optimiser step.
    model, opt = accelerator.prepare(model, opt)
    dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    by_class = [torch.nonzero(y == k).flatten().numpy() for k in range(num_classes)]
    noised = noised_valid(valid, y_valid, noise_scheduler, seed)
    train_dir = folder / "classifier_training"
    best_file = folder / CLASSIFIER / "best.json"

    def micro_loss(step: int, m: int) -> tuple[torch.Tensor, dict]:
        with accelerator.autocast():
            loss, acc = latent_classifier_step_loss(model, noise_scheduler, labeled, by_class, train.batch_size, seed,
                                                    step * train.gradient_accumulation + m, rank, world, dev)
        return loss, {"loss": loss.item(), "acc": acc}

    def step_fn(step: int) -> dict:
        model.train()
        return accumulate_step(accelerator, model, opt, sched, lambda m: micro_loss(step, m),
                               train.gradient_accumulation, train.grad_clip)

    def on_eval(step: int) -> None:
        metrics = {"step": step, **evaluate_latent_classifier(accelerator.unwrap_model(model), noised, dev)}
        io.append_jsonl(train_dir / "valid.jsonl", metrics)
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if best is None or metrics["val_loss"] < best["val_loss"]:
            with io.atomic_path(folder / CLASSIFIER) as tmp:
                accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
                io.write_json(tmp / "best.json", metrics)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=eval_every, images_per_step=train.batch_size * train.gradient_accumulation,
                    description="latent classifier")
    run_loop(spec, step_fn, folder=train_dir, state=TrainState(model, opt, sched), accelerator=accelerator,
             on_sample=on_eval)
    return json.loads(best_file.read_text())
