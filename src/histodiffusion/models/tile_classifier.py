"""Tile classifiers (timm backbones): construction, prediction, features, temperature scaling.

One kind of model serves three roles with identical code: the auxiliary classifier that selects
synthetic tiles, the downstream classifier of every evaluation arm, and the oracle of the
class-fidelity benchmark. Training is :func:`histodiffusion.training.tile_classifier.train_tile_classifier`.
"""

from __future__ import annotations

import math

import numpy as np
import timm
import torch
from torch import nn

from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.devices import autocast_dtype


def build_tile_classifier(backbone: str, num_classes: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs, randomly initialised."""
    return timm.create_model(backbone, pretrained=False, num_classes=num_classes)


@torch.no_grad()
def predict_logits(model: nn.Module, tiles: np.ndarray, device: torch.device | str = "cpu",
                   batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """Logits (N, K) for (N, H, W, 3) uint8 tiles."""
    model.eval()
    dtype = autocast_dtype(precision)
    out = []
    for i in range(0, len(tiles), batch_size):
        x = tiles_to_tensor(tiles[i:i + batch_size]).to(device)
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
        x = tiles_to_tensor(tiles[i:i + batch_size]).to(device)
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
