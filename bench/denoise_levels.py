"""At which noise level a pre-trained LDM loses the tissue layout (SDEdit-style probe).

For each run directory (a finished ``pretrain`` stage and its autoencoder), real pool latents
(posterior means, seeded choice) are noised to timestep t and denoised back to 0 with DDIM
(eta 0, about one step per 20 timesteps) by the EMA UNet, then decoded. At small t the model
only has to restore detail; at t = T - 1 it starts from (almost) pure noise and must invent the
layout, as in sampling. Reports, per start level, the PSNR of the decoded result against the
autoencoder's reconstruction of the same tile (how much of the real tile survives) and writes a
grid: reconstructions on the first row, then one row per level.

    python bench/denoise_levels.py --run I2-40min=/work/runs/trials/I2-40min \\
        --out bench/results/pretrain_trials/denoise_levels
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from latent_diagnostics import (  # bench/ is on sys.path when run as a script
    named_runs,
    run_arguments,
)

from histodiffusion.cli import guarded
from histodiffusion.data.latents import LatentSet
from histodiffusion.diffusion.sampling import unet_eps_fn
from histodiffusion.io import write_json, write_text
from histodiffusion.models.autoencoder import (
    decode_latents,
    normalize_latents,
    psnr,
    tensor_to_tiles,
)
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.pretrain import load_unet
from histodiffusion.viz import grid, save_image

LEVELS = (100, 300, 500, 700, 850, 1000)


@torch.no_grad()
def ddim_from(eps_fn, alphas: torch.Tensor, x: torch.Tensor, t_start: int, stride: int = 20) -> torch.Tensor:
    """Deterministic DDIM (bf16 autocast, as the cpu preset samples) from x at timestep ``t_start``
    down to t = 0, then one last step to x_0."""
    ts = list(range(t_start, -1, -stride))
    if ts[-1] != 0:
        ts.append(0)
    for i, t in enumerate(ts):
        a = alphas[t]
        a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps = eps_fn(x, torch.full((len(x),), t, dtype=torch.long)).float()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def probe(run: Path, n: int, seed: int, levels: tuple[int, ...]) -> tuple[dict, np.ndarray]:
    vae = load_vae(run / "autoencoder").eval()
    unet, scheduler = load_unet(run / "pretrain")
    latents = LatentSet(run / "latents" / "pool")
    n = min(n, len(latents))
    rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(latents), size=n, replace=False)))
    z = normalize_latents(latents.mean[rows], vae.config)
    alphas = scheduler.alphas_cumprod.float()
    eps_fn = unet_eps_fn(unet, scheduler.config.prediction_type, alphas)
    rec = decode_latents(vae, z)
    shown, result = [tensor_to_tiles(rec)], {"tiles": n, "levels": {}}
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=g)
    for level in levels:
        t = min(level, len(alphas)) - 1
        x_t = alphas[t].sqrt() * z + (1 - alphas[t]).sqrt() * noise
        out = decode_latents(vae, ddim_from(eps_fn, alphas, x_t, t))
        result["levels"][str(level)] = {
            "t": t, "snr": round(float(alphas[t] / (1 - alphas[t])), 5),
            "psnr_vs_reconstruction_db": round(float(psnr(out, rec).mean()), 2)}
        shown.append(tensor_to_tiles(out))
        print(run.name, level, result["levels"][str(level)], flush=True)
    return result, np.concatenate(shown)


def markdown(results: dict[str, dict], levels: tuple[int, ...], command: str) -> str:
    lines = ["# At which noise level the layout is lost", "", f"Command: `{command}`",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}", "",
             "PSNR (dB) of real latents noised to timestep t and denoised by the model, decoded, against the "
             "autoencoder's reconstruction of the same tiles. The last level starts from almost pure noise.", "",
             "| model | " + " | ".join(f"t={lv - 1}" for lv in levels) + " | grid |",
             "|---|" + "---|" * len(levels) + "---|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r["levels"][str(lv)]["psnr_vs_reconstruction_db"])
                                                 for lv in levels) + f" | ![]({name}.png) |")
    snr = next(iter(results.values()))["levels"]
    lines += ["", "SNR at each level: " + ", ".join(f"t={v['t']}: {v['snr']}" for v in snr.values()) + ".",
              "Grid rows: the reconstructions, then one row per level, top to bottom from the smallest t."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(ap, "pretrain", tiles=8)
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)),
                    help="comma-separated start levels (1..T; T starts from almost pure noise)")
    args = ap.parse_args()
    try:
        levels = tuple(int(v) for v in args.levels.split(","))
    except ValueError:
        ap.error(f"--levels {args.levels!r}: expected comma-separated whole numbers, e.g. 100,500,1000")
    if min(levels) < 1 or args.tiles < 1:
        ap.error("--levels must be at least 1 and --tiles at least 1")
    results = {}
    for name, path in named_runs(ap, args.run):
        result, tiles = probe(path, args.tiles, args.seed, levels)
        results[name] = {"run": str(path), **result}
        save_image(grid(tiles, ncol=args.tiles), args.out / f"{name}.png", scale=2)
    write_json(args.out / "denoise_levels.json", results)
    write_text(args.out / "README.md", markdown(results, levels, "python bench/denoise_levels.py "
                                                + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    guarded(main)
