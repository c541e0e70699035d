"""Latent cache: tiles encoded once into posterior moments, stored as safetensors shards.

Raw (unscaled) posterior mean and std are stored; the latent normalisation is applied just in
time (edm2-style). LDM training samples z = mean + std * n from the moments at every step,
normalises it with the autoencoder's stored statistics, and never touches images.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from histodiffusion import io
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.errors import UserError
from histodiffusion.progress import progress_bar

INDEX = "index.json"


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
def encode_to_shards(vae: torch.nn.Module, cache: TileCache, rows: np.ndarray, folder: Path,
                     device: torch.device | str = "cpu", batch_size: int = 64, shard_size: int = 8192,
                     progress: bool = True) -> dict:
    """Encode ``cache[rows]`` with an ``AutoencoderKL`` into ``folder/shard-*.safetensors`` (fp16
    moments); resumes by shard."""
    folder.mkdir(parents=True, exist_ok=True)
    vae = vae.to(device).eval()
    shards = []
    with progress_bar("encoding latents", total=len(rows), enabled=progress, unit="tiles") as advance:
        for s, start in enumerate(range(0, len(rows), shard_size)):
            chunk = rows[start:start + shard_size]
            path = folder / f"shard-{s:05d}.safetensors"
            if not path.is_file():
                means, stds = [], []
                for i in range(0, len(chunk), batch_size):
                    x = tiles_to_tensor(cache.take(chunk[i:i + batch_size])).to(device)
                    dist = vae.encode(x).latent_dist
                    means.append(dist.mean.half().cpu())
                    stds.append(dist.std.half().cpu())
                with io.atomic_path(path) as tmp:
                    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                               "rows": torch.as_tensor(chunk, dtype=torch.int64)}, str(tmp))
            shards.append(path.name)
            advance(len(chunk))
    sf, mean, std = latent_normalization(vae.config)
    index = {"shards": shards, "n": int(len(rows)), "scaling_factor": sf,
             "latents_mean": None if mean is None else mean.tolist(), "latents_std": None if std is None else std.tolist()}
    io.write_json(folder / INDEX, index)
    return index


class LatentSet:
    """All latent moments of a folder in memory: ``sample(rows, generator)`` gives scaled z."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise UserError(f"latent cache {folder} is missing or unfinished; rerun the stage that writes it")
        index = json.loads((folder / INDEX).read_text())
        parts = [load_file(str(folder / name)) for name in index["shards"]]
        self.mean = torch.cat([p["mean"] for p in parts]).float().to(device)
        self.std = torch.cat([p["std"] for p in parts]).float().to(device)
        self.rows = torch.cat([p["rows"] for p in parts])
        self.normalization = SimpleNamespace(scaling_factor=index["scaling_factor"],
                                             latents_mean=index.get("latents_mean"),
                                             latents_std=index.get("latents_std"))

    @classmethod
    def from_moments(cls, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float = 1.0) -> LatentSet:
        """A latent set held in memory (no cache folder): posterior moments (N, C, h, w) and a
        global scaling factor; for benchmarks and tests."""
        latents = cls.__new__(cls)
        latents.mean, latents.std = mean.float(), std.float()
        latents.rows = torch.arange(len(mean))
        latents.normalization = SimpleNamespace(scaling_factor=scaling_factor, latents_mean=None, latents_std=None)
        return latents

    def __len__(self) -> int:
        return len(self.mean)

    def to(self, device: torch.device | str) -> LatentSet:
        """Move the moments to ``device`` (in place); returns self."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, h, w) of one latent."""
        return tuple(self.mean.shape[1:])

    def sample(self, idx: torch.Tensor | np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """Normalised posterior samples of the latents at ``idx`` (the diffusion model's space)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mean, std = self.mean[idx], self.std[idx]
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return normalize_latents(mean + std * noise, self.normalization)


def encode_split(vae: torch.nn.Module, cache: TileCache, rows: np.ndarray, labels: np.ndarray, out: Path,
                 device: torch.device | str = "cpu") -> tuple[LatentSet, torch.Tensor]:
    """Encode the tiles ``cache[rows]`` once into ``out`` (the main process, under accelerate; the
    others wait) and return their latents with the label index of each latent."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process and not (out / INDEX).is_file():
        encode_to_shards(vae, cache, rows, out, device=device, progress=False)
    state.wait_for_everyone()
    latents = LatentSet(out)
    label_of = dict(zip(rows.tolist(), labels.tolist(), strict=True))
    return latents, torch.tensor([label_of[int(row)] for row in latents.rows], dtype=torch.long)
