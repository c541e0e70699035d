"""Run directory (rundir.py): the STATE/DONE bookkeeping of a stage folder (stale and forgotten
stages) and the lock that keeps one process per run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from histodiffusion.errors import UserError
from histodiffusion.rundir import LOCK_INFO, RunDir


def test_unfinished_stage_keeps_its_hash(tmp_path: Path) -> None:
    """An interrupted stage (STATE written, no DONE) resumes under the same config only."""
    rd = RunDir(tmp_path / "run")
    h = "abcdef0123456789"
    rd.begin("fake", h)
    assert not rd.is_done("fake", h)
    rd.begin("fake", h)  # same hash: resume allowed
    with pytest.raises(UserError, match="different config"):
        rd.begin("fake", "0000000000000000")


def test_a_stale_stage_starts_afresh_and_a_failed_start_is_forgotten(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.begin("fake", "abcdef0123456789")
    (rd.stage_dir("fake") / "old.txt").write_text("from before the upstream stage was redone")
    rd.finish("fake", "abcdef0123456789")
    assert rd.invalidate("fake") and not rd.invalidate("never-started")
    assert rd.done_hash("fake") is None
    rd.begin("fake", "0000000000000000")  # another hash, but stale: no refusal, and the old files go
    assert [p.name for p in rd.stage_dir("fake").iterdir()] == ["STATE.json"]
    rd.abandon("fake")
    assert not rd.stage_dir("fake").exists()
    rd.begin("per/budget", "abcdef0123456789")
    (rd.stage_dir("per/budget") / "checkpoint").write_text("work worth resuming")
    rd.abandon("per/budget")
    assert rd.started("per/budget")


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    with rd.lock():
        info = json.loads((rd.root / LOCK_INFO).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["command"].startswith("histodiffusion")
        with RunDir(tmp_path / "run").lock():  # the same process again (run_pipeline -> run_stage)
            pass
        assert (rd.root / LOCK_INFO).is_file()
    assert not (rd.root / LOCK_INFO).exists()
    with rd.lock():
        pass
