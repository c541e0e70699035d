"""Classifier two-sample test: how easily a CNN tells a model's samples from real pool tiles.

KID and FD of 64 samples in the trials' SimCLR feature space hardly see shapes: a Gaussian fitted
to the pool latents, which has their colour and texture but no shapes, scores as well as the LDMs
(``bench/results/pretrain_trials/trials.md``). This test is a stricter judge. For each set, a
ResNet-18 is trained from scratch to tell N tiles of the set from N reference tiles: real pool tiles
reconstructed by the same autoencoder, so the autoencoder's blur gives nothing away and only
what the LDM adds is measured. Both sides are split 50/25/25 into train, valid (the best step is
chosen on it) and test; the table reports test accuracy (50 % = indistinguishable, 100 % =
always told apart), its binomial standard error and the ROC AUC.

Sets (each option repeatable):
  --run NAME=RUN_DIR       N samples of the run's pre-trained LDM (the run's sampling settings, or
                           those given by --set NAME:sampling.KEY=VALUE, e.g. sampling.sampler=ddpm)
  --samples NAME=FILE.npy  the first N tiles of an (n, H, W, 3) uint8 array (samples brought back
                           from elsewhere, e.g. a GPU); --samples-run RUN_DIR names the run whose
                           autoencoder decoded them (the reference side)
  --control RUN_DIR        two sets on the run's autoencoder: N other reconstructed real tiles
                           (the test's false alarm, expected near 50 %) and N raw real tiles
                           (what the autoencoder itself gives away)

    python bench/two_sample_test.py --run pcam=runs/pcam-practical --control runs/pcam-practical \\
        --out bench/results/pcam-practical/two_sample
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histodiffusion.cli import guarded
from histodiffusion.config import ImageClassifierCfg, load_config
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import read_rgb
from histodiffusion.data.prepared import pool_tiles
from histodiffusion.devices import inference_device, machine
from histodiffusion.diffusion.sampling import write_samples
from histodiffusion.errors import UserError
from histodiffusion.io import weights_hash, write_json, write_text
from histodiffusion.metrics.classification import binary_auroc
from histodiffusion.models.autoencoder import load_vae, reconstruct_tiles
from histodiffusion.models.tile_classifier import predict_logits
from histodiffusion.models.unet import load_unet
from histodiffusion.training.tile_classifier import train_tile_classifier
from histodiffusion.viz import grid, save_image


def splits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded 50/25/25 split of ``range(n)`` into train, valid and test indices."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = n // 2, n // 2 + n // 4
    return order[:a], order[a:b], order[b:]


def separability(reference: np.ndarray, other: np.ndarray, cfg: ImageClassifierCfg, seed: int,
                 progress: bool = True) -> dict:
    """Train a classifier to tell ``other`` (label 1) from ``reference`` (label 0), both (N, H, W, 3)
    uint8 of equal N; score it on their held-out quarters."""
    if len(reference) != len(other) or len(reference) < 8:
        raise UserError(f"two-sample test needs two sets of equal size >= 8, got {len(reference)} and {len(other)}")
    parts = [splits(len(reference), seed), splits(len(other), seed + 1)]

    def take(i: int) -> tuple[np.ndarray, np.ndarray]:
        tiles = np.concatenate([reference[parts[0][i]], other[parts[1][i]]])
        return tiles, np.repeat([0, 1], [len(parts[0][i]), len(parts[1][i])])

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = take(0), take(1), take(2)
    trained = train_tile_classifier(train_x, train_y, valid_x, valid_y, 2, seed,
                                    **cfg.model_dump(exclude={"eval_max"}), description="two-sample",
                                    progress=progress)
    logits = predict_logits(trained.model, test_x, precision=cfg.precision)
    accuracy = float(np.mean(logits.argmax(1) == test_y))
    return {"test_accuracy": round(accuracy, 4),
            "test_accuracy_se": round(float(np.sqrt(accuracy * (1 - accuracy) / len(test_y))), 4),
            "test_auc": round(binary_auroc(logits[:, 1] - logits[:, 0], test_y == 1), 4), "best_step": trained.best_step,
            "n_train": int(len(train_y)), "n_valid": int(len(valid_y)), "n_test": int(len(test_y))}


def real_rows(run: Path, n: int, seed: int) -> tuple[TileCache, np.ndarray, np.ndarray]:
    """The run's pool cache and two disjoint sets of n seeded rows: the reference set's and the
    controls'. Both are random draws from the whole pool (its rows come grouped by source, so
    halves of a sorted draw would differ in source), each sorted for reading."""
    cache = pool_tiles(run / "data")
    if len(cache) < 2 * n:
        raise UserError(f"{run}: the pool has {len(cache)} tiles, fewer than 2 x --n = {2 * n}; lower --n")
    rows = np.random.default_rng(seed).choice(len(cache), size=2 * n, replace=False)
    return cache, np.sort(rows[:n]), np.sort(rows[n:])


def reference_set(run: Path, n: int, seed: int, control: bool = False) -> np.ndarray:
    """N real pool tiles reconstructed by the run's autoencoder: the reference rows of
    :func:`real_rows`, or with ``control`` its other rows (the false-alarm control)."""
    cache, reference, other = real_rows(run, n, seed)
    vae = load_vae(run / "autoencoder", inference_device(load_config(run / "config.yaml").device))
    return reconstruct_tiles(vae, cache.take(other if control else reference))


def ldm_set(run: Path, n: int, overrides: list[str] = ()) -> np.ndarray:
    """N samples of the run's pre-trained LDM (seeds 0..n-1, as ``histodiffusion sample`` draws them),
    with the run's sampling settings after ``overrides`` (``sampling.KEY=VALUE``). The PNGs stay in
    the run's ``samples/two-sample-<weights hash>-<sampler><steps>-eta<eta>-<precision>``: a rerun
    with the same weights and sampler reuses them; more training or another sampler draws anew."""
    cfg = load_config(run / "config.yaml", overrides)
    s = cfg.sampling
    tag = f"{weights_hash(run / 'pretrain' / 'unet')}-{s.sampler}{s.num_steps}-eta{s.eta:g}-{s.precision}"
    out = run / "samples" / f"two-sample-{tag}"
    device = inference_device(cfg.device)
    unet, noise_scheduler = load_unet(run / "pretrain", device)
    write_samples(unet, load_vae(run / "autoencoder", device), noise_scheduler, out, n, cfg.seed, s.model_dump(),
                  device, extra={"model": "pretrain"})
    return np.stack([read_rgb(out / f"{k:06d}.png") for k in range(n)])


def npy_tiles(path: Path, n: int) -> np.ndarray:
    """The first ``n`` tiles of a saved (count, H, W, 3) uint8 array."""
    if not path.is_file():
        raise UserError(f"--samples {path}: no such file")
    try:
        tiles = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise UserError(f"--samples {path}: not a NumPy .npy array ({err})") from err
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise UserError(f"--samples {path}: expected (count, H, W, 3) uint8 tiles, got {tiles.shape} {tiles.dtype}")
    if len(tiles) < n:
        raise UserError(f"--samples {path}: {len(tiles)} tiles, fewer than --n {n}; lower --n or bring more")
    return np.ascontiguousarray(tiles[:n])


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


def set_overrides(ap: argparse.ArgumentParser, items: list[str], names: list[str]) -> dict[str, list[str]]:
    """``--set NAME:sampling.KEY=VALUE`` options grouped by the --run set they change."""
    overrides: dict[str, list[str]] = {}
    for item in items:
        name, sep, assignment = item.partition(":")
        if not sep or name not in names or not assignment.startswith("sampling.") or "=" not in assignment:
            ap.error(f"--set {item!r}: expected NAME:sampling.KEY=VALUE with NAME one of the --run names "
                     f"({', '.join(names) or 'none given'})")
        overrides.setdefault(name, []).append(assignment)
    return overrides


def collect_sets(args, ap: argparse.ArgumentParser) -> list[tuple[str, str, Path, Callable[[], np.ndarray]]]:
    """(name, kind, run, make) per requested set; ``make()`` returns its N tiles."""
    sets = []
    runs = named_runs(ap, args.run)
    overrides = set_overrides(ap, args.set, [name for name, _ in runs])
    for name, run in runs:
        kind = "LDM samples" + (f" ({', '.join(overrides[name])})" if overrides.get(name) else "")
        sets.append((name, kind, run, lambda run=run, o=overrides.get(name, []): ldm_set(run, args.n, o)))
    if args.samples and args.samples_run is None:
        ap.error("--samples needs --samples-run RUN_DIR: the run whose autoencoder decoded them")
    for name, path in named_runs(ap, args.samples, "--samples", "FILE.npy"):
        sets.append((name, f"samples from {path.name}", args.samples_run,
                     lambda path=path: npy_tiles(path, args.n)))
    for run in args.control:
        def other(run=run):
            return reference_set(run, args.n, args.seed, control=True)

        def raw(run=run):
            cache, _, rows = real_rows(run, args.n, args.seed)
            return cache.take(rows)

        sets.append((f"control-reconstructed-{run.name}", "other real tiles, reconstructed (false alarm)", run, other))
        sets.append((f"control-raw-{run.name}", "other real tiles, not reconstructed", run, raw))
    if not sets:
        ap.error("name at least one set: --run, --samples or --control")
    return sets


def markdown(results: dict, cfg: ImageClassifierCfg, command: str) -> str:
    lines = ["# Classifier two-sample test", "",
             f"A {cfg.backbone} trained from scratch ({cfg.steps} steps of {cfg.batch_size}, {cfg.precision}) tells "
             "each set's tiles from real pool tiles reconstructed by the same autoencoder. Test accuracy on the held-out quarter of both: 50 % = indistinguishable, "
             "100 % = always told apart. Lower is better for a generative model.", "",
             f"Command: `{command}`", f"Machine: {machine()}", "",
             "| set | what | run | test accuracy | ± (se) | AUC | best step | train / valid / test |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['kind']} | `{r['run']}` | {100 * r['test_accuracy']:.1f} % | "
                     f"{100 * r['test_accuracy_se']:.1f} | {r['test_auc']:.3f} | {r['best_step']} | "
                     f"{r['n_train']} / {r['n_valid']} / {r['n_test']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR")
    ap.add_argument("--control", action="append", default=[], type=Path, metavar="RUN_DIR")
    ap.add_argument("--samples", action="append", default=[], metavar="NAME=FILE.npy")
    ap.add_argument("--samples-run", type=Path, metavar="RUN_DIR",
                    help="the run whose autoencoder decoded the --samples tiles")
    ap.add_argument("--set", action="append", default=[], metavar="NAME:sampling.KEY=VALUE",
                    help="sampler setting for one --run set, e.g. I3-ddpm:sampling.sampler=ddpm")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=768, help="tiles per side and set")
    ap.add_argument("--steps", type=int, default=300, help="classifier training steps")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n < 8 or args.steps < 1:
        ap.error("--n must be at least 8 and --steps at least 1")
    cfg = ImageClassifierCfg(backbone=args.backbone, steps=args.steps, batch_size=64, lr=1e-3, warmup_steps=30,
                             eval_every=max(1, args.steps // 6), eval_max=args.n, color_jitter=0.0,
                             precision="bf16")
    references: dict[Path, np.ndarray] = {}
    results = {}
    for name, kind, run, make in collect_sets(args, ap):
        key = (run / "autoencoder").resolve()
        if key not in references:
            references[key] = reference_set(run, args.n, args.seed)
        tiles = make()
        save_image(grid(tiles[:64], ncol=8), args.out / f"{name}.png", scale=2)
        results[name] = {"kind": kind, "run": str(run), "autoencoder": str(key),
                         **separability(references[key], tiles, cfg, args.seed)}
        print(name, results[name], flush=True)
        write_json(args.out / "two_sample.json", results)
    write_text(args.out / "README.md", markdown(results, cfg, "python bench/two_sample_test.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    guarded(main)
