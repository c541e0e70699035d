"""Run directory: atomic writes, DONE markers, skip on rerun, --force, changed-config refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from histodiffusion import io
from histodiffusion.config import config_from_dict
from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir
from histodiffusion.stages.base import STAGES, Stage, register, run_stage

CALLS: list[str] = []


def _fake_stage(ctx) -> dict:
    CALLS.append(ctx.folder.name)
    io.write_text(ctx.folder / "out.txt", "result")
    return {"ok": 1}


def _cfg(seed: int = 0):
    return config_from_dict({"experiment": "t", "seed": seed,
                             "data": {"target": "pcam", "pool": ["ebhi"]}})


@pytest.fixture
def fake_stage():
    register(Stage("fake", ("seed",), (), _fake_stage))
    yield STAGES["fake"]
    del STAGES["fake"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary left behind


def test_atomic_folder_replace(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_text("old")
    with io.atomic_path(tmp_path / "model") as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_disk_full_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match="no space left on the device while writing .*x.json"):
        io.write_json(tmp_path / "x.json", {})


def test_rerun_skips_then_force_redoes(tmp_path: Path, fake_stage) -> None:
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    run_stage("fake", _cfg(), rd)
    assert CALLS == ["fake"]
    assert (rd.root / "config.yaml").is_file() and (rd.root / "environment.json").is_file()
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["seed"] == 0 and "torch" in env["packages"]
    done = json.loads((rd.root / "fake" / "DONE").read_text())
    assert done["summary"]["ok"] == 1 and len(done["hash"]) == 16
    out = run_stage("fake", _cfg(), rd)
    assert CALLS == ["fake"] and out[0]["skipped"]
    run_stage("fake", _cfg(), rd, force=True)
    assert CALLS == ["fake", "fake"]


def test_changed_config_is_refused_not_silently_reused(tmp_path: Path, fake_stage) -> None:
    rd = RunDir(tmp_path / "run")
    run_stage("fake", _cfg(seed=0), rd)
    with pytest.raises(UserError, match=r"stage 'fake' .* different config .*--force fake"):
        run_stage("fake", _cfg(seed=1), rd)
    run_stage("fake", _cfg(seed=1), rd, force=True)


def test_unfinished_stage_keeps_its_hash(tmp_path: Path, fake_stage) -> None:
    """An interrupted stage (STATE written, no DONE) resumes under the same config only."""
    rd = RunDir(tmp_path / "run")
    h = "abcdef0123456789"
    rd.begin("fake", h)
    assert not rd.is_done("fake", h)
    rd.begin("fake", h)  # same hash: resume allowed
    with pytest.raises(UserError, match="different config"):
        rd.begin("fake", "0000000000000000")


def test_stage_needs_its_upstream(tmp_path: Path) -> None:
    register(Stage("needs", ("seed",), ("data",), _fake_stage))
    try:
        with pytest.raises(UserError, match=r"needs stage 'data' .*histodiffusion data prepare"):
            run_stage("needs", _cfg(), RunDir(tmp_path))
    finally:
        del STAGES["needs"]


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
    from histodiffusion.training.loop import LoopSpec, make_accelerator, run_loop

    spec = LoopSpec(steps=10, log_every=2, checkpoint_every=10, images_per_step=8, description="toy")
    reached = run_loop(tmp_path, make_accelerator("cpu", "no"), spec, lambda step: {"loss": 1.0 / (step + 1)})
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("toy:")]
    assert reached == 10 and lines[-1].startswith("toy: 10/10 (100%)")
    assert "loss 0.1" in lines[-1] and "images/s " in lines[-1] and " eta " in lines[-1], lines[-1]
