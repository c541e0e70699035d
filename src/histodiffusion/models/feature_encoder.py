"""A histology feature space that works offline (a SimCLR encoder trained on the pool), plus
optional Inception-v3 features.

ImageNet Inception features are a poor and often unavailable (offline) yardstick for H&E tiles,
so the project trains its own encoder on the unlabeled pool
(:func:`histodiffusion.training.simclr.train_feature_encoder`): a timm backbone (random init,
``num_classes=0`` -> global pooled features) and a projection head MLP (dim -> 256 -> 128) used
only by the contrastive loss. Features for the metrics are the pooled backbone output,
L2-normalised. The same backbone initialises the ``ssl`` arms' downstream classifiers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from histodiffusion import io
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.errors import UserError
from histodiffusion.models import from_folder

ENCODER = "encoder"  # the folder of a features stage that holds the encoder
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


class FeatureEncoder(ModelMixin, ConfigMixin):
    """timm backbone (``architecture``; pooled, L2-normalised features) with a SimCLR projection head
    for training.

    A diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained`` / ``from_pretrained`` write and
    read a folder with ``config.json`` and safetensors weights, like every model of the project.
    """

    @register_to_config
    def __init__(self, architecture: str = "resnet18", resolution: int = 64, proj_hidden: int = 256,
                 proj_dim: int = 128):
        super().__init__()
        if not timm.is_model(architecture):
            raise UserError(f"unknown feature backbone {architecture!r}: use a timm model name such as "
                            "'resnet18' or 'resnet10t'")
        self.resolution = int(resolution)
        self.backbone = timm.create_model(architecture, pretrained=False, num_classes=0)
        self.dim = int(self.backbone.num_features)
        self.head = nn.Sequential(nn.Linear(self.dim, proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(proj_hidden, proj_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, dim) L2-normalised features."""
        return F.normalize(self.backbone(images), dim=1)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, proj_dim) projections for the contrastive loss."""
        return self.head(self.backbone(images))


def check_tiles(tiles: np.ndarray) -> np.ndarray:
    """``tiles`` as an array, or a ValueError unless it is (N, H, W, 3) uint8."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (N, H, W, 3) uint8, got shape {tiles.shape} dtype {tiles.dtype}")
    return tiles


def save_encoder(encoder: FeatureEncoder, folder: str | os.PathLike) -> Path:
    """Write ``encoder`` to ``folder`` (config.json + safetensors), atomically."""
    with io.atomic_path(folder) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def load_encoder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureEncoder:
    """Load an encoder written by :func:`save_encoder` (eval mode, on ``device``)."""
    folder = Path(folder)
    missing = f"no feature encoder at {folder}: run the stage that trains it (`histodiffusion features CONFIG`) first"
    return from_folder(FeatureEncoder, folder, missing).to(device).eval()


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
    tiles = check_tiles(tiles)
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
    tiles = check_tiles(tiles)
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path)).to(device)
    out = [np.zeros((0, 2048))]
    for i in range(0, len(tiles), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).permute(0, 3, 1, 2).to(device)
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)
