"""Stages ``finetune`` (noise-aware latent classifier + domain adaptation) and ``conditional``.

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
from accelerate import PartialState

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.latents import LatentSet, encode_to_shards
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.errors import UserError
from histodiffusion.models.classifier import LatentClassifier
from histodiffusion.models.unet import build_unet, count_parameters
from histodiffusion.progress import console
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.base import Stage, StageContext, register
from histodiffusion.stages.data import split_rows
from histodiffusion.stages.pretrain import load_unet, train_diffusion
from histodiffusion.training.loop import (
    LoopSpec,
    accumulate_step,
    inference_device,
    lr_multiplier,
    make_accelerator,
    run_loop,
    step_generator,
    step_rng,
)

CLASSIFIER, ADAPT = "classifier", "adapt"
QUARTILES = 4


# ------------------------------------------------------------------------------ latents
def encode_split(cfg: ExperimentConfig, data: Path, vae_folder: Path, split: str, out: Path,
                 cap: int | None = None) -> tuple[LatentSet, torch.Tensor]:
    """Encode a split's tiles ('labeled/<budget>', 'valid', ...) once; returns latents and label indices."""
    cache, rows, labels = split_rows(data, split, cap, cfg.seed)
    state = PartialState()
    if state.is_main_process and not (out / "index.json").is_file():
        device = inference_device(cfg.device)
        encode_to_shards(load_vae(vae_folder, device), cache, rows, out, device=device, progress=False)
    state.wait_for_everyone()
    latents = LatentSet(out)
    label_of = dict(zip(rows.tolist(), labels.tolist(), strict=True))
    return latents, torch.tensor([label_of[int(row)] for row in latents.rows], dtype=torch.long)


def class_balanced_weights(labels: torch.Tensor) -> np.ndarray:
    """Sampling weight 1 / (count of the item's class): every class drawn equally often."""
    counts = torch.bincount(labels).double()
    return (1.0 / counts[labels]).numpy()


# --------------------------------------------------------------------------- classifier
def _noised_valid(latents: LatentSet, labels: torch.Tensor, scheduler, seed: int) -> list[tuple]:
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
def evaluate_classifier(model: LatentClassifier, noised: list[tuple], device, batch_size: int = 256) -> dict:
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


def build_classifier(cfg: ExperimentConfig, latent_shape: tuple[int, ...], classes: list[str]) -> LatentClassifier:
    """A LatentClassifier sized by ``finetune.classifier``."""
    c = cfg.finetune.classifier
    return LatentClassifier(in_channels=latent_shape[0], num_classes=len(classes), sample_size=latent_shape[1],
                            block_out_channels=tuple(c.channels), layers_per_block=c.layers_per_block,
                            attention_resolutions=tuple(c.attention_resolutions),
                            attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
                            dropout=c.dropout, class_names=tuple(classes))


def train_classifier(cfg: ExperimentConfig, folder: Path, labeled: LatentSet, y: torch.Tensor,
                     valid: LatentSet, y_valid: torch.Tensor, classes: list[str]) -> dict:
    """Train p(y | x_t, t) on noised labeled latents; keep the lowest-valid-loss model in ``folder/classifier``."""
    c, train = cfg.finetune.classifier, cfg.finetune.classifier.train
    torch.manual_seed(cfg.seed)
    scheduler = training_scheduler(cfg.diffusion)
    model = build_classifier(cfg, labeled.shape, classes)
    accelerator = make_accelerator(cfg.device, train.mixed_precision)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(train))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    device, rank, T = accelerator.device, accelerator.process_index, scheduler.config.num_train_timesteps
    by_class = [torch.nonzero(y == k).flatten().numpy() for k in range(len(classes))]
    noised = _noised_valid(valid, y_valid, scheduler, cfg.seed)
    train_dir = folder / "classifier_training"
    best_file = folder / CLASSIFIER / "best.json"

    def micro_loss(step: int, m: int) -> tuple[torch.Tensor, dict]:
        index = step * train.gradient_accumulation + m
        rng = step_rng(cfg.seed, index, rank, stream=5)
        ks = rng.integers(0, len(classes), size=train.batch_size)  # class-balanced batches
        items = np.array([rng.choice(by_class[k]) for k in ks])
        g = step_generator(cfg.seed, index, rank, stream=5)
        z = random_dihedral(labeled.sample(items, g).cpu(), g)
        t = torch.randint(0, T, (len(items),), generator=g)
        x_t = scheduler.add_noise(z, torch.randn(z.shape, generator=g), t)
        with accelerator.autocast():
            logits = model(x_t.to(device), t.to(device))
        loss = F.cross_entropy(logits.float(), torch.as_tensor(ks, device=device))
        return loss, {"loss": loss.item(), "acc": float((logits.argmax(1).cpu() == torch.as_tensor(ks)).float().mean())}

    def step_fn(step: int) -> dict:
        model.train()
        return accumulate_step(accelerator, model, opt, sched, lambda m: micro_loss(step, m),
                               train.gradient_accumulation, train.grad_clip)

    def on_eval(step: int) -> None:
        metrics = {"step": step, **evaluate_classifier(accelerator.unwrap_model(model), noised, device)}
        io.append_jsonl(train_dir / "valid.jsonl", metrics)
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if best is None or metrics["val_loss"] < best["val_loss"]:
            with io.atomic_path(folder / CLASSIFIER) as tmp:
                accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
                io.write_json(tmp / "best.json", metrics)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=c.eval_every, images_per_step=train.batch_size * train.gradient_accumulation,
                    description="latent classifier")
    run_loop(train_dir, accelerator, spec, step_fn, on_sample=on_eval)
    return json.loads(best_file.read_text())


def load_classifier(folder: Path, device: torch.device | str = "cpu") -> LatentClassifier:
    """The kept (best-on-valid) latent classifier of a finetune folder."""
    path = Path(folder) / CLASSIFIER
    if not (path / "config.json").is_file():
        raise UserError(f"no latent classifier at {path}; run `histodiffusion finetune CONFIG` first")
    return LatentClassifier.from_pretrained(path).to(device).eval()


def synthesis_unet_folder(cfg: ExperimentConfig, finetune_folder: Path, pretrain_folder: Path) -> Path:
    """Folder of the UNet that guided synthesis uses: domain-adapted, or the pre-trained one."""
    return finetune_folder / ADAPT if cfg.finetune.domain_adapt else pretrain_folder


# ------------------------------------------------------------------------------- stages
def run_finetune(ctx: StageContext) -> dict:
    """Encode the labeled subset and valid split, train the latent classifier, adapt the UNet."""
    cfg, ft = ctx.cfg, ctx.cfg.finetune
    data, vae_folder = ctx.upstream("data"), ctx.upstream("autoencoder")
    classes = io.read_json(data / "classes.json")
    labeled, y = encode_split(cfg, data, vae_folder, f"labeled/{ctx.budget_name}", ctx.folder / "latents" / "labeled")
    valid, y_valid = encode_split(cfg, data, vae_folder, "valid", ctx.folder / "latents" / "valid",
                                  cap=ft.classifier.eval_max)
    console.print(f"finetune {ctx.budget_name}: {len(labeled)} labeled latents, {len(valid)} valid latents, "
                  f"{len(classes)} classes")
    best = train_classifier(cfg, ctx.folder, labeled, y, valid, y_valid, classes)
    console.print("latent classifier (valid, kept checkpoint): " + ", ".join(
        f"{k} {best[k]:.3f}" for k in ("val_loss", "acc_q1", "acc_q2", "acc_q3", "acc_q4")))
    summary = {"classifier": best, "n_labeled": len(labeled), "domain_adapt": ft.domain_adapt}
    if ft.domain_adapt:
        unet, _ = load_unet(ctx.upstream("pretrain"))
        train_diffusion(cfg, ctx.folder / ADAPT, vae_folder, unet.train(), labeled, class_balanced_weights(y),
                        ft.train, True, 0, 16, f"finetune {ctx.budget_name}")
        records = io.read_jsonl(ctx.folder / ADAPT / "metrics.jsonl")
        summary["adapt_final_loss"] = records[-1]["loss"] if records else None
    return summary


def run_conditional(ctx: StageContext) -> dict:
    """Class-conditional UNet trained from scratch on the labeled subset only (no pre-training)."""
    cfg = ctx.cfg
    if not cfg.conditional.enabled:
        raise UserError("conditional.enabled is false in the config; set it to true to train the baseline")
    data, vae_folder = ctx.upstream("data"), ctx.upstream("autoencoder")
    classes = io.read_json(data / "classes.json")
    labeled, y = encode_split(cfg, data, vae_folder, f"labeled/{ctx.budget_name}", ctx.folder / "latents")
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    unet = build_unet(cfg.pretrain.unet, labeled.shape[1], labeled.shape[0], num_classes=len(classes))
    console.print(f"conditional baseline {ctx.budget_name}: UNet {count_parameters(unet) / 1e6:.2f}M from scratch "
                  f"on {len(labeled)} labeled latents")
    train_diffusion(cfg, ctx.folder, vae_folder, unet, labeled, class_balanced_weights(y), cfg.conditional.train,
                    True, 0, 4 * len(classes), f"conditional {ctx.budget_name}", labels=y)
    records = io.read_jsonl(ctx.folder / "metrics.jsonl")
    return {"final_loss": records[-1]["loss"] if records else None, "n_labeled": len(labeled)}


FINETUNE = register(Stage("finetune", ("diffusion", "finetune", "seed"), ("data", "labels", "autoencoder", "pretrain"),
                          run_finetune, per_budget=True, description="latent classifier + domain adaptation", distributed=True,
                          extendable=True))
CONDITIONAL = register(Stage("conditional", ("diffusion", "pretrain.unet", "conditional", "seed"),
                             ("data", "labels", "autoencoder"), run_conditional, per_budget=True,
                             description="class-conditional baseline, no pre-training", distributed=True,
                             extendable=True))
