"""Augmentations of (N, C, H, W) batches, seeded by a ``torch.Generator``.

Two recipes use them: :func:`classifier_augment` (every tile classifier: the 8 dihedral transforms
and a light colour jitter) and :func:`simclr_view` (one view of the self-supervised encoder:
random resized crop, dihedral, stain-like colour jitter, blur). The dihedral transforms also
augment latents (tissue has no orientation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from histodiffusion.data.images import tiles_to_tensor


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply dihedral transform ``k`` in 0..7 to (..., H, W): k % 4 quarter turns, then a flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent random dihedral transform to each item of a (N, C, H, W) batch."""
    return dihedral_each(x, torch.randint(0, 8, (x.shape[0],), generator=generator))


def dihedral_each(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Apply dihedral transform ``ks[i]`` (in 0..7) to item i of a (N, C, H, W) batch."""
    out = torch.empty_like(x)
    for k in range(8):
        idx = (ks == k).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = dihedral(x[idx], k)
    return out


# ------------------------------------------------------------------------ tile classifiers
def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength] of
    (N, 3, H, W) images in [-1, 1]."""
    if strength == 0:
        return x
    n = x.shape[0]
    f = (1 + strength * (2 * torch.rand(3, n, 1, 1, 1, generator=generator) - 1)).to(x.device)
    x = x * f[0]  # brightness (in [-1, 1] space, about mid-grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * f[1] + mean  # contrast
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * f[2] + gray  # saturation
    return x.clamp(-1, 1)


def classifier_augment(tiles: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """(N, H, W, 3) uint8 tiles -> augmented (N, 3, H, W) images in [-1, 1]: the same augmentation
    in every arm (the 8 dihedral transforms and light colour jitter)."""
    return color_jitter(random_dihedral(tiles_to_tensor(tiles), generator), jitter, generator)


# ------------------------------------------------------------------------------- SimCLR
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


def stain_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2,
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


def simclr_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view of a (N, 3, H, W) batch in [-1, 1]: crop, dihedral, stain jitter, blur."""
    x = random_resized_crop(x, generator)
    x = random_dihedral(x, generator)
    x = stain_jitter(x, generator)
    return random_blur(x, generator)
