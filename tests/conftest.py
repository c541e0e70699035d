"""Shared fixtures: the real shared data (skipped with a reason when absent), configs, images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def shared_data_root() -> Path | None:
    """The real H&E data: HISTODIFFUSION_DATA, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("HISTODIFFUSION_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data absent: set HISTODIFFUSION_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture
def smoke_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}"]
