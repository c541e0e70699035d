"""Progress (progress.py): plain progress lines outside a terminal, with rate and ETA."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_resumed_progress_eta_counts_only_the_steps_of_this_call(capsys: pytest.CaptureFixture) -> None:
    """A run resumed at 80 of 100 steps that does 10 in 10 s has about 10 s left, not 2.5 s."""
    from histodiffusion.progress import _LineProgress

    clock = iter([10.0, 20.0])
    bar = _LineProgress("pretrain", total=100, completed=80)
    bar._time, bar.start = lambda: next(clock), 0.0
    bar(5)  # 85 %: below the next 10 % mark, no line
    bar(5)
    line = capsys.readouterr().err
    assert "90/100 (90%)" in line and "eta 10s" in line, line
    bar(10)
    assert "100/100 (100%)" in capsys.readouterr().err


def test_training_progress_shows_loss_rate_and_eta(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The training bar (plain lines outside a terminal) shows loss, images/s and the ETA."""
    from histodiffusion.training.harness import LoopSpec, make_accelerator, run_loop

    spec = LoopSpec(steps=10, log_every=2, checkpoint_every=10, images_per_step=8, description="toy")
    reached = run_loop(spec, lambda step: {"loss": 1.0 / (step + 1)}, folder=tmp_path,
                       accelerator=make_accelerator("cpu", "no"))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("toy:")]
    assert reached == 10 and lines[-1].startswith("toy: 10/10 (100%)")
    assert "loss 0.1" in lines[-1] and "images/s " in lines[-1] and " eta " in lines[-1], lines[-1]
