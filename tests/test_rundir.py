"""Run directory (rundir.py): the STATE/DONE bookkeeping of a stage folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir


def test_unfinished_stage_keeps_its_hash(tmp_path: Path) -> None:
    """An interrupted stage (STATE written, no DONE) resumes under the same config only."""
    rd = RunDir(tmp_path / "run")
    h = "abcdef0123456789"
    rd.begin("fake", h)
    assert not rd.is_done("fake", h)
    rd.begin("fake", h)  # same hash: resume allowed
    with pytest.raises(UserError, match="different config"):
        rd.begin("fake", "0000000000000000")
