"""Pre-training trials at equal wall-clock budgets: which setting gives the best samples per CPU-hour.

Each trial trains the autoencoder it names (shared between trials) and then the LDM for the same
number of minutes (``train.time_limit_minutes``), samples 64 tiles with DDIM-50 from the EMA
model, and records steps, wall time, final loss and throughput. Writes
``bench/results/pretrain_trials/<trial>.png``, ``real_<res>px.png`` and ``trials.{json,md}``.

    python bench/pretrain_trials.py --config configs/pcam-fewlabel.yaml --minutes 12

Rows without an LDM put the scores in scale: ``--reconstructions KEY`` (an autoencoder's
reconstructions, and real tiles) and ``--gaussian KEY`` (latents drawn from a Gaussian fitted to the
pool latents: colour and texture, no shapes). ``bench/two_sample_test.py`` is the stricter judge.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import read_rgb
from histodiffusion.errors import StagePaused, UserError
from histodiffusion.io import read_jsonl, write_json, write_text
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from histodiffusion.stages.report import pool_grid
from histodiffusion.stages.sample import sample_tiles
from histodiffusion.stages.synthesize import file_hash
from histodiffusion.training.loop import Checkpointer
from histodiffusion.viz import grid, save_image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "pretrain_trials"

# Autoencoders the trials share: resolution, downsampling and layout.
GLOBAL = ["autoencoder.latent_normalization=global"]
PC64 = ["data.resolution=64", "autoencoder.arch.downsample_factor=4", "autoencoder.arch.channels=[32,64,64]",
        "autoencoder.arch.latent_channels=3", "autoencoder.train_crop=32", "autoencoder.latent_normalization=per_channel"]
SCALE_EQ = ["autoencoder.scale_equivariance_weight=0.5"]
AUTOENCODERS = {
    "64px-f4": ["data.resolution=64", "autoencoder.arch.downsample_factor=4", "autoencoder.arch.channels=[32,64,64]",
                "autoencoder.arch.latent_channels=3", "autoencoder.train_crop=32"] + GLOBAL,
    "32px-f4": ["data.resolution=32", "autoencoder.arch.downsample_factor=4", "autoencoder.arch.channels=[32,64,64]",
                "autoencoder.arch.latent_channels=3"] + GLOBAL,
    "64px-f8": ["data.resolution=64", "autoencoder.arch.downsample_factor=8",
                "autoencoder.arch.channels=[32,64,64,64]", "autoencoder.arch.latent_channels=4",
                "autoencoder.train_crop=32"] + GLOBAL,
    "64px-f4-pc": PC64,
    # The same recipe trained again (2026-11-27), beside the scale-equivariance variants.
    "64px-f4-pc-rerun": PC64,
    "64px-f4-pc-se": PC64 + SCALE_EQ,
    "64px-f4-pc-gan": PC64 + ["autoencoder.disc_weight=0.1", "autoencoder.disc_start=1000"],
    # The recipe again after the fix that measures the latent normalisation on the whole pool
    # (2026-11-28); before it, the first 2048 training rows (EBHI tiles only) set it.
    "64px-f4-pc-fixnorm": PC64,
}
UNET_SMALL = ["pretrain.unet.channels=[64,128,128]", "pretrain.unet.layers_per_block=1"]
UNET_WIDE = ["pretrain.unet.channels=[96,192,192]", "pretrain.unet.layers_per_block=2"]
UNET_MID = ["pretrain.unet.channels=[64,128,256]", "pretrain.unet.layers_per_block=1"]
# Extra capacity only at the coarse levels (4x4, 2x2), where it costs little compute.
UNET_DEEP = ["pretrain.unet.channels=[64,128,256,256]", "pretrain.unet.layers_per_block=1",
             "pretrain.unet.attention_resolutions=[4,2]"]
V_MINSNR = ["diffusion.prediction_type=v_prediction", "diffusion.min_snr_gamma=5"]
BF16 = ["pretrain.train.mixed_precision=bf16"]
PRESET_LDM = UNET_SMALL + V_MINSNR + BF16  # trial I's settings, which the cpu preset took
# name: (autoencoder, LDM overrides, what it tests)
TRIALS = {
    "A-64f4-eps": ("64px-f4", UNET_SMALL, "64 px, f=4 (16x16x3), 4.4M UNet, eps, sqrt-linear, lr 5e-4, fp32"),
    "B-64f4-eps-bf16": ("64px-f4", UNET_SMALL + ["pretrain.train.mixed_precision=bf16"], "A with bf16 autocast"),
    "C-64f4-v-minsnr": ("64px-f4", UNET_SMALL + ["diffusion.prediction_type=v_prediction",
                                                 "diffusion.min_snr_gamma=5"], "A with v-prediction + min-SNR-5"),
    "D-64f4-cosine": ("64px-f4", UNET_SMALL + ["diffusion.schedule=cosine"], "A with the cosine schedule"),
    "E-64f4-lr2e-4": ("64px-f4", UNET_SMALL + ["pretrain.train.lr=2e-4"], "A with lr 2e-4"),
    "F-32f4-wide-v-bf16": ("32px-f4", UNET_WIDE + V_MINSNR + BF16,
                           "32 px, f=4 (8x8x3), 14.5M UNet, v + min-SNR-5, bf16"),
    "G-64f8-wide-v-bf16": ("64px-f8", UNET_WIDE + V_MINSNR + BF16,
                           "64 px, f=8 (8x8x4), 14.5M UNet, v + min-SNR-5, bf16"),
    "H-64f4-eps-perchannel": ("64px-f4-pc", UNET_SMALL, "A with per-channel latent normalisation (mean 0, std 1 "
                              "per channel) instead of one global scale"),
    "I-64f4-v-bf16-perchannel": ("64px-f4-pc", UNET_SMALL + V_MINSNR + BF16,
                                 "64 px, f=4, 4.4M UNet, v + min-SNR-5, bf16, per-channel normalisation"),
    "J-64f4-mid-v-bf16-perchannel": ("64px-f4-pc", UNET_MID + V_MINSNR + BF16,
                                     "I with a 10.9M UNet (64,128,256)"),
    "K-64f4-wide-v-bf16-perchannel": ("64px-f4-pc", UNET_WIDE + V_MINSNR + BF16,
                                      "I with F/G's 14.5M UNet: separates UNet size from resolution"),
    "F30-32f4-wide-v-bf16": ("32px-f4", UNET_WIDE + V_MINSNR + BF16,
                             "F given the preset's pre-training time (run with --minutes 30)"),
    "I2-64f4-v-bf16-pc-rerun": ("64px-f4-pc-rerun", PRESET_LDM,
                                "I again (its autoencoder retrained too), beside L and N on the same machine"),
    "I2-40min": ("64px-f4-pc-rerun", PRESET_LDM,
                 "I2 continued for 30 more minutes (40 in all; its work folder started as a copy of I2's)"),
    "I2-65min": ("64px-f4-pc-rerun", PRESET_LDM,
                 "I2-40min continued for 25 more minutes (65 in all; its work folder started as a copy of I2-40min's)"),
    "L-64f4-v-bf16-pc-scaleeq": ("64px-f4-pc-se", PRESET_LDM,
                                 "I on an autoencoder trained with the scale-equivariance term (weight 0.5)"),
    "N-64f4-v-bf16-pc-gan": ("64px-f4-pc-gan", PRESET_LDM,
                             "I on an autoencoder with a patch discriminator (weight 0.1 from step 1000)"),
    "O-64f4-v-uniform": ("64px-f4-pc-rerun", UNET_SMALL + BF16 + ["diffusion.prediction_type=v_prediction",
                                                                  "diffusion.min_snr_gamma=null"],
                         "I2 with the plain v-prediction loss, no min-SNR weighting: the high-noise steps, "
                         "which set the layout, weigh (1 + SNR) / min(SNR, 5) times more"),
    "P-64f4-deep-v-bf16-pc": ("64px-f4-pc-rerun", UNET_DEEP + V_MINSNR + BF16,
                              "I2 with an 18.1M UNet (64,128,256,256; attention at 4x4 and 2x2) whose added "
                              "capacity sits at the coarse levels"),
    "I3-64f4-v-bf16-pc-fixnorm": ("64px-f4-pc-fixnorm", PRESET_LDM,
                                  "I2 with the latent normalisation measured on 2048 rows drawn from the whole "
                                  "pool (the fix of 2026-11-28), not on its first 2048 rows"),
    "I3-40min": ("64px-f4-pc-fixnorm", PRESET_LDM,
                 "I3 continued for 30 more minutes (40 in all; its work folder started as a copy of I3's)"),
    # The same model trained on, 30 minutes at a time, each from a copy of the one before: do
    # tens of thousands of steps bring the glands that 2000 to 8000 do not?
    **{f"I3-{total}min": ("64px-f4-pc-fixnorm", PRESET_LDM,
                          f"I3-{total - 30}min continued for 30 more minutes ({total} in all; its work folder "
                          f"started as a copy of I3-{total - 30}min's)") for total in (70, 100)},
    "Q-64f4-wide-fixnorm": ("64px-f4-pc-fixnorm", UNET_WIDE + V_MINSNR + BF16,
                            "I3 with K's 14.5M UNet (96,192,192, two blocks per level): capacity at the fine "
                            "levels, given 25 minutes (run with --minutes 25)"),
    # Capacity against steps at equal CPU time: Q trained on to 85 minutes, beside I3-70min/-100min.
    "Q-85min": ("64px-f4-pc-fixnorm", UNET_WIDE + V_MINSNR + BF16,
                "Q continued for 60 more minutes (85 in all; its work folder started as a copy of Q's)"),
    # The learning rate: I3-100min's last 5578 steps again from I3-70min's weights, cooled down
    # linearly to 0 instead of at the constant 5e-4 (the same steps, latents and CPU time).
    "I3-100min-cd": ("64px-f4-pc-fixnorm", PRESET_LDM + ["pretrain.train.steps=20146",
                                                         "pretrain.train.cooldown_steps=5578"],
                     "I3-70min (step 14568) trained on to I3-100min's 20146 steps with the learning rate "
                     "falling linearly to 0 over those 5578 steps (a warmup-stable-decay cooldown)"),
    # The loss weighting again (O), on the fixed normalisation and for longer: min-SNR-5 gives the
    # high-noise steps that set the layout 3 % (t=699) to 0.6 % (t=849) of plain v's weight; O's 10 minutes
    # denoised at high noise as well as I2 after 65 (denoise_levels).
    "O3-40min": ("64px-f4-pc-fixnorm", UNET_SMALL + BF16 + ["diffusion.prediction_type=v_prediction",
                                                            "diffusion.min_snr_gamma=null"],
                 "I3 with O's plain v-prediction loss (no min-SNR weighting), given 40 minutes in one go "
                 "(run with --minutes 40), beside I3-40min"),
}
# Trials that start as a copy of another trial's work folder.
CONTINUES = {"I3-100min-cd": "I3-70min"}


def _cfg(config: Path, overrides: list[str]):
    return load_config(config, overrides)


def ensure_autoencoder(config: Path, work: Path, key: str, ae_steps: int) -> tuple[RunDir, dict]:
    """Data + autoencoder + latents for one autoencoder setting (cached under ``work/ae-<key>``)."""
    rd = RunDir(work / f"ae-{key}")
    cfg = _cfg(config, AUTOENCODERS[key] + [f"autoencoder.train.steps={ae_steps}"])
    t0 = time.time()
    for stage in ("data", "autoencoder", "latents"):
        run_stage(stage, cfg, rd)
    metrics = json.loads((rd.root / "autoencoder" / "metrics.json").read_text())
    done = json.loads((rd.root / "autoencoder" / "DONE").read_text())
    metrics["wall_seconds"] = done["summary"].get("wall_seconds", round(time.time() - t0, 1))
    return rd, metrics


def trial_samples(cfg, rd: RunDir, name: str) -> np.ndarray:
    """The trial's 64 samples (seeds 0-63) into ``samples.npy`` and its grid. They are drawn into
    ``samples/trial-<hash of the UNet weights>``: a work folder copied from an earlier trial to train
    on never reuses that trial's tiles."""
    folder = rd.root / "samples" / f"trial-{file_hash(rd.root / 'pretrain' / 'unet')}"
    samples = sample_tiles(cfg, rd, 64, "pretrain", folder)
    tiles = np.stack([read_rgb(samples / f"{k:06d}.png") for k in range(64)])
    np.save(rd.root / "samples.npy", tiles)
    save_image(grid(tiles, ncol=8), OUT / f"{name}.png", scale=2)
    return tiles


def continue_from(source: Path, rd: RunDir) -> None:
    """Copy ``source``'s work folder to ``rd``, recording the step its last checkpoint reached. The
    source asked for a nominal 200000 steps and paused on its time limit (trials run before the run
    directory recorded that itself), so the copy may be asked for fewer: a run that ends, and cools
    down, at a given step."""
    if not (source / "pretrain" / "checkpoints").is_dir():
        sys.exit(f"{source} has no pre-training checkpoint to continue from; run that trial first")
    shutil.copytree(source, rd.root, ignore=shutil.ignore_patterns("samples", "samples.npy"))
    reached = Checkpointer(rd.root / "pretrain", keep=1).latest()[0]
    rd.record_reached("pretrain", "pretrain.train.steps", reached)


def run_trial(config: Path, work: Path, name: str, minutes: float, ae: RunDir) -> dict:
    """Train one LDM setting for ``minutes`` and sample 64 tiles from its EMA model."""
    key, overrides, what = TRIALS[name]
    rd = RunDir(work / name)
    if name in CONTINUES and not rd.root.exists():
        continue_from(work / CONTINUES[name], rd)
    for stage in ("data", "autoencoder", "latents"):
        if not (rd.root / stage).exists():
            shutil.copytree(ae.root / stage, rd.root / stage)
    # a nominal step count: the time limit ends a trial (a trial's own overrides come last and win)
    cfg = _cfg(config, AUTOENCODERS[key] + [
        "pretrain.train.steps=200000", f"pretrain.train.time_limit_minutes={minutes}",
        "pretrain.sample_every=0", "pretrain.train.checkpoint_every=100000"] + overrides)
    t0 = time.time()
    try:
        run_stage("pretrain", cfg, rd)
    except StagePaused:
        pass
    wall = time.time() - t0
    log = read_jsonl(rd.root / "pretrain" / "metrics.jsonl")
    trial_samples(cfg, rd, name)
    steps = log[-1]["step"] if log else 0
    return {"trial": name, "what": what, "autoencoder": key, "steps": steps, "wall_minutes": round(wall / 60, 1),
            "final_loss": round(float(np.mean([r["loss"] for r in log[-5:]])), 4) if log else None,
            "latents_per_s": round(float(np.median([r["images_per_s"] for r in log[1:]] or [0])), 1),
            "grid": f"pretrain_trials/{name}.png"}


def pool_folder(work: Path) -> Path:
    """The first 64 px, f=4 autoencoder folder under ``work``: they all hold the same 64 px pool cache."""
    for key in AUTOENCODERS:
        if key.startswith("64px-f4") and (work / f"ae-{key}").is_dir():
            return work / f"ae-{key}"
    raise UserError(f"no 64 px f=4 autoencoder folder (ae-64px-f4*) under {work}: run a 64 px trial first")


def real_rows(n_tiles: int, seed: int) -> np.ndarray:
    """The (sorted) pool rows of the up to 1024 real tiles every trial is scored against."""
    return np.sort(np.random.default_rng(seed).choice(n_tiles, size=min(1024, n_tiles), replace=False))


def score(work: Path, trials: dict, seed: int = 0) -> None:
    """KID and FD of every trial's 64 samples vs 1024 real pool tiles, in a SimCLR histology feature
    space trained on the 64 px pool (the same encoder for every trial; 32 px samples are upsampled)."""
    from histodiffusion.metrics.generation import frechet_distance, kernel_inception_distance
    from histodiffusion.models.features import (
        extract_features,
        load_encoder,
        save_encoder,
        train_feature_encoder,
    )

    cache = TileCache(pool_folder(work) / "data" / "cache" / "pool")
    folder = work / "features-encoder"
    if not (folder / "config.json").is_file():
        encoder = train_feature_encoder(cache.take(np.arange(len(cache))), 600, 64, 1e-3, seed, "resnet18")
        save_encoder(encoder, folder)
    encoder = load_encoder(folder)
    rows = real_rows(len(cache), seed)
    real = extract_features(encoder, cache.take(rows)).astype(np.float64)
    for name, record in trials.items():
        samples = work / name / "samples.npy"
        if not samples.is_file():
            continue
        fake = extract_features(encoder, np.load(samples)).astype(np.float64)
        kid, kid_std = kernel_inception_distance(real, fake, subset_size=len(fake))
        record.update({"kid": round(kid, 5), "kid_std": round(kid_std, 5), "fd": round(frechet_distance(real, fake), 4),
                       "n_real": len(real), "n_samples": len(fake), "scored_in": work.name})


def real_grid(ae: RunDir, resolution: int) -> None:
    """A grid of real pool tiles at the trial's resolution, to put beside the samples."""
    pool_grid(ae.root / "data", OUT / f"real_{resolution}px.png", n=64)


def markdown(rows: list[dict], aes: dict, command: str) -> str:
    lines = ["# Pre-training trials at equal wall-clock budgets", "",
             f"Last command: `{command}` (trials run in several invocations with `--only`; scores recomputed "
             "for all)", f"Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", "",
             "| autoencoder | steps | wall (min) | held-out PSNR (dB) | SSIM | latent scale |",
             "|---|---|---|---|---|---|"]
    for key, m in aes.items():
        lines.append(f"| {key} | - | {m['wall_seconds'] / 60:.1f} | {m['psnr_db']:.2f} | {m['ssim']:.3f} | "
                     f"{m['scaling_factor']:.3f} |")
    scored = any("kid" in r for r in rows)
    if scored:
        lines += ["", "KID and FD: the 64 samples of each trial vs 1024 real pool tiles in a SimCLR (ResNet-18) "
                  "feature space trained on the 64 px pool; lower is better; FD with 64 samples is biased upwards, "
                  "KID is not. Scores compare only within one `encoder` (the work folder whose SimCLR encoder "
                  "scored them: each folder trains its own)."]
    lines += ["", "Trials A-G used the global latent scale (the original LDM recipe); H and later the per-channel "
              "normalisation that became the default. Final losses are not comparable across objectives "
              "(eps vs v, min-SNR weighting) or schedules.", "",
              "| trial | setting | steps | wall (min) | final loss | latents/s |" + (" KID | FD | encoder |" if scored else "")
              + " samples |", "|---|---|---|---|---|---|" + ("---|---|---|" if scored else "") + "---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['what']} | {r['steps']} | {r['wall_minutes']} | {r['final_loss']} | "
                     f"{r['latents_per_s']} |"
                     + (f" {r.get('kid', '-')} | {r.get('fd', '-')} | {r.get('scored_in', 'trials-bench')} |" if scored else "")
                     + f" ![]({r['grid'].split('/')[-1]}) |")
    return "\n".join(lines) + "\n"


def reference(work: Path, run: Path) -> dict:
    """A finished run's pre-trained model as a table row: its first 64 samples, scored like a trial."""
    rd = RunDir(run)
    cfg = load_config(run / "config.yaml")
    done = json.loads((run / "pretrain" / "DONE").read_text())["summary"]
    log = read_jsonl(run / "pretrain" / "metrics.jsonl")
    name = f"ref-{run.name}"
    samples = sample_tiles(cfg, rd, 64, "pretrain", work / name / "samples")
    tiles = np.stack([np.asarray(__import__("PIL.Image").Image.open(samples / f"{k:06d}.png").convert("RGB"))
                      for k in range(64)])
    np.save(work / name / "samples.npy", tiles)
    save_image(grid(tiles, ncol=8), OUT / f"{name}.png", scale=2)
    return {"trial": name, "what": f"the protocol run {run} ({cfg.data.resolution} px, its config's pre-training)",
            "autoencoder": f"{run.name}", "steps": done["steps"], "wall_minutes": round(done["wall_seconds"] / 60, 1),
            "final_loss": round(float(np.mean([r["loss"] for r in log[-5:]])), 4),
            "latents_per_s": round(float(np.median([r["images_per_s"] for r in log[1:]])), 1),
            "grid": f"pretrain_trials/{name}.png"}


def reconstruction_row(work: Path, key: str | None, n: int = 64, seed: int = 0) -> dict:
    """An autoencoder's reconstructions of ``n`` pool tiles outside the 1024 real tiles ``score`` uses,
    as a table row: the best a sample decoded by it can score (the LDM adds its own error on top).
    ``key`` None: those real tiles themselves (the score's floor for 64 tiles)."""
    from histodiffusion.models.autoencoder import reconstruct_tiles
    from histodiffusion.stages.autoencoder import load_vae

    folder = work / f"ae-{key}" if key else pool_folder(work)
    cache = TileCache(folder / "data" / "cache" / "pool")
    rest = np.setdiff1d(np.arange(len(cache)), real_rows(len(cache), seed))
    rows = np.sort(np.random.default_rng(seed + 1).choice(rest, size=min(n, len(rest)), replace=False))
    tiles = cache.take(rows) if key is None else reconstruct_tiles(load_vae(folder / "autoencoder"), cache.take(rows))
    name = "real-pool" if key is None else f"rec-{key}"
    (work / name).mkdir(parents=True, exist_ok=True)
    np.save(work / name / "samples.npy", tiles)
    save_image(grid(tiles, ncol=8), OUT / f"{name}.png", scale=2)
    what = (f"no model: {len(rows)} other real pool tiles (the floor of the scores)" if key is None else
            f"no LDM: the {key} autoencoder's reconstructions of the {len(rows)} tiles of row real-pool (the "
            "ceiling for samples it decodes)")
    return {"trial": name, "what": what, "autoencoder": key or "-", "steps": "-", "wall_minutes": "-",
            "final_loss": "-", "latents_per_s": "-", "grid": f"pretrain_trials/{name}.png"}


def gaussian_latents(latents, n: int, seed: int, max_latents: int = 8192) -> torch.Tensor:
    """``n`` draws from the Gaussian with the mean and full covariance (all C*h*w values at once) of
    the normalised pool latents the LDM trains on (up to ``max_latents`` of them, seeded), with their
    8 dihedral copies: the best a model of second-order statistics alone can do. A Gaussian has
    colour and texture (the power spectrum) but no shapes: a score that rates the LDMs no better
    than it does not see shapes."""
    from histodiffusion.data.augment import dihedral

    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(len(latents))
    if len(rows) > max_latents:
        rows = rows[torch.randperm(len(rows), generator=g)[:max_latents]].sort().values
    z = latents.sample(rows, g)
    flat = torch.cat([dihedral(z, k) for k in range(8)]).flatten(1).double()
    cov = torch.cov(flat.T)
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(len(cov), dtype=cov.dtype))
    draws = flat.mean(0) + torch.randn(n, len(cov), generator=g, dtype=cov.dtype) @ chol.T
    return draws.float().view(n, *latents.shape)


@torch.no_grad()
def gaussian_tiles(run: Path, n: int, seed: int):
    """:func:`gaussian_latents` of a run directory's pool latents, decoded by its autoencoder:
    (tiles (n, H, W, 3) uint8, the latents' LatentSet)."""
    from histodiffusion.data.latents import LatentSet
    from histodiffusion.models.autoencoder import decode_latents, tensor_to_tiles
    from histodiffusion.stages.autoencoder import load_vae

    latents = LatentSet(run / "latents" / "pool")
    vae = load_vae(run / "autoencoder")
    return tensor_to_tiles(decode_latents(vae, gaussian_latents(latents, n, seed))), latents


def gaussian_row(work: Path, key: str, n: int = 64, seed: int = 0) -> dict:
    """The Gaussian baseline of :func:`gaussian_latents` for one autoencoder, decoded, as a table row."""
    tiles, latents = gaussian_tiles(work / f"ae-{key}", n, seed)
    name = f"gauss-{key}"
    (work / name).mkdir(parents=True, exist_ok=True)
    np.save(work / name / "samples.npy", tiles)
    save_image(grid(tiles, ncol=8), OUT / f"{name}.png", scale=2)
    what = (f"no LDM: {n} latents drawn from a Gaussian with the mean and {np.prod(latents.shape)}x"
            f"{np.prod(latents.shape)} covariance of the {len(latents)} pool latents and their dihedral copies, "
            f"decoded by the {key} autoencoder (second-order statistics only: colour and texture, no shapes)")
    return {"trial": name, "what": what, "autoencoder": key, "steps": "-", "wall_minutes": "-",
            "final_loss": "-", "latents_per_s": "-", "grid": f"pretrain_trials/{name}.png"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "pcam-fewlabel.yaml")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "trials")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--ae-steps", type=int, default=2000)
    ap.add_argument("--only", default="", help="comma-separated trial names")
    ap.add_argument("--score-only", action="store_true", help="only (re)score the trials already run")
    ap.add_argument("--reference", type=Path, action="append", default=[],
                    help="a finished run directory whose pre-trained model joins the table (64 samples)")
    ap.add_argument("--reconstructions", action="append", default=[], choices=sorted(AUTOENCODERS),
                    help="an autoencoder (already trained under --work) whose reconstructions join the table, "
                    "with the same real tiles as a floor row")
    ap.add_argument("--gaussian", action="append", default=[], choices=sorted(AUTOENCODERS),
                    help="an autoencoder (already trained under --work) whose pool latents' Gaussian fit joins the "
                    "table: the score of a model that knows only their mean and covariance")
    args = ap.parse_args()
    names = [] if args.score_only else [n for n in TRIALS if not args.only or n in args.only.split(",")]
    results_file = OUT / "trials.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {"trials": {}, "autoencoders": {}}
    aes: dict[str, tuple[RunDir, dict]] = {}
    for name in names:
        key = TRIALS[name][0]
        if key not in aes:
            aes[key] = ensure_autoencoder(args.config, args.work, key, args.ae_steps)
            real_grid(aes[key][0], int(AUTOENCODERS[key][0].split("=")[1]))
            previous["autoencoders"][key] = aes[key][1]
        previous["trials"][name] = run_trial(args.config, args.work, name, args.minutes, aes[key][0])
        write_json(results_file, previous)
        print(json.dumps(previous["trials"][name]), flush=True)
    for run in args.reference:
        previous["trials"][f"ref-{run.name}"] = reference(args.work, run)
    if args.reconstructions:
        previous["trials"]["real-pool"] = reconstruction_row(args.work, None)
    for key in args.reconstructions:
        previous["trials"][f"rec-{key}"] = reconstruction_row(args.work, key)
    for key in args.gaussian:
        previous["trials"][f"gauss-{key}"] = gaussian_row(args.work, key)
    score(args.work, previous["trials"])
    write_json(results_file, previous)
    command = "python bench/pretrain_trials.py " + " ".join(sys.argv[1:])
    text = markdown(list(previous["trials"].values()), previous["autoencoders"], command)
    write_text(OUT / "trials.md", text + observations(OUT / "trials.md"))


def observations(md: Path) -> str:
    """The hand-written sections after the generated table (kept when the table is rewritten)."""
    if not md.is_file():
        return ""
    _, sep, tail = md.read_text().partition("\n## ")
    return "\n## " + tail if sep else ""


if __name__ == "__main__":
    guarded(main)
