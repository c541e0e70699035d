"""Tile classifiers (timm backbones from scratch): training with early stopping on valid, prediction.

Used three times with identical code: the auxiliary classifier that selects synthetic tiles, the
downstream classifier of every evaluation arm, and the oracle of the class-fidelity benchmark.
Model selection only ever looks at the valid split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from histodiffusion.config import ImageClassifierCfg
from histodiffusion.data.augment import random_dihedral
from histodiffusion.metrics.classification import per_class_recall
from histodiffusion.progress import progress_bar
from histodiffusion.training.loop import step_generator, step_rng, warmup_cosine

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def build_image_classifier(backbone: str, num_classes: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs, randomly initialised."""
    return timm.create_model(backbone, pretrained=False, num_classes=num_classes)


def to_input(tiles: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return tiles.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    if strength == 0:
        return x
    n = x.shape[0]
    f = 1 + strength * (2 * torch.rand(3, n, 1, 1, 1, generator=g) - 1)
    x = x * f[0]  # brightness (in [-1, 1] space, about mid-grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * f[1] + mean  # contrast
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * f[2] + gray  # saturation
    return x.clamp(-1, 1)


def augment(tiles: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Standard augmentation of every arm: the 8 dihedral transforms and light colour jitter."""
    return color_jitter(random_dihedral(to_input(tiles), g), strength, g)


@dataclass
class TrainedClassifier:
    """A trained classifier, its kept step and validation history, and an optional temperature."""

    model: nn.Module
    best_step: int
    best_valid: dict
    history: list[dict] = field(default_factory=list)
    temperature: float = 1.0


@torch.no_grad()
def predict_logits(model: nn.Module, tiles: np.ndarray, device: torch.device | str = "cpu",
                   batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """Logits (N, K) for (N, H, W, 3) uint8 tiles."""
    model.eval()
    dtype = AUTOCAST[precision]
    out = []
    for i in range(0, len(tiles), batch_size):
        x = to_input(torch.as_tensor(np.ascontiguousarray(tiles[i:i + batch_size]))).to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature."""
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@torch.no_grad()
def penultimate_features(model: nn.Module, tiles: np.ndarray, device: torch.device | str = "cpu",
                         batch_size: int = 256) -> np.ndarray:
    """Pooled features before the classification layer (N, D) (timm ``forward_head(pre_logits=True)``)."""
    model.eval()
    out = []
    for i in range(0, len(tiles), batch_size):
        x = to_input(torch.as_tensor(np.ascontiguousarray(tiles[i:i + batch_size]))).to(device)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    return torch.cat(out).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the NLL of ``labels`` on held-out logits (Guo et al. 2017), by grid search."""
    best_t, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 241)):
        p = softmax(logits, t)[np.arange(len(labels)), labels]
        nll = float(-np.mean(np.log(np.clip(p, 1e-12, None))))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def _sample_weights(labels: np.ndarray, num_classes: int, class_balanced: bool) -> np.ndarray:
    if not class_balanced:
        return np.full(len(labels), 1.0 / len(labels))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = 1.0 / counts[labels]
    return w / w.sum()


def _valid_scores(model: nn.Module, tiles: np.ndarray, labels: np.ndarray, device, precision: str) -> dict:
    logits = predict_logits(model, tiles, device, precision=precision)
    loss = float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)))
    recall = per_class_recall(softmax(logits), labels)
    return {"valid_loss": loss, "valid_balanced_accuracy": float(np.nanmean(recall)),
            "valid_accuracy": float(np.mean(logits.argmax(1) == labels))}


def train_image_classifier(cfg: ImageClassifierCfg, train_tiles: np.ndarray, train_labels: np.ndarray,
                           valid_tiles: np.ndarray, valid_labels: np.ndarray, num_classes: int, seed: int,
                           device: torch.device | str = "cpu", description: str = "classifier",
                           progress: bool = True) -> TrainedClassifier:
    """Train from scratch; every ``eval_every`` steps score the valid split and keep the best weights.

    Args:
        train_tiles: (N, H, W, 3) uint8; train_labels: (N,) class indices.
        valid_tiles, valid_labels: the model-selection split (never the test split).
    Returns:
        The model with the weights of the best valid balanced accuracy (ties: lower valid loss).
    """
    torch.manual_seed(seed)
    model = build_image_classifier(cfg.backbone, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, floor=0.0))
    p = _sample_weights(train_labels, num_classes, cfg.class_balanced)
    tiles_t, labels_t = torch.as_tensor(train_tiles), torch.as_tensor(train_labels, dtype=torch.long)
    dtype = AUTOCAST[cfg.precision]
    best: dict | None = None
    best_state, history = None, []
    with progress_bar(description, total=cfg.steps, enabled=progress, unit="steps") as advance:
        for step in range(cfg.steps):
            model.train()
            rows = torch.as_tensor(step_rng(seed, step, stream=11).choice(len(p), size=cfg.batch_size, p=p))
            x = augment(tiles_t[rows], cfg.color_jitter, step_generator(seed, step, stream=11)).to(device)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), labels_t[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            advance(1, loss=round(loss.item(), 4))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                scores = {"step": step + 1, "train_loss": loss.item(),
                          **_valid_scores(model, valid_tiles, valid_labels, device, cfg.precision)}
                history.append(scores)
                key = (scores["valid_balanced_accuracy"], -scores["valid_loss"])
                if best is None or key > (best["valid_balanced_accuracy"], -best["valid_loss"]):
                    best, best_state = scores, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)  # type: ignore[arg-type]
    return TrainedClassifier(model.eval(), best["step"], best, history)  # type: ignore[index]
