"""KL autoencoder (diffusers AutoencoderKL): construction, tile <-> tensor, losses, discriminator."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from histodiffusion.config import AutoencoderArch
from histodiffusion.errors import UserError


def build_autoencoder(arch: AutoencoderArch, resolution: int) -> AutoencoderKL:
    """An AutoencoderKL with ``len(arch.channels)`` levels (downsampling ``arch.downsample_factor``).

    ``scaling_factor`` starts at 1; after training the measured latent normalisation (per-channel
    mean and std, and the overall scale) is written into the config.
    """
    n = len(arch.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.channels), layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels, norm_num_groups=arch.norm_num_groups,
        sample_size=resolution, scaling_factor=1.0, mid_block_add_attention=arch.mid_attention,
    )


def tiles_to_tensor(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 tiles -> (N, 3, H, W) float in [-1, 1]."""
    t = torch.as_tensor(np.asarray(tiles)) if not isinstance(tiles, torch.Tensor) else tiles
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_tiles(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 (clamped, rounded)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def latent_normalization(vae_config) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(scaling_factor, latents_mean, latents_std) from an autoencoder config (means/stds may be None)."""
    mean = getattr(vae_config, "latents_mean", None)
    std = getattr(vae_config, "latents_std", None)
    return (float(vae_config.scaling_factor), None if mean is None else torch.tensor(mean),
            None if std is None else torch.tensor(std))


def normalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw latents -> diffusion space: (z - latents_mean) * scaling_factor / latents_std.

    The convention of diffusers' SDXL pipelines; without per-channel statistics it is
    z * scaling_factor, the original LDM recipe.
    """
    sf, mean, std = latent_normalization(vae_config)
    if mean is None or std is None:
        return z * sf
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return (z - mean.view(shape).to(z)) * sf / std.view(shape).to(z)


def denormalize_latents(z_n: torch.Tensor, vae_config) -> torch.Tensor:
    """Diffusion space -> raw latents (the inverse of :func:`normalize_latents`)."""
    sf, mean, std = latent_normalization(vae_config)
    if mean is None or std is None:
        return z_n / sf
    shape = (1, -1) + (1,) * (z_n.ndim - 2)
    return z_n * std.view(shape).to(z_n) / sf + mean.view(shape).to(z_n)


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``images`` in [-1, 1] (unscaled latents)."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images in [-1, 1] (undoes the stored normalisation first)."""
    return vae.decode(denormalize_latents(latents, vae.config)).sample.clamp(-1, 1)


def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] through the autoencoder (posterior mean, no sampling), clamped to [-1, 1]."""
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def reconstruct_tiles(vae: AutoencoderKL, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 tiles (N, H, W, 3) as the autoencoder gives them back (what it keeps of them)."""
    device = next(vae.parameters()).device
    parts = [tensor_to_tiles(reconstruct(vae, tiles_to_tensor(tiles[i:i + batch_size]).to(device)))
             for i in range(0, len(tiles), batch_size)]
    return np.concatenate(parts) if parts else np.zeros_like(tiles)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1], Gaussian window, differentiable."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(window, x.shape[-1] - (1 - x.shape[-1] % 2))
    return structural_similarity_index_measure((x.float() + 1) / 2, (y.float() + 1) / 2, data_range=1.0,
                                               kernel_size=size, reduction="none")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): a map of real/fake logits over image patches."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            blocks += [nn.Conv2d(c, nxt, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            c = nxt
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def load_lpips(weights: str | None = None) -> nn.Module:
    """LPIPS (VGG) as a frozen module, or a UserError saying how to get the weights offline."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False)
    except Exception as err:  # the VGG backbone is downloaded by torchvision on first use
        raise UserError(
            "the perceptual (LPIPS) loss needs torchvision's VGG-16 weights, which could not be loaded "
            f"({type(err).__name__}: {err}). Place vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints "
            "(or run once with network), or set autoencoder.perceptual_weight: 0."
        ) from err
    return metric.eval().requires_grad_(False)
