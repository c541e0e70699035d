"""Autoencoder, latent cache and LDM pre-training on the tiny preset: files, exact resume, plain diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from histodiffusion.data.images import read_rgb
from histodiffusion.data.latents import LatentSet
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from histodiffusion.training.loop import Checkpointer


def test_stage_outputs(smoke_run: RunDir) -> None:
    root = smoke_run.root
    for path in ("autoencoder/vae/config.json", "autoencoder/vae/diffusion_pytorch_model.safetensors",
                 "autoencoder/metrics.json", "latents/pool/index.json", "pretrain/unet/config.json",
                 "pretrain/scheduler/scheduler_config.json", "pretrain/metrics.jsonl", "pretrain/DONE"):
        assert (root / path).is_file(), path
    vae_cfg = json.loads((root / "autoencoder/vae/config.json").read_text())
    metrics = json.loads((root / "autoencoder/metrics.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert vae_cfg["latents_mean"] == pytest.approx(metrics["latents_mean"]) and len(vae_cfg["latents_std"]) == 3
    assert vae_cfg["scaling_factor"] != 0.18215 and metrics["scaling_factor"] > 0
    assert metrics["n_tiles"] >= 1 and np.isfinite(metrics["psnr_db"])
    assert sorted(p.name for p in (root / "pretrain/samples").iterdir())  # a preview grid was written
    log = [json.loads(line) for line in (root / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and "images_per_s" in log[-1] and np.isfinite(log[-1]["loss"])


def test_latent_cache_normalised_per_channel(smoke_run: RunDir) -> None:
    latents = LatentSet(smoke_run.root / "latents" / "pool")
    z = latents.sample(torch.arange(len(latents)), torch.Generator().manual_seed(0))
    # Measured on the training part of the pool, so over the whole pool close to N(0, 1) per channel.
    assert z.shape[1:] == (3, 8, 8)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.3)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=0.3)


def test_latent_scale_is_measured_on_every_source(smoke_run: RunDir, smoke_cfg) -> None:
    """The pool's rows come grouped by source; the tiles that set the normalisation must not be its first rows."""
    from histodiffusion.data.sources import read_manifest
    from histodiffusion.stages.autoencoder import PoolTiles

    pool = PoolTiles(smoke_run.root / "data", smoke_cfg.autoencoder.holdout_fraction, smoke_cfg.seed)
    sources = np.array([r.source for r in read_manifest(smoke_run.root / "data" / "pool.csv")])
    n = len(pool.train) // 2
    rows = pool.scale_rows(smoke_cfg.seed, size=n)
    assert len(rows) == n and len(set(rows.tolist())) == n and np.all(np.diff(rows) > 0)
    assert set(rows.tolist()) <= set(pool.train.tolist())
    assert set(sources[rows]) == set(sources[pool.train]) != set(sources[pool.train[:n]])
    assert np.array_equal(rows, pool.scale_rows(smoke_cfg.seed, size=n))
    assert np.array_equal(pool.scale_rows(smoke_cfg.seed, size=10 * len(pool.train)), pool.train)


def test_reconstructed_tiles_match_the_stage_psnr(smoke_run: RunDir, smoke_cfg) -> None:
    """reconstruct_tiles (uint8 in, uint8 out, any batch size) reproduces the autoencoder stage's held-out PSNR."""
    from histodiffusion.models.autoencoder import psnr, reconstruct_tiles, tiles_to_tensor
    from histodiffusion.stages.autoencoder import PoolTiles, load_vae

    pool = PoolTiles(smoke_run.root / "data", smoke_cfg.autoencoder.holdout_fraction, smoke_cfg.seed)
    tiles = pool.cache.take(pool.holdout)
    vae = load_vae(smoke_run.root / "autoencoder")
    rec = reconstruct_tiles(vae, tiles, batch_size=2)
    assert rec.shape == tiles.shape and rec.dtype == np.uint8
    assert np.abs(rec.astype(int) - reconstruct_tiles(vae, tiles, batch_size=64)).max() <= 1
    stage = json.loads((smoke_run.root / "autoencoder/metrics.json").read_text())
    measured = float(psnr(tiles_to_tensor(rec), tiles_to_tensor(tiles)).mean())
    assert measured == pytest.approx(stage["psnr_db"], abs=0.3)  # only uint8 rounding differs
    assert reconstruct_tiles(vae, tiles[:0]).shape == (0, *tiles.shape[1:])


def test_normalization_round_trip() -> None:
    from types import SimpleNamespace

    from histodiffusion.models.autoencoder import denormalize_latents, normalize_latents

    z = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + 3
    for cfg in (SimpleNamespace(scaling_factor=0.4, latents_mean=[3.0, 3.0, 3.0], latents_std=[1.5, 0.4, 0.8]),
                SimpleNamespace(scaling_factor=0.4, latents_mean=None, latents_std=None)):
        assert torch.allclose(denormalize_latents(normalize_latents(z, cfg), cfg), z, atol=1e-5)


def test_plain_diffusers_loads_and_samples(smoke_run: RunDir) -> None:
    """The checkpoints need no project code: diffusers alone loads and samples from them."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    root = smoke_run.root
    unet = UNet2DModel.from_pretrained(root / "pretrain" / "unet").eval()
    vae = AutoencoderKL.from_pretrained(root / "autoencoder" / "vae").eval()
    scheduler = DDIMScheduler.from_pretrained(root / "pretrain" / "scheduler")
    scheduler.set_timesteps(5)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        # diffusers' SDXL convention for per-channel latent statistics
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        images = vae.decode(x * std / vae.config.scaling_factor + mean).sample
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def _train_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pretrain" / "unet" / "diffusion_pytorch_model.safetensors"))


def _pretrain_ready(smoke_run: RunDir, tmp_path: Path, *names: str) -> list[RunDir]:
    """Run directories under ``tmp_path`` holding the smoke run's data, autoencoder and latents."""
    import shutil

    runs = [RunDir(tmp_path / name) for name in names]
    for rd in runs:
        for stage in ("data", "autoencoder", "latents"):
            shutil.copytree(smoke_run.root / stage, rd.root / stage)
    return runs


def test_interrupted_training_resumes_to_identical_weights(smoke_run: RunDir, smoke_cfg, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:

    import histodiffusion.stages.pretrain as pretrain_mod

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.checkpoint_every = 2
    cfg.pretrain.train.steps = 6
    straight, interrupted = _pretrain_ready(smoke_run, tmp_path, "straight", "interrupted")
    run_stage("pretrain", cfg, straight)

    real = pretrain_mod.accumulate_step
    calls = {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # steps 0-3 done and checkpointed at step 4; killed during step index 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "accumulate_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", cfg, interrupted)
    assert not (interrupted.root / "pretrain" / "DONE").exists()
    assert (interrupted.root / "pretrain" / "checkpoints" / "step-0000004" / "meta.json").is_file()
    monkeypatch.setattr(pretrain_mod, "accumulate_step", real)
    run_stage("pretrain", cfg, interrupted)

    a, b = _train_weights(straight.root), _train_weights(interrupted.root)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(x) for x in (interrupted.root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]


def test_more_steps_continue_a_finished_stage(smoke_run: RunDir, smoke_cfg, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking a finished training stage for more steps continues it from its last checkpoint, to the
    weights of a run that asked for that many steps from the start; fewer steps are refused."""

    import histodiffusion.stages.pretrain as pretrain_mod
    from histodiffusion.errors import UserError

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.checkpoint_every = 2
    straight, extended = _pretrain_ready(smoke_run, tmp_path, "straight", "extended")
    cfg.pretrain.train.steps = 8
    run_stage("pretrain", cfg, straight)
    cfg.pretrain.train.steps = 4
    run_stage("pretrain", cfg, extended)
    real, calls = pretrain_mod.accumulate_step, []
    monkeypatch.setattr(pretrain_mod, "accumulate_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg.pretrain.train.steps = 8
    run_stage("pretrain", cfg, extended)
    assert len(calls) == 4  # only the new steps were trained

    a, b = _train_weights(straight.root), _train_weights(extended.root)
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((extended.root / "pretrain" / "DONE").read_text())
    assert done["summary"]["extended_from"] == {"pretrain.train.steps": 4, "pretrain.train.cooldown_steps": 0}
    assert done["summary"]["steps"] == 8
    log = [json.loads(x) for x in (extended.root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]  # the first run's log is kept

    cfg.pretrain.train.steps = 6
    with pytest.raises(UserError, match="pretrain.train.steps: 8 before, 6 now"):
        run_stage("pretrain", cfg, extended)
    cfg.pretrain.train.steps, cfg.pretrain.train.lr = 10, cfg.pretrain.train.lr * 2
    with pytest.raises(UserError, match="different config"):  # more steps, but also another lr
        run_stage("pretrain", cfg, extended)


def test_cooldown_added_later_matches_a_run_that_asked_for_it(smoke_run: RunDir, smoke_cfg, tmp_path: Path) -> None:
    """A constant-LR run trained on with a cooldown in the added steps ends at the weights of a run
    that asked for the cooldown from the start; a cooldown reaching into trained steps is refused."""

    from histodiffusion.errors import UserError
    from histodiffusion.training.loop import lr_multiplier

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.checkpoint_every, cfg.pretrain.train.warmup_steps = 2, 2
    straight, later = _pretrain_ready(smoke_run, tmp_path, "straight", "later")
    cfg.pretrain.train.steps, cfg.pretrain.train.cooldown_steps = 8, 4
    assert [lr_multiplier(cfg.pretrain.train)(s) for s in range(8)] == [0.5, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    run_stage("pretrain", cfg, straight)
    cfg.pretrain.train.steps, cfg.pretrain.train.cooldown_steps = 4, 0
    run_stage("pretrain", cfg, later)
    plain = _train_weights(later.root)
    cfg.pretrain.train.steps, cfg.pretrain.train.cooldown_steps = 8, 5
    with pytest.raises(UserError, match="cooldown_steps = 5 would start the cooldown at step 3"):
        run_stage("pretrain", cfg, later)
    cfg.pretrain.train.cooldown_steps = 4
    run_stage("pretrain", cfg, later)

    a, b = _train_weights(straight.root), _train_weights(later.root)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    log = [json.loads(x) for x in (later.root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] < log[1]["lr"]  # the last logged step ran at a lower rate
    assert json.loads((later.root / "pretrain" / "DONE").read_text())["summary"]["extended_from"] == {
        "pretrain.train.steps": 4, "pretrain.train.cooldown_steps": 0}


def test_sample_command_tiles_do_not_depend_on_batch_size(smoke_run: RunDir, smoke_cfg, tmp_path: Path) -> None:
    from histodiffusion.stages.sample import sample_tiles

    a = sample_tiles(smoke_cfg.model_copy(update={"sampling": smoke_cfg.sampling.model_copy(update={"batch_size": 5})}),
                     smoke_run, 5, out=tmp_path / "a")
    b = sample_tiles(smoke_cfg.model_copy(update={"sampling": smoke_cfg.sampling.model_copy(update={"batch_size": 2})}),
                     smoke_run, 5, out=tmp_path / "b")
    for k in range(5):
        ta, tb = (np.asarray(Image.open(d / f"{k:06d}.png"), dtype=int) for d in (a, b))
        # the same noise per tile; batched kernels may round differently by one grey level on some CPUs
        assert np.abs(ta - tb).max() <= 1 and np.mean(ta != tb) < 0.05
    assert (a / "grid.png").is_file() and json.loads((a / "sampling.json").read_text())["num"] == 5


def test_time_limit_pauses_and_rerun_continues(smoke_run: RunDir, smoke_cfg, tmp_path: Path) -> None:

    from histodiffusion.errors import StagePaused

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.steps = 400
    cfg.pretrain.train.time_limit_minutes = 0.02  # about a second of training per invocation
    (rd,) = _pretrain_ready(smoke_run, tmp_path, "run")
    with pytest.raises(StagePaused, match="Rerun the same command to continue"):
        run_stage("pretrain", cfg, rd)
    assert (rd.root / "pretrain" / "unet" / "config.json").is_file()  # the EMA so far is usable
    first = max(int(p.name.split("-")[1]) for p in (rd.root / "pretrain" / "checkpoints").iterdir())
    assert 0 < first < 400
    cfg.pretrain.train.time_limit_minutes = None
    run_stage("pretrain", cfg, rd)
    assert json.loads((rd.root / "pretrain" / "DONE").read_text())["summary"]["steps"] == 400


def test_perceptual_loss_without_weights_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchmetrics.image.lpip as lpip

    from histodiffusion.errors import UserError
    from histodiffusion.models.autoencoder import load_lpips

    def offline(*_a, **_k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", offline)
    with pytest.raises(UserError, match=r"VGG-16 weights.*perceptual_weight: 0"):
        load_lpips()


def test_scale_equivariance_term_enters_the_autoencoder_loss(smoke_run: RunDir, smoke_cfg, tmp_path: Path) -> None:
    """With scale_equivariance_weight the logged loss is L1 + SSIM + KL terms plus weight x the pooled-latent term."""
    import shutil

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.autoencoder.scale_equivariance_weight = 0.5
    rd = RunDir(tmp_path / "run")
    shutil.copytree(smoke_run.root / "data", rd.root / "data")
    run_stage("autoencoder", cfg, rd)
    rows = [json.loads(line) for line in (rd.root / "autoencoder" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "scale_eq" in r]
    assert logged, "no scale_eq metric logged"
    ae = cfg.autoencoder
    for r in logged:
        assert r["scale_eq"] > 0
        expected = r["l1"] + ae.ssim_weight * (1 - r["ssim"]) + ae.kl_weight * r["kl"] + 0.5 * r["scale_eq"]
        assert r["loss"] == pytest.approx(expected, rel=1e-4)


def test_latent_diagnostics_on_a_trained_autoencoder(smoke_run: RunDir, tmp_path: Path) -> None:
    """bench/latent_diagnostics.py: white noise has more high-frequency power than smooth noise;
    on the smoke autoencoder it writes the table, the JSON and one grid, with finite PSNRs."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        from latent_diagnostics import radial_power
    finally:
        sys.path.remove(str(repo / "bench"))
    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
    white, blurred = radial_power(noise), radial_power(smooth)
    assert white.sum() == pytest.approx(1.0) and blurred.sum() == pytest.approx(1.0)
    assert white[4:].sum() > 2 * blurred[4:].sum()

    out = tmp_path / "diag"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "latent_diagnostics.py"), "--run",
                           f"smoke={smoke_run.root}", "--out", str(out), "--tiles", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "latent_diagnostics.json").read_text())["smoke"]
    assert result["tiles"] == 16
    assert len(result["latent_channel_mean"]) == len(result["latent_channel_std"]) == 3
    for key in ("reconstruction_psnr_db", "half_scale_psnr_db", "noise_0.2_psnr_db", "noise_0.4_psnr_db"):
        assert np.isfinite(result[key]), key
    assert result["noise_0.2_psnr_db"] > result["noise_0.4_psnr_db"]  # more latent noise, further from the clean decode
    assert (out / "smoke.png").is_file() and "| smoke |" in (out / "README.md").read_text()


def test_denoise_levels_probe(smoke_run: RunDir, tmp_path: Path) -> None:
    """bench/denoise_levels.py: a latent noised to t = 0 comes back almost unchanged, one started from
    (almost) pure noise does not; it writes the table, the JSON and the grid."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "levels"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "denoise_levels.py"), "--run",
                           f"smoke={smoke_run.root}", "--out", str(out), "--tiles", "4", "--levels", "1,1000"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    levels = json.loads((out / "denoise_levels.json").read_text())["smoke"]["levels"]
    assert levels["1"]["t"] == 0 and levels["1000"]["t"] == 999
    assert levels["1"]["psnr_vs_reconstruction_db"] > 30
    assert levels["1000"]["psnr_vs_reconstruction_db"] < levels["1"]["psnr_vs_reconstruction_db"] - 10
    assert (out / "smoke.png").is_file() and "| smoke |" in (out / "README.md").read_text()


def test_gaussian_baseline_matches_the_latent_statistics(smoke_run: RunDir) -> None:
    """bench/pretrain_trials.py's Gaussian baseline: its draws have the mean, the per-value variance
    and the neighbour correlation of the dihedrally augmented pool latents, repeat for a seed, and
    decode to tiles."""
    import sys

    from histodiffusion.data.augment import dihedral

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        from pretrain_trials import gaussian_latents, gaussian_tiles
    finally:
        sys.path.remove(str(repo / "bench"))
    tiles, latents = gaussian_tiles(smoke_run.root, 4, seed=0)
    assert tiles.shape == (4, 32, 32, 3) and tiles.dtype == np.uint8 and tiles.std() > 0

    # The posterior draw gaussian_latents fits to (its generator's first use).
    z = latents.sample(torch.arange(len(latents)), torch.Generator().manual_seed(1))
    data = torch.cat([dihedral(z, k) for k in range(8)]).double()
    draws = gaussian_latents(latents, 20000, seed=1).double()
    assert draws.shape == (20000, *latents.shape)
    assert torch.equal(gaussian_latents(latents, 5, seed=3), gaussian_latents(latents, 5, seed=3))
    assert gaussian_latents(latents, 5, seed=3, max_latents=16).shape == (5, *latents.shape)  # a subset fits

    def neighbour_corr(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1] - x.mean(0)[..., :, :-1], x[..., :, 1:] - x.mean(0)[..., :, 1:]
        return float((a * b).mean() / (a.std() * b.std()))

    assert torch.allclose(draws.mean(0), data.mean(0), atol=0.05 * float(data.std()))
    assert torch.allclose(draws.var(0), data.var(0), rtol=0.1, atol=1e-3 * float(data.var()))
    assert neighbour_corr(draws) == pytest.approx(neighbour_corr(data), abs=0.03)

    # Latents with strong spatial correlation (smoothed noise): the draws keep it, where a Gaussian
    # of independent values would give none.
    class Smooth:
        shape = (2, 8, 8)
        fields = torch.nn.functional.avg_pool2d(torch.randn(600, 2, 12, 12, generator=torch.Generator().manual_seed(4)),
                                                5, stride=1) + 0.5

        def __len__(self) -> int:
            return len(self.fields)

        def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return self.fields[idx]

    smooth = torch.cat([dihedral(Smooth.fields, k) for k in range(8)]).double()
    draws = gaussian_latents(Smooth(), 20000, seed=2).double()
    assert neighbour_corr(smooth) > 0.6
    assert neighbour_corr(draws) == pytest.approx(neighbour_corr(smooth), abs=0.03)
    assert torch.allclose(draws.mean(0), smooth.mean(0), atol=0.02)


def test_two_sample_test(smoke_run: RunDir, tmp_path: Path) -> None:
    """bench/two_sample_test.py: a classifier tells real tiles from colour-inverted ones almost always;
    the script runs every kind of set on the smoke run and writes its table."""
    import subprocess
    import sys

    from histodiffusion.config import ImageClassifierCfg
    from histodiffusion.data.cache import TileCache

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        from two_sample_test import real_rows, separability
    finally:
        sys.path.remove(str(repo / "bench"))
    # The reference and control rows are disjoint and each spread over the whole pool (whose rows
    # come grouped by source): halves of one sorted draw would sit at its two ends.
    cache, reference, other = real_rows(smoke_run.root, len(TileCache(smoke_run.root / "data" / "cache" / "pool")) // 4, 0)
    assert len(reference) == len(other) and not set(reference) & set(other)
    assert abs(reference.mean() - other.mean()) < 0.2 * len(cache)

    tiles = TileCache(smoke_run.root / "data" / "cache" / "pool").take(np.arange(96))
    cfg = ImageClassifierCfg(backbone="resnet10t", steps=30, batch_size=32, lr=1e-3, warmup_steps=3, eval_every=10,
                             color_jitter=0.0)
    told = separability(tiles[:48], 255 - tiles[48:], cfg, seed=0, progress=False)
    assert told["n_test"] == 24 and told["test_accuracy"] >= 0.9 and told["test_auc"] >= 0.9

    out = tmp_path / "two"
    script = [sys.executable, str(repo / "bench" / "two_sample_test.py"), "--out", str(out)]
    saved = tmp_path / "saved.npy"
    np.save(saved, TileCache(smoke_run.root / "data" / "cache" / "pool").take(np.arange(16)))
    proc = subprocess.run([*script, "--run", f"ldm={smoke_run.root}", "--run", f"ddpm={smoke_run.root}",
                           "--samples", f"npy={saved}", "--samples-run", str(smoke_run.root),
                           "--set", "ddpm:sampling.sampler=ddpm", "--set", "ddpm:sampling.num_steps=4",
                           "--gaussian", f"gauss={smoke_run.root}", "--control", str(smoke_run.root),
                           "--n", "16", "--steps", "2", "--backbone", "resnet10t"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "two_sample.json").read_text())
    assert set(results) == {"ldm", "ddpm", "npy", "gauss", f"control-reconstructed-{smoke_run.root.name}",
                            f"control-raw-{smoke_run.root.name}"}
    for r in results.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["n_test"] == 8  # a quarter of each side
    table = (out / "README.md").read_text()
    assert "| ldm | LDM samples |" in table and "| ddpm | LDM samples (sampling.sampler=ddpm, sampling.num_steps=4) |" in table
    assert (out / "gauss.png").is_file() and "| npy | samples from saved.npy |" in table
    # Each sampler draws into its own cache folder (never reusing the other's tiles), and they differ.
    folders = sorted((smoke_run.root / "samples").glob("two-sample-*"))
    assert [f.name.split("-", 3)[3] for f in folders] == ["ddim4-eta0-fp32", "ddpm4-eta0-fp32"]
    ddim, ddpm = (read_rgb(f / "000000.png").astype(int) for f in folders)
    assert np.abs(ddim - ddpm).mean() > 1.0

    bad = subprocess.run([*script, "--run", f"ldm={smoke_run.root}", "--set", "other:sampling.eta=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--set 'other:sampling.eta=1'" in bad.stderr and "ldm" in bad.stderr
    few = subprocess.run([*script, "--samples", f"npy={saved}", "--samples-run", str(smoke_run.root), "--n", "32"],
                         capture_output=True, text=True, timeout=300)
    assert few.returncode != 0 and "saved.npy: 16 tiles, fewer than --n 32" in few.stderr
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    broken = subprocess.run([*script, "--samples", f"npy={tmp_path / 'broken.npy'}", "--samples-run",
                             str(smoke_run.root), "--n", "8"], capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "broken.npy: not a NumPy .npy array" in broken.stderr
    assert "Traceback" not in broken.stderr
    unnamed = subprocess.run([*script, "--samples", str(saved), "--samples-run", str(smoke_run.root)],
                             capture_output=True, text=True, timeout=300)
    assert unnamed.returncode == 2 and "expected NAME=FILE.npy" in unnamed.stderr


def test_trial_samples_are_redrawn_after_more_training(smoke_run: RunDir, smoke_cfg, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/pretrain_trials.py: a trial trained on in a copy of an earlier trial's work folder gets
    samples of its own weights, never the earlier trial's tiles left in the copy."""
    import shutil
    import sys

    from diffusers import UNet2DModel

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        import pretrain_trials
    finally:
        sys.path.remove(str(repo / "bench"))
    monkeypatch.setattr(pretrain_trials, "OUT", tmp_path / "grids")
    first = RunDir(tmp_path / "first")
    shutil.copytree(smoke_run.root, first.root)
    before = pretrain_trials.trial_samples(smoke_cfg, first, "first")
    assert before.shape == (64, 32, 32, 3) and (tmp_path / "grids" / "first.png").is_file()

    later = RunDir(tmp_path / "later")  # the earlier trial's folder copied, then trained on
    shutil.copytree(first.root, later.root)
    unet = UNet2DModel.from_pretrained(later.root / "pretrain" / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(0.5)
    unet.save_pretrained(later.root / "pretrain" / "unet")
    after = pretrain_trials.trial_samples(smoke_cfg, later, "later")
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 1.0
    assert np.array_equal(np.load(later.root / "samples.npy"), after)
    assert len(list((later.root / "samples").glob("trial-*"))) == 2  # the copied folder and its own


def test_paused_run_can_end_and_cool_down_before_its_first_step_count(smoke_run: RunDir, smoke_cfg,
                                                                      tmp_path: Path) -> None:
    """A run asked for many steps that paused on its time limit may be asked for fewer, as long as
    not fewer than it has trained; cooled down in the steps added, it ends at the weights of a run
    that asked for that schedule from the start."""

    from histodiffusion.errors import StagePaused, UserError

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.steps, cfg.pretrain.train.warmup_steps = 100000, 2
    cfg.pretrain.train.time_limit_minutes = 0.02
    paused, straight = _pretrain_ready(smoke_run, tmp_path, "paused", "straight")
    with pytest.raises(StagePaused):
        run_stage("pretrain", cfg, paused)
    first = Checkpointer(paused.root / "pretrain", keep=1).latest()[0]
    assert json.loads((paused.root / "pretrain" / "STATE.json").read_text())["reached"] == {
        "pretrain.train.steps": first}
    cfg.pretrain.train.time_limit_minutes = None
    cfg.pretrain.train.steps = first - 1
    with pytest.raises(UserError, match=f"pretrain.train.steps: {first} before, {first - 1} now"):
        run_stage("pretrain", cfg, paused)
    cfg.pretrain.train.steps, cfg.pretrain.train.cooldown_steps = first + 6, 7
    with pytest.raises(UserError, match=f"start the cooldown at step {first - 1}, before them"):
        run_stage("pretrain", cfg, paused)
    cfg.pretrain.train.cooldown_steps = 6
    run_stage("pretrain", cfg, paused)
    run_stage("pretrain", cfg, straight)

    a, b = _train_weights(straight.root), _train_weights(paused.root)
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((paused.root / "pretrain" / "DONE").read_text())["summary"]
    assert done["steps"] == first + 6
    assert done["extended_from"] == {"pretrain.train.steps": first, "pretrain.train.cooldown_steps": 0}
