"""Denoising UNet (diffusers UNet2DModel): construction, saving and loading with its scheduler."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from histodiffusion import io
from histodiffusion.models import from_folder

UNET, SCHEDULER = "unet", "scheduler"
ADAPT = "adapt"  # the folder of a finetune stage that holds its domain-adapted UNet


def build_unet(sample_size: int, in_channels: int, channels: list[int], layers_per_block: int = 2,
               attention_resolutions: list[int] = (), attention_head_dim: int = 32, norm_num_groups: int = 32,
               dropout: float = 0.0, num_classes: int | None = None) -> UNet2DModel:
    """A UNet over (in_channels, sample_size, sample_size) latents.

    Level i works at ``sample_size / 2**i`` latent pixels and has self-attention when that edge is
    in ``attention_resolutions``. ``num_classes`` adds class embeddings (the class-conditional
    baseline); None builds the unconditional model.
    """
    attn = [sample_size // 2**i in attention_resolutions for i in range(len(channels))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups, dropout=dropout, num_class_embeds=num_classes,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def save_unet(unet: UNet2DModel, noise_scheduler: DDPMScheduler, folder: Path) -> None:
    """Write ``folder/unet`` and ``folder/scheduler`` as diffusers folders (safetensors), atomically."""
    with io.atomic_path(Path(folder) / UNET) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    with io.atomic_path(Path(folder) / SCHEDULER) as tmp:
        noise_scheduler.save_pretrained(tmp)


def load_unet(folder: Path, device: torch.device | str = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """A saved UNet (``folder/unet``) and its training scheduler (``folder/scheduler``), in eval mode."""
    folder = Path(folder)
    unet = from_folder(UNet2DModel, folder / UNET, f"no trained UNet at {folder / UNET}; run the stage that writes "
                       "it first").to(device).eval()
    return unet, DDPMScheduler.from_pretrained(folder / SCHEDULER)
