"""KL autoencoder (diffusers AutoencoderKL): construction, saving and loading, reconstruction,
image-quality measures and the losses of its training (SSIM, LPIPS, patch discriminator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from histodiffusion import io
from histodiffusion.data.images import tensor_to_tiles, tiles_to_tensor
from histodiffusion.data.latents import denormalize_latents
from histodiffusion.errors import UserError
from histodiffusion.models import from_folder

VAE = "vae"


def build_autoencoder(resolution: int, channels: list[int], latent_channels: int = 3, layers_per_block: int = 1,
                      norm_num_groups: int = 32, mid_attention: bool = False,
                      downsample_factor: int | None = None) -> AutoencoderKL:
    """An AutoencoderKL with ``len(channels)`` levels: it downsamples by 2 ** (len(channels) - 1).

    ``scaling_factor`` starts at 1; after training the measured latent normalisation (per-channel
    mean and std, and the overall scale) is written into the config. ``downsample_factor``, when
    given, must agree with ``channels`` (the config states both).
    """
    n = len(channels)
    if downsample_factor is not None and downsample_factor != 2 ** (n - 1):
        raise ValueError(f"downsample_factor {downsample_factor} needs {downsample_factor.bit_length()} channel "
                         f"levels, got {n}")
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_num_groups,
        sample_size=resolution, scaling_factor=1.0, mid_block_add_attention=mid_attention,
    )


def save_vae(vae: AutoencoderKL, folder: Path) -> Path:
    """Write ``folder/vae`` as a diffusers folder (safetensors), atomically."""
    with io.atomic_path(Path(folder) / VAE) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return Path(folder) / VAE


def load_vae(folder: Path, device: torch.device | str = "cpu") -> AutoencoderKL:
    """The trained autoencoder in ``folder/vae`` (an autoencoder stage's folder), in eval mode."""
    path = Path(folder) / VAE
    missing = f"no trained autoencoder at {path}; run `histodiffusion train-autoencoder CONFIG` first"
    return from_folder(AutoencoderKL, path, missing).to(device).eval()


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
