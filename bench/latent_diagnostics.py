"""How easy an autoencoder's latents are to diffuse, and what its decoder can show at best.

For each run directory's autoencoder, on 256 pool tiles (seeded):
- **spectrum**: the radially averaged power spectrum of the normalised latents beside that of the
  image area-downsampled to the latent size; the share of power at radius >= latent edge / 4. A
  diffusion model makes the low frequencies first; latents with more high-frequency power than
  the image carry less of the tile's layout where the model looks first (Skorokhodov et al. 2025).
- **half-scale PSNR**: latents average-pooled by 2, decoded, against the image average-pooled by
  2 (what ``autoencoder.scale_equivariance_weight`` trains).
- **noise PSNR**: decoded latents with Gaussian noise of 0.2 and 0.4 (in units of the normalised
  latents' std) against the clean reconstruction: how strongly the decoder amplifies latent error.
- a grid per autoencoder: real tiles, reconstructions (the best a sample can look), and decodes
  of the noised latents.

    python bench/latent_diagnostics.py --run preset=/work/runs/trials/ae-64px-f4-pc-rerun \\
        --run scale-eq=/work/runs/trials/ae-64px-f4-pc-se --out bench/results/pretrain_trials/latents
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histodiffusion.cli import guarded
from histodiffusion.data.cache import TileCache
from histodiffusion.io import write_json, write_text
from histodiffusion.models.autoencoder import (
    denormalize_latents,
    normalize_latents,
    psnr,
    tensor_to_tiles,
    tiles_to_tensor,
)
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.viz import grid, save_image

NOISE = (0.2, 0.4)


def radial_power(a: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> power per integer radius of the centred 2-D spectrum (mean removed), summing to 1."""
    a = a - a.mean(dim=(2, 3), keepdim=True)
    p = torch.fft.fftshift(torch.fft.fft2(a).abs() ** 2, dim=(-2, -1)).mean(dim=(0, 1))
    h = p.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    r = ((yy - h // 2) ** 2 + (xx - h // 2) ** 2).float().sqrt().round().long().flatten()
    total = torch.zeros(int(r.max()) + 1, dtype=p.dtype).index_add_(0, r, p.flatten())
    count = torch.zeros_like(total).index_add_(0, r, torch.ones_like(p.flatten()))
    prof = total / count
    return (prof / prof.sum()).numpy()


def _decode(vae, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Raw latents -> images in [-1, 1], in batches."""
    return torch.cat([vae.decode(z[i:i + batch]).sample for i in range(0, len(z), batch)]).clamp(-1, 1)


@torch.no_grad()
def diagnose(run: Path, n: int, seed: int) -> tuple[dict, np.ndarray]:
    vae = load_vae(run / "autoencoder").eval()
    cache = TileCache(run / "data" / "cache" / "pool")
    rows = np.sort(np.random.default_rng(seed).choice(len(cache), size=min(n, len(cache)), replace=False))
    x = tiles_to_tensor(cache.take(rows))
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
    zn = normalize_latents(z, vae.config)
    edge = zn.shape[-1]
    lat, img = radial_power(zn), radial_power(F.interpolate(x, size=(edge, edge), mode="area"))
    rec, half = _decode(vae, z), _decode(vae, F.avg_pool2d(z, 2))
    g = torch.Generator().manual_seed(seed)
    result = {"tiles": len(rows), "latent_shape": list(zn.shape[1:]),
              "reconstruction_psnr_db": round(float(psnr(rec, x).mean()), 2),
              "half_scale_psnr_db": round(float(psnr(half, F.avg_pool2d(x, 2)).mean()), 2),
              "latent_channel_mean": [round(float(v), 3) for v in zn.mean(dim=(0, 2, 3))],
              "latent_channel_std": [round(float(v), 3) for v in zn.std(dim=(0, 2, 3))],
              "latent_high_freq_share": round(float(lat[edge // 4:].sum()), 3),
              "image_high_freq_share": round(float(img[edge // 4:].sum()), 3),
              "latent_spectrum": [round(float(v), 4) for v in lat],
              "image_spectrum": [round(float(v), 4) for v in img]}
    shown = [tensor_to_tiles(x[:8]), tensor_to_tiles(rec[:8])]
    for s in NOISE:
        noisy = denormalize_latents(zn + s * torch.randn(zn.shape, generator=g), vae.config)
        dec = _decode(vae, noisy)
        result[f"noise_{s}_psnr_db"] = round(float(psnr(dec, rec).mean()), 2)
        shown.append(tensor_to_tiles(dec[:8]))
    return result, np.concatenate(shown)


def markdown(results: dict[str, dict], command: str) -> str:
    lines = ["# Latent diagnostics of the autoencoders", "", f"Command: `{command}`",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}", "",
             "| autoencoder | run | latent | channel mean / std | reconstruction PSNR (dB) | half-scale PSNR (dB) | "
             "high-frequency power, latents (image) | noise 0.2 / 0.4 PSNR (dB) | grid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | `{r['run']}` | {'x'.join(map(str, r['latent_shape'][::-1]))} | "
                     f"{', '.join(map(str, r['latent_channel_mean']))} / {', '.join(map(str, r['latent_channel_std']))} | "
                     f"{r['reconstruction_psnr_db']} | {r['half_scale_psnr_db']} | {r['latent_high_freq_share']} "
                     f"({r['image_high_freq_share']}) | {r['noise_0.2_psnr_db']} / {r['noise_0.4_psnr_db']} | "
                     f"![]({name}.png) |")
    lines += ["", f"On {next(iter(results.values()))['tiles']} pool tiles. High-frequency power: the share of the "
              "spectrum at radius >= latent edge / 4, latents normalised; in brackets the same for the image "
              "downsampled to the latent size. Channel mean / std: per channel, of the normalised latents (posterior "
              "means), which the normalisation should put at 0 / 1. Grid rows: real tiles; reconstructions; decodes with latent noise "
              f"{NOISE[0]}; with noise {NOISE[1]}."]
    return "\n".join(lines) + "\n"


def run_arguments(ap: argparse.ArgumentParser, stage: str, tiles: int) -> None:
    """The options the diagnostics share: named run directories, the output folder, tiles and seed."""
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                    help=f"a run directory with a finished {stage} stage, under a short name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiles", type=int, default=tiles)
    ap.add_argument("--seed", type=int, default=0)


def named_runs(ap: argparse.ArgumentParser, items: list[str], option: str = "--run",
               value: str = "RUN_DIR") -> list[tuple[str, Path]]:
    """``NAME=RUN_DIR`` options as (name, path) pairs; a malformed one stops with a usage error."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"{option} {item!r}: expected NAME={value}")
        pairs.append((name, Path(path)))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(ap, "autoencoder", tiles=256)
    args = ap.parse_args()
    results = {}
    for name, path in named_runs(ap, args.run):
        result, tiles = diagnose(path, args.tiles, args.seed)
        results[name] = {"run": str(path), **result}
        save_image(grid(tiles, ncol=8), args.out / f"{name}.png", scale=2)
        print(name, {k: v for k, v in result.items() if "spectrum" not in k}, flush=True)
    write_json(args.out / "latent_diagnostics.json", results)
    write_text(args.out / "README.md", markdown(results, "python bench/latent_diagnostics.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    guarded(main)
