"""Speed of the shipped code paths, against the machine and against the reference loop.

Every figure times a function the stages call (never a copy), and every comparison is a ratio
measured in the same invocation. Sections (``--sections``, default all but gpu):

  machine    fp32 and bf16 matmul FLOP/s (a 2048^2 matmul loop): the yardstick of the others
  steps      the training steps as FLOP/s (counted with torch.utils.flop_counter) and as a share
             of the bf16 matmul peak: the LDM step (``diffusion_step_loss``), the latent
             classifier's (``latent_classifier_step_loss``), the downstream classifier's
             (``tile_classifier_step_loss``), each in its shipped setting and its alternatives;
             the autoencoder's (``train_autoencoder``, fp32 vs bf16); torch.compile of the LDM step
  latents    LDM training latents/s from the latent cache vs encoding every step (the shipped step)
  synthesis  guided synthesis: the reference loop (DDIM-50, fp32, guidance at every step) vs
             faster settings, each with tiles/s, an oracle's agreement with the target class
             (>= 256 tiles, 95% Wilson interval), FD and KID (unbiased, mean +- std over
             subsets) against real valid tiles
  gpu        the paper preset's LDM training step in bf16 on a CUDA device at the batch that
             fills it: MFU against the device's bf16 peak (spec and measured matmul)

    python bench/speed.py --run-dir runs/pcam-1h --budget 1pct --per-class 256
Writes bench/results/speed.{json,md} (a section run alone replaces only its own part).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from class_fidelity import (
    oracle,  # the class-fidelity bench's oracle; bench/ is on sys.path as a script
)
from torch.utils.flop_counter import FlopCounterMode

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.data.latents import LatentSet, normalize_latents
from histodiffusion.data.prepared import classes_of, pool_tiles, split_tiles
from histodiffusion.devices import cpu_cores, fork_map, machine
from histodiffusion.diffusion.guidance import guided_eps
from histodiffusion.diffusion.sampling import latent_shape, sample_batches, unet_eps_fn
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.io import read_json, write_json, write_text
from histodiffusion.metrics.generation import (
    frechet_distance,
    kernel_inception_distance,
    split_halves,
)
from histodiffusion.models.autoencoder import build_autoencoder, load_vae
from histodiffusion.models.feature_encoder import ENCODER, extract_features, load_encoder
from histodiffusion.models.latent_classifier import LatentClassifier, load_latent_classifier
from histodiffusion.models.tile_classifier import build_tile_classifier, predict_logits
from histodiffusion.models.unet import ADAPT, build_unet, load_unet
from histodiffusion.presets import PRESETS
from histodiffusion.training.autoencoder import PoolSampler, train_autoencoder
from histodiffusion.training.diffusion import diffusion_step_loss
from histodiffusion.training.harness import accumulate_step
from histodiffusion.training.latent_classifier import latent_classifier_step_loss
from histodiffusion.training.tile_classifier import tile_classifier_step_loss

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
H100_H200_BF16_DENSE = 989.4e12  # NVIDIA's dense bf16 tensor-core peak (H100/H200 SXM), FLOP/s


# --------------------------------------------------------------------------------- timing
def _timed(fn: Callable[[int], object], n: int, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds per call of ``fn(i)`` over ``n`` calls after ``warmup``."""
    for i in range(warmup):
        fn(i)
    sync()
    t0 = time.perf_counter()
    for i in range(n):
        fn(warmup + i)
    sync()
    return (time.perf_counter() - t0) / n


def _flops(fn: Callable[[int], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(0)
    return int(counter.get_total_flops())


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 20, device: str = "cpu") -> float:
    """FLOP/s of an n x n matmul loop in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2 * n**3 / _timed(lambda _i: a @ b, reps, warmup=3, sync=sync)


def machine_section() -> dict:
    fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    return {"matmul_gflops": {"fp32": round(fp32 / 1e9, 1), "bf16": round(bf16 / 1e9, 1)},
            "bf16_over_fp32": round(bf16 / fp32, 2)}


# ---------------------------------------------------------------------------- training steps
def _step_row(name: str, setting: str, step: Callable[[int], object], items: int, steps: int, peak: float) -> dict:
    flops = _flops(step)
    s = _timed(step, steps)
    return {"step": name, "setting": setting, "seconds_per_step": round(s, 4), "items_per_s": round(items / s, 1),
            "gflop_per_step": round(flops / 1e9, 2), "gflops": round(flops / s / 1e9, 1),
            "percent_of_bf16_peak": round(100 * flops / s / peak, 1)}


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def ldm_steps(cfg, run: Path, n: int, peak: float) -> list[dict]:
    """The pre-training step as the pretrain stage runs it, and alternatives."""
    latents = LatentSet(run / "latents" / "pool")
    c, h, _ = latents.shape
    sched = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    b, p = cfg.pretrain.train.batch_size, np.full(len(latents), 1.0 / len(latents))
    rows = []
    for setting, dtype, channels_last, batch in (("fp32", None, False, b), ("bf16 (shipped)", torch.bfloat16, False, b),
                                                 ("bf16, channels_last", torch.bfloat16, True, b),
                                                 (f"bf16, batch {2 * b}", torch.bfloat16, False, 2 * b)):
        torch.manual_seed(0)
        unet = build_unet(h, c, **cfg.pretrain.unet.model_dump())
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def step(i: int, unet=unet, opt=opt, dtype=dtype, batch=batch) -> None:
            def micro(_m: int):
                with _autocast(dtype):
                    loss = diffusion_step_loss(unet, sched, latents, p, batch, 0, i,
                                               min_snr_gamma=cfg.diffusion.min_snr_gamma)
                return loss, {}
            accumulate_step(None, unet, opt, None, micro, grad_clip=cfg.pretrain.train.grad_clip)

        rows.append(_step_row("LDM (pretrain)", setting, step, batch, n, peak))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ldm_compile(cfg, run: Path, n: int) -> dict:
    """torch.compile of the shipped LDM step: compile time and s/step against eager."""
    latents = LatentSet(run / "latents" / "pool")
    c, h, _ = latents.shape
    sched = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    b, p = cfg.pretrain.train.batch_size, np.full(len(latents), 1.0 / len(latents))
    torch.manual_seed(0)
    unet = build_unet(h, c, **cfg.pretrain.unet.model_dump())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    out = {}
    for name, model in (("eager", unet), ("compiled", torch.compile(unet))):
        def step(i: int, model=model) -> None:
            def micro(_m: int):
                with _autocast(torch.bfloat16):
                    return diffusion_step_loss(model, sched, latents, p, b, 0, i,
                                               min_snr_gamma=cfg.diffusion.min_snr_gamma), {}
            accumulate_step(None, model, opt, None, micro, grad_clip=1.0)
        t0 = time.perf_counter()
        step(0)
        out[f"{name}_first_step_s"] = round(time.perf_counter() - t0, 1)
        out[f"{name}_seconds_per_step"] = round(_timed(step, n), 4)
    out["speedup"] = round(out["eager_seconds_per_step"] / out["compiled_seconds_per_step"], 2)
    print(json.dumps(out), flush=True)
    return out


def latent_classifier_steps(cfg, run: Path, n: int, peak: float) -> list[dict]:
    """The latent classifier's step (finetune stage), on pool latents with stand-in labels."""
    latents = LatentSet(run / "latents" / "pool")
    c, h, _ = latents.shape
    sched = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    k = cfg.finetune.classifier
    by_class = [np.arange(0, len(latents), 2), np.arange(1, len(latents), 2)]
    rows = []
    for setting, dtype in (("fp32", None), ("bf16 (shipped)", torch.bfloat16)):
        torch.manual_seed(0)
        model = LatentClassifier(in_channels=c, num_classes=2, sample_size=h, block_out_channels=tuple(k.channels),
                                 layers_per_block=k.layers_per_block, attention_resolutions=tuple(k.attention_resolutions),
                                 attention_head_dim=k.attention_head_dim, norm_num_groups=k.norm_num_groups,
                                 dropout=k.dropout).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(i: int, model=model, opt=opt, dtype=dtype) -> None:
            def micro(_m: int):
                with _autocast(dtype):
                    return latent_classifier_step_loss(model, sched, latents, by_class, k.train.batch_size, 0, i)[0], {}
            accumulate_step(None, model, opt, None, micro, grad_clip=k.train.grad_clip)

        rows.append(_step_row("latent classifier (finetune)", setting, step, k.train.batch_size, n, peak))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tile_classifier_steps(cfg, run: Path, n: int, peak: float) -> list[dict]:
    """The downstream classifier's step (evaluate stage): channels_last bf16 as shipped, and before;
    then one such training per core side by side (``evaluate.cpu_processes``' default), each in its
    own process with one thread."""
    cache = pool_tiles(run / "data")
    tiles = torch.as_tensor(cache.take(np.arange(min(len(cache), 512))))
    labels = torch.arange(len(tiles)) % 2
    e = cfg.evaluate.classifier
    p = np.full(len(tiles), 1.0 / len(tiles))
    name = f"downstream classifier ({e.backbone})"

    def make_step(dtype: torch.dtype | None, channels_last: bool) -> Callable[[int], object]:
        torch.manual_seed(0)
        model = build_tile_classifier(e.backbone, 2).train()
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        return lambda i: accumulate_step(None, model, opt, None, lambda _m: (tile_classifier_step_loss(
            model, tiles, labels, p, e.batch_size, e.color_jitter, 0, i, "cpu", dtype), {}))

    processes = cpu_cores()  # evaluate.cpu_processes' default: one training per core
    shipped = "bf16, channels_last" + (" (shipped in one process)" if processes > 1 else " (shipped)")
    rows = []
    for setting, dtype, channels_last in (("fp32", None, False), ("bf16", torch.bfloat16, False),
                                          (shipped, torch.bfloat16, True)):
        rows.append(_step_row(name, setting, make_step(dtype, channels_last), e.batch_size, n, peak))
        print(json.dumps(rows[-1]), flush=True)
    if processes > 1:
        flops = _flops(make_step(torch.bfloat16, True))
        # every process times its own n steps; they start together, so the machine's rate is processes / s
        s = float(np.mean([t for _, t in fork_map(lambda _w: _timed(make_step(torch.bfloat16, True), n),
                                                    processes, processes)]))
        rows.append({"step": name, "setting": f"bf16, channels_last, {processes} trainings side by side, one thread "
                     "each (shipped: evaluate)", "seconds_per_step": round(s / processes, 4),
                     "items_per_s": round(processes * e.batch_size / s, 1), "gflop_per_step": round(flops / 1e9, 2),
                     "gflops": round(processes * flops / s / 1e9, 1),
                     "percent_of_bf16_peak": round(100 * processes * flops / s / peak, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def autoencoder_steps(cfg, run: Path, n: int) -> list[dict]:
    """``train_autoencoder`` for ``n`` steps in fp32 and in bf16 (the cpu preset's choice since
    2026-12-04), on the run's pool: s/step and tiles/s (checkpoint and evaluation excluded)."""
    ae = cfg.autoencoder
    weights = np.ones(len(pool_tiles(run / "data")))
    rows = []
    for precision in ("no", "bf16"):
        train = ae.train.model_copy(update={"steps": n, "mixed_precision": precision, "checkpoint_every": 10**9,
                                            "log_every": n})
        torch.manual_seed(0)
        vae = build_autoencoder(cfg.data.resolution, **ae.arch.model_dump())
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_autoencoder(Path(tmp), vae, PoolSampler(pool_tiles(run / "data"), weights, 0.05, 0), train, seed=0,
                              device="cpu", train_crop=ae.train_crop)
            rate = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])["images_per_s"]
        rows.append({"step": "autoencoder", "setting": "fp32" if precision == "no" else "bf16",
                     "tiles_per_s": rate, "seconds_per_step": round(ae.train.batch_size / rate, 4),
                     "wall_incl_evaluation_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------ latents/s
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


def latents_section(cfg, run: Path, n: int) -> dict:
    """Latents/s of the shipped pre-training step: from the cache vs encoded at every step."""
    unet, sched = load_unet(run / "pretrain")
    unet.train()
    sources = {"latent cache (shipped)": LatentSet(run / "latents" / "pool"),
               "encode every step": EncodedPool(pool_tiles(run / "data"), load_vae(run / "autoencoder"))}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    b = cfg.pretrain.train.batch_size
    out = {}
    for name, latents in sources.items():
        p = np.full(len(latents), 1.0 / len(latents))

        def step(i: int, latents=latents, p=p) -> None:
            def micro(_m: int):
                with _autocast(torch.bfloat16):
                    return diffusion_step_loss(unet, sched, latents, p, b, 0, i,
                                               min_snr_gamma=cfg.diffusion.min_snr_gamma), {}
            accumulate_step(None, unet, opt, None, micro, grad_clip=1.0)

        s = _timed(step, n)
        out[name] = {"seconds_per_step": round(s, 3), "latents_per_s": round(b / s, 1)}
    out["ratio"] = round(out["latent cache (shipped)"]["latents_per_s"] / out["encode every step"]["latents_per_s"], 2)
    print(json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- synthesis
SETTINGS = (  # name, sampler, steps, precision
    ("reference: DDIM-50 fp32, guidance every step", "ddim", 50, "fp32"),
    ("DDIM-50 bf16", "ddim", 50, "bf16"),
    ("DDIM-25 bf16", "ddim", 25, "bf16"),
    ("DDIM-20 fp32", "ddim", 20, "fp32"),
    ("DDIM-20 bf16", "ddim", 20, "bf16"),
    ("DDIM-15 bf16", "ddim", 15, "bf16"),
    ("DDIM-10 bf16", "ddim", 10, "bf16"),
    ("DPM-Solver++ 20 bf16", "dpmpp", 20, "bf16"),
    ("DPM-Solver++ 15 bf16", "dpmpp", 15, "bf16"),
    ("DPM-Solver++ 10 bf16", "dpmpp", 10, "bf16"),
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a binomial proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def synthesis_section(cfg, run: Path, budget: str, per_class: int, batch_sizes: tuple[int, ...],
                      oracle_steps: int) -> dict:
    """Each sampling setting: tiles/s of guided synthesis (the synthesize stage's eps function and
    ``sample_batches``, same seeds), oracle agreement with the target class and FD to real tiles."""
    data = run / "data"
    classes = classes_of(data)
    model, oracle_valid = oracle(cfg, data, REPO / "bench" / "work" / cfg.experiment, oracle_steps)
    folder = run / "finetune" / budget
    unet, sched = load_unet(folder / ADAPT if cfg.finetune.domain_adapt else run / "pretrain")
    vae, clf = load_vae(run / "autoencoder"), load_latent_classifier(folder)
    encoder = load_encoder(run / "features" / ENCODER)
    real, _ = split_tiles(data, "valid", cfg.generation.max_real, cfg.seed)
    real_feats = extract_features(encoder, real).astype(np.float64)
    a, b = split_halves(len(real_feats), cfg.seed)
    targets = np.repeat(np.arange(len(classes)), per_class)
    y_all = torch.as_tensor(targets)
    scale = cfg.synthesize.guidance_scale
    kid_subset = cfg.generation.kid_subset_size
    rows = []
    for name, sampler, steps, precision in SETTINGS:
        for batch in batch_sizes:
            def make_eps(batch_idx: np.ndarray):
                y = y_all[torch.as_tensor(batch_idx)]
                base = unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod)
                return guided_eps(base, clf, y, scale, sched.alphas_cumprod)

            t0 = time.perf_counter()
            tiles = np.concatenate([t for _, t, _ in sample_batches(
                make_eps, vae, sched, latent_shape(unet), np.arange(len(targets)), cfg.seed, sampler=sampler,
                num_steps=steps, eta=0.0, batch_size=batch, precision=precision)])
            seconds = time.perf_counter() - t0
            agree = predict_logits(model, tiles).argmax(1) == targets
            lo, hi = wilson(int(agree.sum()), len(agree))
            row = {"setting": name, "batch_size": batch, "tiles": int(len(tiles)), "seconds": round(seconds, 1),
                   "tiles_per_s": round(len(tiles) / seconds, 2), "agreement": round(float(agree.mean()), 4),
                   "agreement_ci": [round(lo, 4), round(hi, 4)],
                   **distances(real_feats, extract_features(encoder, tiles).astype(np.float64), kid_subset)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    ref = rows[0]
    for row in rows:
        row["speedup_vs_reference"] = round(row["tiles_per_s"] / ref["tiles_per_s"], 2)
        row["fidelity_overlaps_reference"] = row["agreement_ci"][1] >= ref["agreement_ci"][0] and \
            row["agreement_ci"][0] <= ref["agreement_ci"][1]
    floor = distances(real_feats[a], real_feats[b], kid_subset)
    return {"budget": budget, "guidance_scale": scale, "oracle_valid_balanced_accuracy":
            round(oracle_valid["valid_balanced_accuracy"], 4), "fd_floor": floor["fd"], "kid_floor": floor["kid_x1000"],
            "kid_subset_size": kid_subset, "n_real": int(len(real_feats)), "rows": rows}


def distances(real: np.ndarray, fake: np.ndarray, kid_subset: int) -> dict:
    """FD and KID (x 1000, mean and std over 100 subsets) of ``fake`` to ``real`` features. FD's bias
    grows as the tile count falls; KID is unbiased, so it compares settings measured on different counts."""
    kid, kid_std = kernel_inception_distance(real, fake, subset_size=min(kid_subset, len(real), len(fake)))
    return {"fd": round(frechet_distance(real, fake), 4), "kid_x1000": round(1000 * kid, 3),
            "kid_x1000_std": round(1000 * kid_std, 3)}


# --------------------------------------------------------------------------------------- GPU
def gpu_section(batches: tuple[int, ...], n: int, dev: str = "cuda", variants: tuple[str, ...] = ()) -> dict:
    """The paper preset's pre-training step (UNet 192-384-384-768-768, attention at 32/16/8, on
    64x64x3 latents of 256 px tiles) in bf16 on the CUDA device: MFU at each batch, then at the
    largest batch that fitted each of ``variants`` (channels_last, compile, compile+channels_last).
    (``dev='cpu'`` only checks the script.)"""
    p = PRESETS["paper"]
    arch = p["pretrain"]["unet"]
    sched = training_scheduler(prediction_type=p["diffusion"]["prediction_type"])
    latent_edge = p["data"]["resolution"] // p["autoencoder"]["arch"]["downsample_factor"]
    c = p["autoencoder"]["arch"]["latent_channels"]
    peak = matmul_flops(torch.bfloat16, n=8192 if dev == "cuda" else 1024, reps=30, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "matmul_bf16_tflops_measured": round(peak / 1e12, 1),
           "bf16_dense_peak_tflops_spec": H100_H200_BF16_DENSE / 1e12, "rows": []}
    def measure(unet: torch.nn.Module, batch: int, setting: str) -> dict | None:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        latents = LatentSet.from_moments(torch.randn(4 * batch, c, latent_edge, latent_edge),
                                         torch.full((4 * batch, c, latent_edge, latent_edge), 0.1)).to(dev)
        w = np.full(len(latents), 1.0 / len(latents))

        def step(i: int) -> None:
            def micro(_m: int):
                with torch.autocast(dev, dtype=torch.bfloat16):
                    return diffusion_step_loss(unet, sched, latents, w, batch, 0, i, device=dev), {}
            accumulate_step(None, unet, opt, None, micro, grad_clip=1.0)

        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            step(0)  # compiles, for the compiled variants
            first = time.perf_counter() - t0
            flops = _flops(step)
            s = _timed(step, n, warmup=2, sync=sync)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        return {"setting": setting, "batch_size": batch, "first_step_s": round(first, 1),
                "seconds_per_step": round(s, 4), "latents_per_s": round(batch / s, 1),
                "tflop_per_step": round(flops / 1e12, 3), "tflops": round(flops / s / 1e12, 1),
                "mfu_vs_spec": round(100 * flops / s / H100_H200_BF16_DENSE, 1),
                "mfu_vs_measured_matmul": round(100 * flops / s / peak, 1),
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev == "cuda" else None}

    def fresh(channels_last: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        unet = build_unet(latent_edge, c, **arch).to(dev).train()
        return unet.to(memory_format=torch.channels_last) if channels_last else unet

    params = sum(q.numel() for q in fresh().parameters())
    fitted = None
    for batch in batches:
        row = measure(fresh(), batch, "eager")
        out["rows"].append(row or {"setting": "eager", "batch_size": batch, "error": "out of memory"})
        print(json.dumps(out["rows"][-1]), flush=True)
        if row is None:
            break
        fitted = batch
    for variant in variants if fitted else ():
        unet = fresh("channels_last" in variant)
        row = measure(torch.compile(unet) if "compile" in variant else unet, fitted, variant)
        out["rows"].append(row or {"setting": variant, "batch_size": fitted, "error": "out of memory"})
        print(json.dumps(out["rows"][-1]), flush=True)
    out["unet_parameters"] = params
    return out


# ----------------------------------------------------------------------------------- report
def _stamp(section: dict) -> list[str]:
    return [f"Command: `{section.get('command', '?')}`  ", f"Machine: {section.get('machine', '?')}", ""]


def markdown(r: dict) -> str:
    lines = ["# Speed of the shipped code", "", "Every section names the command and the machine that produced it; "
             "ratios compare figures measured in the same command.", ""]
    if "machine_flops" in r:
        m = r["machine_flops"]
        lines += ["## The machine", "", *_stamp(m), f"Matmul 2048^2: fp32 {m['matmul_gflops']['fp32']} GFLOP/s, bf16 "
                  f"{m['matmul_gflops']['bf16']} GFLOP/s ({m['bf16_over_fp32']}x). The percentages below are of "
                  "this bf16 figure, measured in the same invocation.", ""]
    if "steps" in r:
        lines += ["## Training steps", "", *_stamp(r["steps"]), "| step | setting | s/step | items/s | GFLOP/step | GFLOP/s | % of bf16 matmul peak |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['step']} | {x['setting']} | {x['seconds_per_step']} | {x['items_per_s']} | "
                  f"{x['gflop_per_step']} | {x['gflops']} | {x['percent_of_bf16_peak']} |" for x in r["steps"]["rows"]]
        lines += ["", "| step | setting | tiles/s | s/step |", "|---|---|---|---|"]
        lines += [f"| {x['step']} | {x['setting']} | {x['tiles_per_s']} | {x['seconds_per_step']} |"
                  for x in r["steps"].get("autoencoder", [])]
        if r["steps"].get("compile"):
            c = r["steps"]["compile"]
            lines += ["", f"torch.compile of the LDM step (bf16): first step {c['compiled_first_step_s']} s, then "
                      f"{c['compiled_seconds_per_step']} s/step against {c['eager_seconds_per_step']} s eager "
                      f"({c['speedup']}x)."]
        lines.append("")
    if "latents" in r:
        x = r["latents"]
        lines += ["## Latents/s of the pre-training step", "", *_stamp(x), "| latents from | s/step | latents/s |", "|---|---|---|"]
        lines += [f"| {k} | {v['seconds_per_step']} | {v['latents_per_s']} |" for k, v in x.items()
                  if isinstance(v, dict)]
        lines += ["", f"The cache is {x['ratio']}x faster.", ""]
    if "synthesis" in r:
        x = r["synthesis"]
        lines += [f"## Guided synthesis ({x['budget']}, guidance scale {x['guidance_scale']})", "", *_stamp(x),
                  f"Oracle: the class-fidelity bench's (full train split; valid balanced accuracy "
                  f"{x['oracle_valid_balanced_accuracy']}). FD and KID in the run's SimCLR features against "
                  f"{x['n_real']} real valid tiles (KID x 1000, mean +- std over 100 subsets of "
                  f"{x['kid_subset_size']}); real-vs-real floors (two halves): FD {x['fd_floor']}, KID "
                  f"{x['kid_floor']}.", "",
                  "| setting | batch | tiles | tiles/s | speed-up | oracle agrees with target [95% CI] | overlaps reference "
                  "| FD | KID x 1000 |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {y['setting']} | {y['batch_size']} | {y['tiles']} | {y['tiles_per_s']} | {y['speedup_vs_reference']}x | "
                  f"{y['agreement']:.3f} [{y['agreement_ci'][0]:.3f}, {y['agreement_ci'][1]:.3f}] | "
                  f"{'yes' if y['fidelity_overlaps_reference'] else 'no'} | {y['fd']} | "
                  f"{y['kid_x1000']} +- {y['kid_x1000_std']} |" for y in x["rows"]]
        lines += ["", *_default_sampler(x["rows"]), ""]
    if "gpu" in r:
        g = r["gpu"]
        lines += [f"## GPU: the paper preset's LDM step, bf16 ({g['device']}, torch {g['torch']})", "", *_stamp(g),
                  f"UNet {g['unet_parameters'] / 1e6:.1f}M parameters. Measured bf16 matmul (8192^2): "
                  f"{g['matmul_bf16_tflops_measured']} TFLOP/s; spec dense bf16 peak {g['bf16_dense_peak_tflops_spec']} TFLOP/s.", "",
                  "| setting | batch | s/step | latents/s | TFLOP/step | TFLOP/s | MFU vs spec | MFU vs measured matmul | memory (GiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {y.get('setting', 'eager')} | {y['batch_size']} | {y.get('seconds_per_step', '-')} | {y.get('latents_per_s', '-')} | "
                  f"{y.get('tflop_per_step', '-')} | {y.get('tflops', '-')} | {y.get('mfu_vs_spec', '-')} % | "
                  f"{y.get('mfu_vs_measured_matmul', '-')} % | {y.get('max_memory_gib', y.get('error'))} |"
                  for y in g["rows"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _default_sampler(rows: list[dict]) -> list[str]:
    """What the cpu preset's ``sampling`` (the configured default) measured, against the reference row."""
    s = PRESETS["cpu"]["sampling"]
    name = f"{ {'ddim': 'DDIM', 'dpmpp': 'DPM-Solver++'}.get(s['sampler'], s['sampler'])}-{s['num_steps']} " \
           f"{s.get('precision', 'fp32')}".replace("DPM-Solver++-", "DPM-Solver++ ")
    row = next((r for r in rows if r["setting"] == name), None)
    if row is None:
        return [f"The configured default ({name}) is not in this table."]
    ref = rows[0]
    return [f"Configured default (the cpu preset's `sampling`): {name}, {row['speedup_vs_reference']}x the reference's "
            f"tiles/s, oracle agreement {row['agreement']:.3f} against {ref['agreement']:.3f}, FD {row['fd']} against "
            f"{ref['fd']}."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a run with data, latents, pretrain, features and finetune done")
    ap.add_argument("--budget", default="1pct")
    ap.add_argument("--sections", default="machine,steps,latents,synthesis",
                    help="comma-separated; empty ('') only rewrites speed.md from speed.json")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per training-step setting")
    ap.add_argument("--per-class", type=int, default=128, help="synthetic tiles per class per setting")
    ap.add_argument("--batch-sizes", default="64", help="synthesis batch sizes, comma-separated")
    ap.add_argument("--oracle-steps", type=int, default=1500)
    ap.add_argument("--gpu-batches", default="64,128,256,512")
    ap.add_argument("--gpu-device", default="cuda", help="cpu only to check the gpu section")
    ap.add_argument("--gpu-variants", default="channels_last,compile,compile+channels_last",
                    help="settings tried at the largest batch that fitted")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    sections = {x for x in args.sections.split(",") if x}
    result = read_json(args.out / "speed.json") if (args.out / "speed.json").is_file() else {}
    stamp = {"command": "python bench/speed.py " + " ".join(sys.argv[1:]), "machine": machine()}
    if sections - {"machine", "gpu"} and args.run_dir is None:
        ap.error("--run-dir is needed for the steps, latents and synthesis sections")
    cfg = load_config(args.run_dir / "config.yaml") if args.run_dir else None
    if sections & {"machine", "steps"}:
        result["machine_flops"] = {**machine_section(), **stamp}
        print(json.dumps(result["machine_flops"]), flush=True)
    if "steps" in sections:
        peak = result["machine_flops"]["matmul_gflops"]["bf16"] * 1e9
        rows = ldm_steps(cfg, args.run_dir, args.steps, peak) + latent_classifier_steps(cfg, args.run_dir, args.steps, peak) \
            + tile_classifier_steps(cfg, args.run_dir, args.steps, peak)
        result["steps"] = {"rows": rows, "autoencoder": autoencoder_steps(cfg, args.run_dir, 2 * args.steps),
                           "compile": ldm_compile(cfg, args.run_dir, args.steps), **stamp}
    if "latents" in sections:
        result["latents"] = {**latents_section(cfg, args.run_dir, args.steps), **stamp}
    if "synthesis" in sections:
        result["synthesis"] = {**synthesis_section(cfg, args.run_dir, args.budget, args.per_class,
                                                   tuple(int(b) for b in args.batch_sizes.split(",")),
                                                   args.oracle_steps), **stamp}
    if "gpu" in sections:
        result["gpu"] = {**gpu_section(tuple(int(b) for b in args.gpu_batches.split(",")), args.steps,
                                       args.gpu_device, tuple(v for v in args.gpu_variants.split(",") if v)),
                         **stamp}
    write_json(args.out / "speed.json", result)
    write_text(args.out / "speed.md", markdown(result))


if __name__ == "__main__":
    guarded(main)
