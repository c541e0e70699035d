"""Denoising UNet (diffusers UNet2DModel) built from a size preset."""

from __future__ import annotations

from diffusers import UNet2DModel

from histodiffusion.config import UNetArch


def build_unet(arch: UNetArch, sample_size: int, channels: int, num_classes: int | None = None) -> UNet2DModel:
    """A UNet over (channels, sample_size, sample_size) latents.

    Level i works at ``sample_size / 2**i`` latent pixels and has self-attention when that edge is
    in ``arch.attention_resolutions``. ``num_classes`` adds class embeddings (the class-conditional
    baseline generator); None builds the unconditional model.
    """
    attn = [sample_size // 2**i in arch.attention_resolutions for i in range(len(arch.channels))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(arch.channels),
        layers_per_block=arch.layers_per_block, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups, dropout=arch.dropout,
        num_class_embeds=num_classes,
    )


def count_parameters(model) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
