"""Stage ``pretrain`` on the tiny preset: its files, plain-diffusers checkpoints, exact resume from
pickle-free checkpoints, more steps continuing a finished stage, and the time limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage


def test_pretrain_stage_outputs(smoke_run: RunDir) -> None:
    root = smoke_run.root
    for path in ("pretrain/unet/config.json", "pretrain/scheduler/scheduler_config.json", "pretrain/metrics.jsonl",
                 "pretrain/DONE"):
        assert (root / path).is_file(), path
    assert sorted(p.name for p in (root / "pretrain/samples").iterdir())  # a preview grid was written
    log = [json.loads(line) for line in (root / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and "images_per_s" in log[-1] and np.isfinite(log[-1]["loss"])


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
    runs = [RunDir(tmp_path / name) for name in names]
    for rd in runs:
        for stage in ("data", "autoencoder", "latents"):
            shutil.copytree(smoke_run.root / stage, rd.root / stage)
    return runs


# A checkpoint holds safetensors and JSON only: resuming a run directory never unpickles anything.
CHECKPOINT_FILES = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "schedule.json",
                    "ema.safetensors", "ema.json", "rng-0.safetensors", "meta.json"}


def test_interrupted_training_resumes_to_identical_weights(smoke_run: RunDir, smoke_cfg, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import histodiffusion.training.diffusion as diffusion_training

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.checkpoint_every = 2
    cfg.pretrain.train.steps = 6
    straight, interrupted = _pretrain_ready(smoke_run, tmp_path, "straight", "interrupted")
    run_stage("pretrain", cfg, straight)

    real = diffusion_training.accumulate_step
    calls = {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # steps 0-3 done and checkpointed at step 4; killed during step index 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion_training, "accumulate_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", cfg, interrupted)
    assert not (interrupted.root / "pretrain" / "DONE").exists()
    checkpoint = interrupted.root / "pretrain" / "checkpoints" / "step-0000004"
    assert (checkpoint / "meta.json").is_file()
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
    monkeypatch.setattr(diffusion_training, "accumulate_step", real)
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
    import histodiffusion.training.diffusion as diffusion_training
    from histodiffusion.errors import UserError

    cfg = smoke_cfg.model_copy(deep=True)
    cfg.pretrain.train.checkpoint_every = 2
    straight, extended = _pretrain_ready(smoke_run, tmp_path, "straight", "extended")
    cfg.pretrain.train.steps = 8
    run_stage("pretrain", cfg, straight)
    cfg.pretrain.train.steps = 4
    run_stage("pretrain", cfg, extended)
    real, calls = diffusion_training.accumulate_step, []
    monkeypatch.setattr(diffusion_training, "accumulate_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg.pretrain.train.steps = 8
    run_stage("pretrain", cfg, extended)
    assert len(calls) == 4  # only the new steps were trained

    a, b = _train_weights(straight.root), _train_weights(extended.root)
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((extended.root / "pretrain" / "DONE").read_text())
    assert done["summary"]["extended_from"] == {"pretrain.train.steps": 4}
    assert done["summary"]["steps"] == 8
    log = [json.loads(x) for x in (extended.root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]  # the first run's log is kept

    cfg.pretrain.train.steps = 6
    with pytest.raises(UserError, match="pretrain.train.steps: 8 before, 6 now"):
        run_stage("pretrain", cfg, extended)
    cfg.pretrain.train.steps, cfg.pretrain.train.lr = 10, cfg.pretrain.train.lr * 2
    with pytest.raises(UserError, match="different config"):  # more steps, but also another lr
        run_stage("pretrain", cfg, extended)


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
