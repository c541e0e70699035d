"""The cpu profile's LDM pre-training on a GPU: throughput, bf16, accelerate, and sample quality.

Two halves, because the GPU machine and the scoring machine differ:

``measure`` (on the GPU, after ``bench/gpu_check.sh`` has pre-trained there with ``accelerate
launch``): seconds per training step fp32 vs bf16 autocast at batch 64 and 256, unconditional
sampling tiles/s (DDIM 20 and 50, fp32 and bf16, decode included), and 512 samples of every
GPU-trained model (seeds 0..511, DDIM-50 fp32: the preset's sampler) as ``.npy`` files, with each
EMA UNet in fp16 where that is under 15 MiB, so the files can come back.

``score`` (here, on the CPU): the same 512 seeds from the CPU-trained UNet of a protocol run,
then KID and FD of every model's samples vs 1024 real pool tiles in the SimCLR feature space of
``bench/pretrain_trials.py``, grids, and ``bench/results/gpu/gpu_check.{json,md}``.

    bash bench/gpu_check.sh                      # on the GPU machine (see its header)
    python bench/gpu_check.py score --gpu-out DIR --cpu-run /work/runs/pcam-1pct \\
        --encoder /work/runs/trials-bench/features-encoder
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import accelerate
import diffusers
import numpy as np
import torch
from safetensors.torch import save_file

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.latents import LatentSet
from histodiffusion.diffusion.generate import generate
from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.diffusion.sampling import unet_eps_fn
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.io import read_json, read_jsonl, write_json, write_text
from histodiffusion.models.unet import build_unet, count_parameters
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.pretrain import load_unet

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu"
N_SAMPLES = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_speed(cfg, run: Path, device: torch.device, batch: int, precision: str, steps: int) -> dict:
    """Seconds per optimisation step of the preset's UNet on the latent cache (warm-up excluded)."""
    latents = LatentSet(run / "latents" / "pool", device)
    c, h, _ = latents.shape
    torch.manual_seed(0)
    unet = build_unet(cfg.pretrain.unet, h, c).to(device).train()
    sched = training_scheduler(cfg.diffusion)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        z = random_dihedral(latents.sample(torch.randint(0, len(latents), (batch,), generator=g), g), g)
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion_loss(unet, sched, z, noise, t, cfg.diffusion.min_snr_gamma)
        opt.zero_grad()
        loss.backward()
        opt.step()

    warmup = min(10, steps)
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    s = (time.perf_counter() - t0) / steps
    return {"batch": batch, "precision": precision, "seconds_per_step": round(s, 4), "latents_per_s": round(batch / s, 1)}


def sample_array(cfg, run: Path, device: torch.device, n: int, steps: int = 50, precision: str = "fp32",
                 batch: int = 256) -> tuple[np.ndarray, float]:
    """Tiles for seeds 0..n-1 from ``run``'s pre-trained EMA UNet, and the seconds it took."""
    unet, sched = load_unet(run / "pretrain", device)
    vae = load_vae(run / "autoencoder", device)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    eps = unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod)
    s = cfg.sampling.model_copy(update={"sampler": "ddim", "num_steps": steps, "precision": precision,
                                        "batch_size": batch})
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        tiles = [t for _, t, _ in generate(lambda _b: eps, vae, sched, shape, range(n), cfg.seed, s, device)]
    _sync(device)
    return np.concatenate(tiles), time.perf_counter() - t0


def measure(args) -> None:
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    result: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    result.update(accelerate=accelerate.__version__, diffusers=diffusers.__version__)
    first = Path(args.runs[0])
    result["training"] = [training_speed(cfg, first, device, b, p, args.steps)
                          for b in (64, 256) for p in ("fp32", "bf16")]
    print(json.dumps(result["training"], indent=1), flush=True)
    result["sampling"] = {}
    for steps in (20, 50):
        for precision in ("fp32", "bf16"):
            sample_array(cfg, first, device, 8, steps, precision)  # warm-up (kernels, cuDNN plans)
            _, seconds = sample_array(cfg, first, device, args.tiles, steps, precision)
            result["sampling"][f"ddim{steps}-{precision}"] = {"tiles": args.tiles, "seconds": round(seconds, 3),
                                                              "tiles_per_s": round(args.tiles / seconds, 1)}
    print(json.dumps(result["sampling"], indent=1), flush=True)
    result["runs"] = {}
    for run in map(Path, args.runs):
        name = run.name
        tiles, seconds = sample_array(cfg, run, device, args.num_samples)
        np.save(out / f"{name}_samples.npy", tiles)
        unet, _ = load_unet(run / "pretrain")
        if count_parameters(unet) * 2 < 15 * 2**20:  # fp16 bytes: what a device call can bring back
            save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()},
                      str(out / f"{name}_unet_fp16.safetensors"))
        else:
            print(f"{name}: the UNet is over 15 MiB in fp16, too large to bring back; only its samples are kept", flush=True)
        state = read_json(run / "pretrain" / "DONE") if (run / "pretrain" / "DONE").is_file() else None
        records = read_jsonl(run / "pretrain" / "metrics.jsonl")
        result["runs"][name] = {"done": state is not None, "summary": (state or {}).get("summary"),
                                "steps_reached": records[-1]["step"] if records else 0,
                                "latents_per_s": round(float(np.median([x["images_per_s"] for x in records])), 1)
                                if records else None,
                                "metrics": records, "sampling_seconds": round(seconds, 2)}
    write_json(out / "gpu_check.json", result)
    print("measure: done", flush=True)


# ------------------------------------------------------------------------------- score (CPU)
def score(args) -> None:
    from histodiffusion.data.cache import TileCache
    from histodiffusion.metrics.generation import frechet_distance, kernel_inception_distance
    from histodiffusion.models.features import extract_features, load_encoder
    from histodiffusion.viz import compact_png, grid, save_image

    cfg = load_config(args.config)
    gpu_outs, cpu_run = [Path(p) for p in args.gpu_out], Path(args.cpu_run)
    # throughput from the first output folder; runs (and their phases) from all of them
    result = read_json(gpu_outs[0] / "gpu_check.json")
    result["runs"], result["phases"], found = {}, {}, {}
    for folder in gpu_outs:
        for name, run in read_json(folder / "gpu_check.json")["runs"].items():
            result["runs"][name], found[name] = run, folder / f"{name}_samples.npy"
        phases = folder / "phases.txt"  # "NAME rc=N seconds=S" per phase
        if phases.is_file():
            result["phases"].update({name: {k: int(v) for k, v in (kv.split("=") for kv in rest)}
                                     for name, *rest in (line.split() for line in phases.read_text().splitlines()
                                                         if line)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    cpu_samples = RESULTS.parent.parent / "work" / "gpu_cpu_samples.npy"  # bench/work: ignored, kept
    if not cpu_samples.is_file():
        cpu_samples.parent.mkdir(parents=True, exist_ok=True)
        tiles, _ = sample_array(cfg, cpu_run, torch.device("cpu"), N_SAMPLES, batch=64)
        np.save(cpu_samples, tiles)
    sets = {"cpu-profile (CPU)": np.load(cpu_samples)}
    sets.update({f"{name} (GPU)": np.load(path) for name, path in found.items()})
    encoder = load_encoder(args.encoder)
    cache = TileCache(cpu_run / "data" / "cache" / "pool")
    rows = np.sort(np.random.default_rng(0).choice(len(cache), size=min(1024, len(cache)), replace=False))
    real = extract_features(encoder, cache.take(rows)).astype(np.float64)
    scores = {}
    for name, tiles in sets.items():
        fake = extract_features(encoder, tiles).astype(np.float64)
        kid, kid_std = kernel_inception_distance(real, fake, subset_size=min(len(fake), 512))
        scores[name] = {"kid": round(kid, 5), "kid_std": round(kid_std, 5),
                        "fd": round(frechet_distance(real, fake), 4), "n_samples": len(fake), "n_real": len(real)}
        # The same seeds as the CPU-trained model: how far apart are the tiles, in grey levels?
        diff = np.abs(tiles.astype(np.int16) - sets["cpu-profile (CPU)"].astype(np.int16)).mean((1, 2, 3))
        scores[name].update(vs_cpu_mean_abs=round(float(diff.mean()), 2), vs_cpu_max_tile=round(float(diff.max()), 2))
        slug = name.split(" ")[0]
        compact_png(save_image(grid(tiles[:64]), RESULTS / f"samples_{slug}.png", scale=2))
    cpu = sets["cpu-profile (CPU)"].astype(np.int16)
    result["unrelated_tiles_mean_abs"] = round(float(np.abs(cpu - cpu[::-1]).mean()), 2)  # seed k vs seed N-1-k
    compact_png(save_image(grid(cache.take(rows[:64])), RESULTS / "real_pool.png", scale=2))
    cpu_state = read_json(cpu_run / "pretrain" / "DONE")
    result["scores"] = scores
    cpu_rate = [x["images_per_s"] for x in read_jsonl(cpu_run / "pretrain" / "metrics.jsonl")]
    result["cpu_reference"] = {"run": str(cpu_run), "summary": cpu_state.get("summary"),
                               "wall_seconds": cpu_state.get("summary", {}).get("wall_seconds"),
                               "latents_per_s": round(float(np.median(cpu_rate)), 1)}
    result["score_command"] = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    for run in result["runs"].values():
        run.pop("metrics", None)  # kept in the GPU output; the table needs the totals only
    write_json(RESULTS / "gpu_check.json", result)
    write_text(RESULTS / "gpu_check.md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# The cpu profile on a GPU", "",
             f"GPU: {r['device']}; torch {r['torch']} (CUDA {r['cuda']}), diffusers {r.get('diffusers')}, "
             f"accelerate {r.get('accelerate')}, Python {r['python']}.  ",
             "Command on the GPU machine: `bash bench/gpu_check.sh` (pre-training through "
             "`accelerate launch --mixed_precision bf16 -m histodiffusion pretrain ...`, then "
             "`python bench/gpu_check.py measure`).  ",
             f"Scored here (2-core x86_64 CPU): `{r.get('score_command', '')}`", "",
             "## Pre-training (the same latent cache and autoencoder as the CPU protocol run)", "",
             "Steps reached: the last logged step (every 50). Wall: the stage's own time when it finished, else "
             "the whole phase of gpu_check.sh (launch included). Latents/s: median over the logged intervals.", "",
             "| run | steps reached | wall (s) | final loss | latents/s |", "|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        s = run.get("summary") or {}
        wall = s.get("wall_seconds") or r.get("phases", {}).get(name, {}).get("seconds", "-")
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "- (time limit)"
        lines.append(f"| {name} (GPU) | {run['steps_reached']} | {wall} | {loss} | {run['latents_per_s']} |")
    c = r.get("cpu_reference", {})
    if c:
        s = c.get("summary") or {}
        lines.append(f"| cpu-profile (CPU, {c['run']}) | {s.get('steps', '-')} | {c.get('wall_seconds', '-')} | "
                     f"{s.get('final_loss', 0):.4f} | {c.get('latents_per_s', '-')} |")
    lines += ["", "## Training step, the preset's UNet (warm-up excluded)", "",
              "| batch | precision | s/step | latents/s |", "|---|---|---|---|"]
    lines += [f"| {t['batch']} | {t['precision']} | {t['seconds_per_step']} | {t['latents_per_s']} |"
              for t in r["training"]]
    lines += ["", "## Unconditional sampling, decode included", "",
              "| setting | tiles | seconds | tiles/s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['tiles']} | {v['seconds']} | {v['tiles_per_s']} |" for k, v in r["sampling"].items()]
    if "scores" in r:
        n = next(iter(r["scores"].values()))["n_samples"]
        lines += ["", f"## Sample quality: {n} samples (seeds 0-{n - 1}, DDIM-50) vs 1024 real pool tiles", "",
                  "SimCLR (ResNet-18) features of `bench/pretrain_trials.py`; lower is better.", "",
                  "Last two columns: mean absolute difference to the CPU-trained model's tile of the same seed, in "
                  f"grey levels (0-255), over all tiles and for the farthest tile; two unrelated tiles of the CPU "
                  f"model differ by {r.get('unrelated_tiles_mean_abs')}.", "",
                  "| model | KID | KID std | FD | vs CPU, mean | vs CPU, farthest tile | grid |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['kid']} | {v['kid_std']} | {v['fd']} | {v['vs_cpu_mean_abs']} | {v['vs_cpu_max_tile']} | "
                  f"![](samples_{k.split(' ')[0]}.png) |" for k, v in r["scores"].items()]
        lines += ["", "Real pool tiles: ![](real_pool.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="on the GPU: throughput and samples of the GPU-trained runs")
    m.add_argument("--runs", nargs="+", required=True, help="run directories pre-trained on the GPU")
    m.add_argument("--out", required=True)
    m.add_argument("--config", type=Path, default=REPO / "configs" / "pcam-fewlabel.yaml")
    m.add_argument("--steps", type=int, default=50, help="timed training steps per setting")
    m.add_argument("--tiles", type=int, default=256, help="tiles per sampling-throughput setting")
    m.add_argument("--num-samples", type=int, default=N_SAMPLES, help="samples kept per run, for scoring")
    s = sub.add_parser("score", help="here: KID/FD vs real tiles, grids, tables")
    s.add_argument("--gpu-out", nargs="+", required=True, help="output folders of GPU calls (first: throughput)")
    s.add_argument("--cpu-run", required=True)
    s.add_argument("--encoder", required=True)
    s.add_argument("--config", type=Path, default=REPO / "configs" / "pcam-fewlabel.yaml")
    args = ap.parse_args()
    measure(args) if args.cmd == "measure" else score(args)


if __name__ == "__main__":
    guarded(main)
