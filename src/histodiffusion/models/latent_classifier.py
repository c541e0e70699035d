"""Noise-aware latent classifier p(y | x_t, t), assembled from diffusers building blocks.

The encoder half of a UNet (timestep embedding, down blocks, mid block) with a pooling head, as
in guided-diffusion's ``EncoderUNetModel`` (Dhariwal & Nichol 2021). It is a diffusers
``ModelMixin``/``ConfigMixin``, so ``save_pretrained`` / ``from_pretrained`` work like the UNet's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from histodiffusion.models import from_folder


class LatentClassifier(ModelMixin, ConfigMixin):
    """Logits over classes for noisy latents x_t (N, C, h, w) at timesteps t (N,)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, num_classes: int = 2, sample_size: int = 16,
                 block_out_channels: tuple[int, ...] = (64, 128, 128), layers_per_block: int = 1,
                 attention_resolutions: tuple[int, ...] = (), attention_head_dim: int = 32,
                 norm_num_groups: int = 32, dropout: float = 0.0, class_names: tuple[str, ...] = ()):
        super().__init__()
        ch = list(block_out_channels)
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, out in enumerate(ch):
            size = sample_size // 2**i
            self.down_blocks.append(get_down_block(
                "AttnDownBlock2D" if size in attention_resolutions else "DownBlock2D",
                num_layers=layers_per_block, in_channels=prev, out_channels=out, temb_channels=temb,
                add_downsample=i < len(ch) - 1, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=norm_num_groups, attention_head_dim=attention_head_dim, downsample_padding=1,
                dropout=dropout))
            prev = out
        self.mid_block = UNetMidBlock2D(in_channels=prev, temb_channels=temb, dropout=dropout, resnet_eps=1e-5,
                                        resnet_act_fn="silu", resnet_groups=norm_num_groups,
                                        attention_head_dim=attention_head_dim,
                                        add_attention=bool(attention_resolutions))
        self.head = nn.Sequential(nn.GroupNorm(norm_num_groups, prev), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(prev, num_classes))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(x_t)
        for block in self.down_blocks:
            h, _ = block(h, emb)
        h = self.mid_block(h, emb)
        return self.head(h)


CLASSIFIER = "classifier"


def load_latent_classifier(folder: Path, device: torch.device | str = "cpu") -> LatentClassifier:
    """The latent classifier kept in ``folder/classifier`` (a finetune stage's folder), in eval mode."""
    path = Path(folder) / CLASSIFIER
    missing = f"no latent classifier at {path}; run `histodiffusion finetune CONFIG` first"
    return from_folder(LatentClassifier, path, missing).to(device).eval()
