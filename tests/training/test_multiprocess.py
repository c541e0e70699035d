"""Two processes under ``accelerate launch`` on the CPU (gloo) against one plain process: training at
the same global batch reaches the same weights, sharded synthesis and evaluation write every item
once, and a launch that loses a process resumes from its last complete checkpoint.

Every launch starts two Python processes that import torch, so every test here is slow. The
launches use ``--multi_gpu``, not ``--cpu``: accelerate starts a single process under ``--cpu``
whatever ``--num_processes`` says; without a GPU, ``--multi_gpu`` starts the processes through
torchrun and histodiffusion joins them with gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CONFIGS, REPO, run_cli

SMOKE = str(CONFIGS / "smoke.yaml")
ENV = {"CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
TRAINED = ("autoencoder.train", "pretrain.train", "finetune.train", "finetune.classifier.train", "conditional.train")
COMMON = ["device=cpu", "finetune.classifier.dropout=0", *(f"{t}.lr_schedule=cosine" for t in TRAINED)]
"""Every run here, one process or two: on the CPU; no dropout in the latent classifier, whose masks
come from each process's own torch RNG and so cannot match one process's masks; a cosine schedule,
so that an LR schedule stepped once per process (not once per step) shows in the logged LR."""
ATOL = 2e-5
"""Largest weight difference allowed between 2 processes x batch b and 1 process x batch 2b (the
same global batch), after the tiny preset's 4-6 steps at lr 1e-4..3e-4. Only the order of float
sums differs (conv kernels over 4 rows instead of 8, gloo's average of two means instead of one
mean, 1 thread instead of 2); measured up to 4.3e-6 (weights of magnitude up to ~1). A wrong global
batch, an LR schedule stepped twice or gradients not averaged over processes moves weights by about
one Adam step (~lr) or more: the code before issue 25 gave 1.0e-3."""
WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "ema.safetensors")
LAUNCH_TIMEOUT = 300


# ---------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``ARGS`` (a script, or ``-m histodiffusion ...``) in ``processes`` CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *args]


def histodiffusion_cmd(command: str, run: Path, sets: list[str]) -> list[str]:
    """Two processes running ``histodiffusion COMMAND smoke.yaml --run-dir RUN`` with ``sets``."""
    overrides = [a for s in [*COMMON, *sets] for a in ("--set", s)]
    return launch_cmd("-m", "histodiffusion", command, SMOKE, "--run-dir", str(run), *overrides)


def launch(command: str, run: Path, sets: list[str] = ()) -> subprocess.CompletedProcess:
    """Run :func:`histodiffusion_cmd` to its end; fail with its output unless it exits 0."""
    proc = subprocess.run(histodiffusion_cmd(command, run, list(sets)), capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **ENV}, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def copy_stages(src: Path, dst: Path, stages: list[str]) -> Path:
    """A run directory holding copies of ``stages`` (finished) of run ``src``."""
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)
    return dst


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files with the same tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def weight_files(run: Path, stage: str) -> list[Path]:
    """Model, EMA and checkpoint weights under a stage folder (optimiser moments and RNG left out)."""
    return sorted(p.relative_to(run) for p in (run / stage).rglob("*.safetensors") if p.name in WEIGHTS)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> None:
    """Skip, with the reason, unless ``accelerate launch`` starts two processes that form a group here."""
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text("from histodiffusion.devices import process_state\n"
                      "state = process_state('cpu')\nstate.wait_for_everyone()\n"
                      "print(f'process {state.process_index} of {state.num_processes}')\n")
    try:
        proc = subprocess.run(launch_cmd(str(script)), capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, **ENV}, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"accelerate launch cannot start two processes here: {err}")
    if proc.returncode != 0 or "process 1 of 2" not in proc.stdout:
        pytest.skip(f"accelerate launch did not start two CPU processes here (exit {proc.returncode}): "
                    f"{(proc.stdout + proc.stderr)[-1500:]}")


@pytest.fixture(scope="module")
def reference(data_root: Path, two_processes, tmp_path_factory) -> Path:
    """One plain process: the smoke config from data to evaluate."""
    run = tmp_path_factory.mktemp("one") / "run"
    sets = [a for s in COMMON for a in ("--set", s)]
    proc = run_cli("run", SMOKE, "--run-dir", str(run), "--data-root", str(data_root), "--to", "evaluate", *sets,
                   env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


# ------------------------------------------------------------------------- same weights
TRAINING = {  # stage: (command, upstream stages, batch sizes per process: half the reference's)
    "autoencoder": ("train-autoencoder", ["data", "labels"], ["autoencoder.train.batch_size=4"]),
    "pretrain": ("pretrain", ["data", "labels", "autoencoder", "latents"], ["pretrain.train.batch_size=4"]),
    "finetune": ("finetune", ["data", "labels", "autoencoder", "pretrain"],
                 ["finetune.train.batch_size=4", "finetune.classifier.train.batch_size=8"]),
    "conditional": ("train-conditional", ["data", "labels", "autoencoder"], ["conditional.train.batch_size=4"]),
}


@pytest.mark.slow  # ~20-40 s each: one launch of two processes training a tiny model for 4-6 steps
@pytest.mark.parametrize("stage", list(TRAINING))
def test_two_processes_reach_the_weights_of_one_at_the_same_global_batch(stage: str, reference: Path,
                                                                           tmp_path: Path) -> None:
    """2 processes x batch b give the weights (model, EMA, checkpoints) of 1 process x batch 2b
    within :data:`ATOL`, and the same LR and gradient norm at every logged step."""
    command, upstream, batch = TRAINING[stage]
    run = copy_stages(reference, tmp_path / "run", upstream)
    launch(command, run, batch)
    files = weight_files(reference, stage)
    assert files and files == weight_files(run, stage)
    diffs = {str(f): max_weight_diff(reference / f, run / f) for f in files}
    print(f"{stage}: max abs weight difference " + ", ".join(f"{f} {d:.2e}" for f, d in diffs.items()))
    assert max(diffs.values()) <= ATOL, diffs
    for log in sorted((reference / stage).rglob("metrics.jsonl")):
        one, two = (list(map(json.loads, p.read_text().splitlines())) for p in (log, run / log.relative_to(reference)))
        assert [r["step"] for r in one] == [r["step"] for r in two]
        assert [r.get("lr") for r in one] == [r.get("lr") for r in two]
        np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)


# -------------------------------------------------------------------- sharded synthesis
@pytest.mark.slow  # ~40 s: one launch sampling 3 sources x 8 tiles
def test_sharded_synthesis_writes_each_tile_of_one_process_once(reference: Path, tmp_path: Path) -> None:
    """The same manifest indices, every index once (one part file row each), the same PNGs."""
    from histodiffusion.data.images import read_rgb
    from histodiffusion.stages.synthesize import read_part

    run = copy_stages(reference, tmp_path / "run",
                      ["data", "labels", "autoencoder", "pretrain", "finetune", "conditional"])
    launch("synthesize", run)
    grey = 0
    for source in ("guided", "unguided", "conditional"):
        one_dir, two_dir = (r / "synthesize" / "8perclass" / source for r in (reference, run))
        one, two = read_rows(one_dir / "manifest.csv"), read_rows(two_dir / "manifest.csv")
        indices = [int(r["index"]) for r in two]
        assert indices == sorted(set(indices)) == [int(r["index"]) for r in one]
        parts = [int(r["index"]) for p in sorted(two_dir.glob("manifest.part-*.csv")) for r in read_part(p)]
        assert len(list(two_dir.glob("manifest.part-*.csv"))) == 2 and sorted(parts) == indices  # each made once
        for a, b in zip(one, two, strict=True):
            assert (a["path"], a["label"]) == (b["path"], b["label"])
            assert abs(float(a["target_prob"]) - float(b["target_prob"])) < 1e-3
            diff = np.abs(read_rgb(one_dir / a["path"]).astype(int) - read_rgb(two_dir / b["path"]).astype(int))
            grey = max(grey, int(diff.max()))
    print(f"synthesis: largest pixel difference between 1 and 2 processes: {grey} grey levels")
    assert grey <= 1


# ------------------------------------------------------------------- sharded evaluation
@pytest.mark.slow  # ~60 s: one launch training the downstream classifiers of every arm and seed
def test_sharded_evaluation_runs_each_arm_and_seed_once(reference: Path, tmp_path: Path) -> None:
    """Every (arm, seed) run written once, by one of the processes; the summary of one process."""
    run = copy_stages(reference, tmp_path / "run", ["data", "labels", "features", "synthesize", "select"])
    proc = launch("evaluate", run)
    one_dir, two_dir = (r / "evaluate" / "8perclass" for r in (reference, run))
    names = sorted(p.name for p in (one_dir / "runs").glob("*.json"))
    assert names == sorted(p.name for p in (two_dir / "runs").glob("*.json"))
    trained = re.findall(r"8perclass (\S+) seed (\d+): test accuracy", proc.stdout + proc.stderr)
    copied = [json.loads((two_dir / "runs" / n).read_text()) for n in names]
    expected = sorted(f"{r['arm']}-seed{r['seed']}.json" for r in copied if not r.get("same_as"))
    assert sorted(f"{a}-seed{s}.json" for a, s in trained) == expected  # each trained once, none twice
    one, two = (json.loads((d / "summary.json").read_text()) for d in (one_dir, two_dir))
    worst = 0.0
    for arm, stats in one["arms"].items():
        worst = max(worst, abs(stats["accuracy"]["mean"] - two["arms"][arm]["accuracy"]["mean"]))
    print(f"evaluation: largest difference of an arm's mean test accuracy, 1 vs 2 processes: {worst:.4f}")
    assert one["n_seeds"] == two["n_seeds"] and one["n_synthetic"] == two["n_synthetic"]
    assert worst <= 1 / one["n_test"] + 1e-9  # at most one test tile flips (1 vs 2 threads)


# --------------------------------------------------------------------- resume after a kill
RESUME = ["pretrain.train.steps=120", "pretrain.train.checkpoint_every=10", "pretrain.train.batch_size=4",
          "pretrain.train.log_every=10"]


@pytest.fixture(scope="module")
def resume_upstream(reference: Path, tmp_path_factory) -> Path:
    """A run directory with what pretraining reads (data, labels, autoencoder, latents)."""
    return copy_stages(reference, tmp_path_factory.mktemp("upstream") / "run",
                       ["data", "labels", "autoencoder", "latents"])


@pytest.fixture(scope="module")
def uninterrupted(resume_upstream: Path, tmp_path_factory) -> Path:
    """Two processes pretraining for :data:`RESUME`'s steps without interruption."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    shutil.copytree(resume_upstream, run)
    launch("pretrain", run, RESUME)
    return run


def _workers(launcher: subprocess.Popen, n: int) -> dict | None:
    """rank -> ``psutil.Process`` of the launcher's ``n`` workers (its children running histodiffusion
    with a RANK), or None while there are fewer."""
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if rank is not None and "histodiffusion" in " ".join(child.cmdline()):
                found[int(rank)] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found if len(found) == n else None


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow  # ~60 s each: a launch killed after its first checkpoint, then the same launch again
@pytest.mark.parametrize("victim", [0, 1])
def test_launch_that_loses_a_process_resumes_from_its_last_checkpoint(victim: int, resume_upstream: Path,
                                                                      uninterrupted: Path, tmp_path: Path) -> None:
    """SIGKILL one worker (rank ``victim``) once a checkpoint exists: the launch ends non-zero; the
    same command then resumes from the last complete checkpoint and reaches the weights of an
    uninterrupted two-process run. Also: only rank 0 holds the run directory's lock."""
    import psutil

    from histodiffusion.training.harness import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(resume_upstream, run)
    ckpt = Checkpointer(run / "pretrain", keep=2)
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 (closed below)
    launcher = subprocess.Popen(histodiffusion_cmd("pretrain", run, RESUME), stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, **ENV})
    workers: dict = {}  # the processes this test started (psutil checks a pid was not reused before killing)
    try:
        workers = _wait_for(lambda: _workers(launcher, 2), 120, "two workers")
        _wait_for(ckpt.latest, 180, "a first checkpoint")
        holder = json.loads((run / ".lock.json").read_text())["pid"]
        assert holder == workers[0].pid, (holder, workers)  # the main process holds the lock, rank 1 takes none
        workers[victim].send_signal(signal.SIGKILL)
        code = launcher.wait(timeout=120)
    finally:
        for worker in workers.values():  # only when the test failed before the launch ended
            with contextlib.suppress(psutil.NoSuchProcess):
                if worker.is_running():
                    worker.kill()
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait(timeout=30)
        log.close()
    step, _ = ckpt.latest()
    assert step < 120, "the launch finished before a process was killed: give it more steps"
    assert code != 0, (tmp_path / "killed.log").read_text()[-3000:]
    proc = launch("pretrain", run, RESUME)
    assert f"(step {step})" in " ".join((proc.stdout + proc.stderr).split())  # resumed there
    files = weight_files(uninterrupted, "pretrain")
    assert files == weight_files(run, "pretrain")
    diffs = {str(f): max_weight_diff(uninterrupted / f, run / f) for f in files}
    print(f"resume (rank {victim} killed at or after step {step}): max abs weight difference {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= ATOL, diffs
