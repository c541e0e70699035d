"""Plain helpers shared by the tests (fixtures are in ``conftest.py``): repository paths, the
smallest valid config, image writers, and running the command line and the bench scripts."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BENCH = REPO / "bench"


def shared_data_root() -> Path | None:
    """The real H&E data: HISTODIFFUSION_DATA, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("HISTODIFFUSION_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------------- configs
BASE_CONFIG = {"experiment": "t", "data": {"target": "pcam", "pool": ["ebhi"]}}


def raw_config(data: dict | None = None, **top) -> dict:
    """The smallest valid config as a fresh dict: ``data`` is merged into its data section, the other
    keyword arguments set top-level keys (``seed=1``) or whole sections (``select={...}``)."""
    raw = copy.deepcopy(BASE_CONFIG)
    raw["data"].update(data or {})
    raw.update(copy.deepcopy(top))
    return raw


def make_config(data: dict | None = None, overrides: list[str] | tuple[str, ...] = (), **top):
    """:func:`raw_config` validated into an ``ExperimentConfig`` (``overrides`` as ``--set`` gives them)."""
    from histodiffusion.config import config_from_dict

    return config_from_dict(raw_config(data, **top), list(overrides))


# ---------------------------------------------------------------------------------- images
def noise(size: int | tuple[int, int], rng: np.random.Generator | int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 array of uniform noise (hard to compress); ``size`` is H = W or (H, W)."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    h, w = (size, size) if isinstance(size, int) else size
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_image(target: Path | BinaryIO, arr: np.ndarray, mode: str | None = None) -> Path | BinaryIO:
    """Save ``arr`` (converted to PIL ``mode`` when given) to a path (format from its suffix; parent
    folders made) or to a binary file object (PNG); returns ``target``."""
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    if isinstance(target, (str, os.PathLike)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        img.save(target)
    else:
        img.save(target, "PNG")
    return target


def image_folder(root: Path, counts: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """An ImageFolder dataset of noise PNGs: ``root/<label>/<i>.png``, ``counts[label]`` of each."""
    rng = np.random.default_rng(seed)
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / label / f"{i}.png", noise(size, rng))
    return root


# ------------------------------------------------------------------ command line, bench scripts
def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m histodiffusion ARGS`` in a wide terminal (rich wraps at 200 columns)."""
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "histodiffusion", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


def run_bench(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python bench/SCRIPT ARGS`` from the repository root."""
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


def import_bench(name: str):
    """Import a bench script as a module (bench/ is on sys.path only while it imports, as when run)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def user_error(proc: subprocess.CompletedProcess) -> str:
    """The message of a user error (exit code 2, no traceback), with rich's line folding undone."""
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    return " ".join(proc.stderr.split())
