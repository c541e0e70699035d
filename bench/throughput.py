"""Throughput of pre-training and sampling on this machine, with the cpu preset's models.

1. LDM pre-training: latents/s reading the latent cache vs encoding tiles with the autoencoder at
   every step (the same UNet, optimiser and batch; only where the latents come from differs).
2. Unconditional sampling: tiles/s with DDIM at 20 and 50 steps, fp32 vs bf16 autocast, decode
   included.

    python bench/throughput.py --run-dir runs/pcam-fewlabel   # trained models and caches of a run
Writes bench/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.cache import TileCache
from histodiffusion.data.latents import LatentSet
from histodiffusion.diffusion.generate import generate
from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.diffusion.sampling import unet_eps_fn
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.io import write_json, write_text
from histodiffusion.models.autoencoder import normalize_latents, tiles_to_tensor
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.pretrain import load_unet

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    return (time.perf_counter() - t0) / steps


def training_throughput(cfg, run: Path, steps: int, batch: int) -> dict:
    """Seconds per optimisation step and latents/s: latent cache vs encoding at every step."""
    unet, _ = load_unet(run / "pretrain")
    unet.train()
    vae = load_vae(run / "autoencoder")
    latents = LatentSet(run / "latents" / "pool")
    cache = TileCache(run / "data" / "cache" / "pool")
    sched = training_scheduler(cfg.diffusion)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step(z: torch.Tensor, g: torch.Generator) -> None:
        z = random_dihedral(z, g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=g)
        loss = diffusion_loss(unet, sched, z, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def from_cache(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        rows = torch.randint(0, len(latents), (batch,), generator=g)
        step(latents.sample(rows, g), g)

    def from_images(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        rows = np.sort(torch.randint(0, len(cache), (batch,), generator=g).numpy())
        with torch.no_grad():
            dist = vae.encode(tiles_to_tensor(cache.take(rows))).latent_dist
            z = normalize_latents(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g), vae.config)
        step(z, g)

    out = {}
    for name, fn in (("latent cache", from_cache), ("encode every step", from_images)):
        s = _timed(fn, steps)
        out[name] = {"seconds_per_step": round(s, 3), "latents_per_s": round(batch / s, 1)}
    return out


def sampling_throughput(cfg, run: Path, n: int) -> dict:
    """Tiles/s of unconditional DDIM sampling (decode included) at 20/50 steps, fp32 and bf16."""
    unet, sched = load_unet(run / "pretrain")
    vae = load_vae(run / "autoencoder")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    eps = unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod)
    out = {}
    for steps in (20, 50):
        for precision in ("fp32", "bf16"):
            s = cfg.sampling.model_copy(update={"sampler": "ddim", "num_steps": steps, "precision": precision,
                                                "batch_size": n})
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in generate(lambda _b: eps, vae, sched, shape, range(n), 0, s):
                    pass
            seconds = time.perf_counter() - t0
            out[f"ddim{steps}-{precision}"] = {"tiles": n, "seconds": round(seconds, 2),
                                               "tiles_per_s": round(n / seconds, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/pcam-fewlabel"))
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "pcam-fewlabel.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tiles", type=int, default=64)
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    result = {"command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "training": training_throughput(cfg, args.run_dir, args.steps, args.batch),
              "sampling": sampling_throughput(cfg, args.run_dir, args.tiles)}
    write_json(OUT / "throughput.json", result)
    lines = ["# Throughput (CPU)", "", f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             f"## LDM pre-training, batch {args.batch}", "", "| latents from | s/step | latents/s |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds_per_step']} | {v['latents_per_s']} |" for k, v in result["training"].items()]
    lines += ["", f"## Unconditional sampling ({args.tiles} tiles, DDIM, decode included)", "",
              "| setting | seconds | tiles/s |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['tiles_per_s']} |" for k, v in result["sampling"].items()]
    write_text(OUT / "throughput.md", "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    guarded(main)
