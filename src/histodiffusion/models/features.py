"""A histology feature space that works offline, plus optional Inception-v3 features.

ImageNet Inception features are a poor and often unavailable (offline) yardstick for H&E tiles,
so the project trains its own small encoder on the unlabeled pool. Method: SimCLR (Chen et al.
2020). Two augmented views of each tile in a batch are embedded by a timm backbone (``resnet18``
by default, ``resnet10t`` for a lighter one; random init, ``num_classes=0`` -> global pooled
features) and a projection head MLP (dim -> 256 -> 128); the NT-Xent loss (temperature 0.2)
pulls the two views of a tile together and pushes the other 2N - 2 views away. Augmentations act
on batched tensors and suit histology: random resized crop (area 0.35-1, aspect 3/4-4/3,
``grid_sample``), the 8 dihedral flips/rotations (tissue has no orientation), moderate brightness,
contrast and saturation jitter, a per-channel gain of 0.9-1.1 standing in for stain variation
(kept mild so colour stays informative for judging generated tiles), and an optional gaussian
blur. All randomness (init, batch sampling, augmentations) comes from ``seed``.

Features for the metrics are the pooled backbone output, L2-normalised; the projection head is
only used by the loss.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from histodiffusion import io
from histodiffusion.data.augment import random_dihedral
from histodiffusion.errors import UserError
from histodiffusion.models.autoencoder import tiles_to_tensor
from histodiffusion.progress import progress_bar

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


class FeatureEncoder(nn.Module):
    """timm backbone (pooled, L2-normalised features) with a SimCLR projection head for training."""

    def __init__(self, backbone: str = "resnet18", resolution: int = 64, proj_hidden: int = 256,
                 proj_dim: int = 128):
        super().__init__()
        if not timm.is_model(backbone):
            raise UserError(f"unknown feature backbone {backbone!r}: use a timm model name such as "
                            "'resnet18' or 'resnet10t'")
        self.backbone_name = backbone
        self.resolution = int(resolution)
        self.proj_hidden, self.proj_dim = proj_hidden, proj_dim
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        self.dim = int(self.backbone.num_features)
        self.head = nn.Sequential(nn.Linear(self.dim, proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden, proj_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, dim) L2-normalised features."""
        return F.normalize(self.backbone(images), dim=1)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, proj_dim) projections for the contrastive loss."""
        return self.head(self.backbone(images))

    def config(self) -> dict:
        """The constructor arguments and feature dimension, as stored in config.json."""
        return {"kind": "simclr", "backbone": self.backbone_name, "dim": self.dim,
                "resolution": self.resolution, "proj_hidden": self.proj_hidden, "proj_dim": self.proj_dim}


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (N, H, W, 3) uint8, got shape {tiles.shape} dtype {tiles.dtype}")
    return tiles


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)).float().to(device)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random area fraction and aspect of each (N, C, H, W) image and resize it back to (H, W)."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *scale, generator, dev)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev))
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (2 * _uniform(n, 0, 1, generator, dev) - 1) * (1 - w)
    cy = (2 * _uniform(n, 0, 1, generator, dev) - 1) * (1 - h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, channel_gain: float = 0.1) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and per-channel (stain-like) gain of (N, 3, H, W) in [-1, 1]."""
    n, dev = x.shape[0], x.device
    y = (x + 1) / 2
    y = y * _uniform(n, 1 - brightness, 1 + brightness, generator, dev).view(n, 1, 1, 1)
    gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    y = mean + (y - mean) * _uniform(n, 1 - contrast, 1 + contrast, generator, dev).view(n, 1, 1, 1)
    gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
    y = gray + (y - gray) * _uniform(n, 1 - saturation, 1 + saturation, generator, dev).view(n, 1, 1, 1)
    gain = (1 - channel_gain + 2 * channel_gain * torch.rand(n, 3, generator=generator)).to(dev)
    y = y * gain.view(n, 3, 1, 1)
    return y.clamp(0, 1) * 2 - 1


def random_blur(x: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                sigma: tuple[float, float] = (0.1, 1.5), size: int = 5) -> torch.Tensor:
    """Gaussian-blur each (N, C, H, W) image with probability ``p`` (random sigma, separable kernel)."""
    n, c, h, w = x.shape
    dev = x.device
    s = _uniform(n, *sigma, generator, dev)
    s = torch.where(_uniform(n, 0, 1, generator, dev) < p, s, torch.full_like(s, 1e-3))
    t = torch.arange(size, device=dev, dtype=x.dtype) - size // 2
    k = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view of a (N, 3, H, W) batch in [-1, 1]: crop, dihedral, colour jitter, blur."""
    x = random_resized_crop(x, generator)
    x = random_dihedral(x, generator)
    x = color_jitter(x, generator)
    return random_blur(x, generator)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent loss of paired projections (N, P): each view's positive is the other view of its tile."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def _logger(log: Callable[[dict], None] | str | os.PathLike | None) -> Callable[[dict], None]:
    if log is None:
        return lambda record: None
    if callable(log):
        return log
    return lambda record: io.append_jsonl(log, record)


def train_feature_encoder(tiles: np.ndarray, steps: int, batch_size: int, lr: float, seed: int,
                          backbone: str = "resnet18", device: str | torch.device = "cpu", progress: bool = True,
                          log: Callable[[dict], None] | str | os.PathLike | None = None,
                          temperature: float = 0.2, weight_decay: float = 1e-4, warmup_steps: int | None = None,
                          log_every: int = 50) -> FeatureEncoder:
    """Train a SimCLR feature encoder on unlabeled tiles (deterministic given ``seed``).

    Args:
        tiles: (N, H, W, 3) uint8 tiles, N >= 2 (square tiles; H is stored as the resolution).
        steps: optimisation steps.
        batch_size: tiles per step (two views each), clipped to N.
        lr: peak AdamW learning rate (linear warmup, then cosine decay to 0).
        seed: seed of the initialisation, batch sampling and augmentations.
        backbone: timm model name (``resnet18``, ``resnet10t``, ...).
        device: where to train.
        progress: show a progress bar.
        log: callable receiving ``{"step", "loss", "lr"}`` records, or a JSON-lines path to append them to.
        temperature: NT-Xent temperature.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup length (default: 5% of ``steps``).
        log_every: steps between log records (the last step is always logged).

    Returns:
        The trained encoder, in eval mode, on ``device``.
    """
    tiles = _check_tiles(tiles)
    n = len(tiles)
    batch = min(batch_size, n)
    if batch < 2:
        raise ValueError(f"contrastive training needs at least 2 tiles per batch, got {batch}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = FeatureEncoder(backbone, resolution=tiles.shape[1])
    encoder.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, round(0.05 * steps)) if warmup_steps is None else max(1, warmup_steps)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    write = _logger(log)
    data = torch.from_numpy(np.ascontiguousarray(tiles))
    order, pos, window = torch.randperm(n, generator=gen), 0, []
    with progress_bar("features", total=steps, enabled=progress, unit="steps") as advance:
        for step in range(steps):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=gen), 0
            x = tiles_to_tensor(data[order[pos:pos + batch]]).to(device)
            pos += batch
            lr_now = opt.param_groups[0]["lr"]
            loss = nt_xent(encoder.project(augment(x, gen)), encoder.project(augment(x, gen)), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            window.append(value)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                write({"step": step + 1, "loss": float(np.mean(window)), "lr": lr_now})
                window = []
            advance(1, loss=round(value, 4))
    return encoder.eval()


def save_encoder(encoder: FeatureEncoder, folder: str | os.PathLike) -> Path:
    """Write ``encoder`` to ``folder`` (model.safetensors + config.json), atomically."""
    folder = Path(folder)
    with io.atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(encoder.config(), indent=2) + "\n", encoding="utf-8")
    return folder


def load_encoder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureEncoder:
    """Load an encoder written by ``save_encoder`` (eval mode, on ``device``)."""
    folder = Path(folder)
    cfg = io.read_json(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} does not exist: retrain the feature encoder")
    encoder = FeatureEncoder(cfg["backbone"], cfg["resolution"], cfg.get("proj_hidden", 256), cfg.get("proj_dim", 128))
    encoder.load_state_dict(load_file(weights))
    return encoder.to(device).eval()


@torch.no_grad()
def extract_features(encoder: FeatureEncoder, tiles: np.ndarray, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """L2-normalised encoder features of tiles (resized to the encoder's resolution when they differ).

    Args:
        encoder: a trained ``FeatureEncoder`` (used in eval mode; its mode is restored after).
        tiles: (N, H, W, 3) uint8 tiles.
        batch_size: tiles per forward pass.
        device: where to run the encoder (the encoder is moved there).

    Returns:
        (N, D) float32 features.
    """
    tiles = _check_tiles(tiles)
    was_training = encoder.training
    encoder.to(device).eval()
    r = encoder.resolution
    out = [np.zeros((0, encoder.dim), np.float32)]
    for i in range(0, len(tiles), batch_size):
        x = tiles_to_tensor(tiles[i:i + batch_size]).to(device)
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        out.append(encoder(x).float().cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out)


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """``weights_path``, else torch-fidelity's cache file ``$TORCH_HOME/hub/checkpoints/<weights>``."""
    if weights_path:
        return Path(weights_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _torch_fidelity_installed() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_available(weights_path: str | os.PathLike | None = None) -> bool:
    """Whether FID-Inception features can be computed offline (weights file present, torch-fidelity installed)."""
    return inception_weights_path(weights_path).is_file() and _torch_fidelity_installed()


@torch.no_grad()
def inception_features(tiles: np.ndarray, weights_path: str | os.PathLike | None = None, batch_size: int = 64,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Inception-v3 2048-d pool features of tiles, as torchmetrics' FID computes them (never downloads).

    Args:
        tiles: (N, H, W, 3) uint8 tiles (resized to 299 inside the network).
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; None looks in
            ``$TORCH_HOME/hub/checkpoints``.
        batch_size: tiles per forward pass.
        device: where to run the network.

    Returns:
        (N, 2048) float64 features.

    Raises:
        UserError: the weights file is missing or torch-fidelity is not installed.
    """
    path = inception_weights_path(weights_path)
    if not path.is_file():
        raise UserError(
            f"Inception-v3 weights not found: {path} does not exist. Download {INCEPTION_WEIGHTS} "
            f"({INCEPTION_URL}) and put it at {inception_weights_path(None)} or give its path in the "
            "config; until then the Inception (FID/KID) columns are skipped."
        )
    if not _torch_fidelity_installed():
        raise UserError("Inception-v3 features need torch-fidelity: pip install torch-fidelity; until then "
                        "the Inception (FID/KID) columns are skipped.")
    tiles = _check_tiles(tiles)
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path)).to(device)
    out = [np.zeros((0, 2048))]
    for i in range(0, len(tiles), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)
