"""Throughput of pre-training and sampling on this machine, with the cpu preset's models.

1. LDM pre-training: latents/s of the shipped training step (``diffusion_step_loss`` with its
   min-SNR weighting and dihedral augmentation, ``accumulate_step``), reading the latent cache vs
   encoding tiles with the autoencoder at every step (only where the latents come from differs).
2. Unconditional sampling: tiles/s with DDIM at 20 and 50 steps, fp32 vs bf16 autocast, decode
   included.

    python bench/throughput.py --run-dir runs/pcam-fewlabel   # trained models and caches of a run
Writes bench/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.data.latents import LatentSet, normalize_latents
from histodiffusion.data.prepared import pool_tiles
from histodiffusion.devices import machine
from histodiffusion.diffusion.sampling import latent_shape, sample_batches, unet_eps_fn
from histodiffusion.io import write_json, write_text
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.models.unet import load_unet
from histodiffusion.training.diffusion import diffusion_step_loss
from histodiffusion.training.harness import accumulate_step

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    return (time.perf_counter() - t0) / steps


class EncodedPool:
    """The pool's tiles encoded at every step: the same ``sample(rows, generator)`` as a LatentSet
    (normalised posterior samples), without the latent cache."""

    def __init__(self, cache, vae):
        self.cache, self.vae = cache, vae

    def __len__(self) -> int:
        return len(self.cache)

    @torch.no_grad()
    def sample(self, rows, generator: torch.Generator) -> torch.Tensor:
        dist = self.vae.encode(tiles_to_tensor(self.cache.take(np.sort(np.asarray(rows))))).latent_dist
        return normalize_latents(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator),
                                 self.vae.config)


def training_throughput(cfg, run: Path, steps: int, batch: int) -> dict:
    """Seconds per optimisation step and latents/s of the shipped pre-training step
    (:func:`diffusion_step_loss`: dihedral, min-SNR-weighted loss, bf16 autocast as configured, AdamW,
    gradient clipping), latents from the cache vs encoded at every step."""
    unet, sched = load_unet(run / "pretrain")
    unet.train()
    sources = {"latent cache": LatentSet(run / "latents" / "pool"),
               "encode every step": EncodedPool(pool_tiles(run / "data"), load_vae(run / "autoencoder"))}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    bf16 = cfg.pretrain.train.mixed_precision == "bf16"
    gamma = cfg.diffusion.min_snr_gamma

    def step(latents, i: int) -> None:
        p = np.full(len(latents), 1.0 / len(latents))

        def micro_loss(_m: int):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = diffusion_step_loss(unet, sched, latents, p, batch, cfg.seed, i, min_snr_gamma=gamma)
            return loss, {"loss": loss.item()}

        accumulate_step(None, unet, opt, None, micro_loss, grad_clip=cfg.pretrain.train.grad_clip)

    out = {}
    for name, latents in sources.items():
        s = _timed(lambda i, latents=latents: step(latents, i), steps)
        out[name] = {"seconds_per_step": round(s, 3), "latents_per_s": round(batch / s, 1)}
    return out


def sampling_throughput(cfg, run: Path, n: int) -> dict:
    """Tiles/s of unconditional DDIM sampling (decode included) at 20/50 steps, fp32 and bf16."""
    unet, sched = load_unet(run / "pretrain")
    vae = load_vae(run / "autoencoder")
    eps = unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod)
    out = {}
    for steps in (20, 50):
        for precision in ("fp32", "bf16"):
            s = {**cfg.sampling.model_dump(), "sampler": "ddim", "num_steps": steps, "precision": precision,
                 "batch_size": n}
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in sample_batches(lambda _b: eps, vae, sched, latent_shape(unet), range(n), 0, **s):
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
              "machine": machine(),
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
