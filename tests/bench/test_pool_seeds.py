"""bench/pool_seeds.py: pools the per-seed results of several run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_bench


def _seed_result(folder: Path, arm: str, seed: int, accuracy: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy}
    (folder / f"{arm}-seed{seed}.json").write_text(json.dumps({"arm": arm, "seed": seed, "test": test}))


def test_pool_seeds_pools_disjoint_seeds_and_refuses_a_repeated_one(tmp_path: Path) -> None:
    """bench/pool_seeds.py pairs arms by seed across run directories, as `evaluate` does in one."""
    gains = {0: 0.01, 1: 0.03, 2: 0.02, 3: 0.04}
    for seed, gain in gains.items():
        folder = tmp_path / f"run{seed // 2}" / "evaluate" / "1pct" / "runs"
        _seed_result(folder, "real", seed, 0.70 + 0.01 * seed)
        _seed_result(folder, "real+selected", seed, 0.70 + 0.01 * seed + gain)
    out = tmp_path / "pooled.json"
    proc = run_bench("pool_seeds.py", "--budget", "1pct", str(tmp_path / "run0"), str(tmp_path / "run1"),
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads(out.read_text())
    assert pooled["seeds"] == [0, 1, 2, 3]
    gain = pooled["paired_gain_vs_real"]["real+selected"]["accuracy"]
    assert gain["mean"] == pytest.approx(0.025)
    assert gain["ci_low"] < 0.025 < gain["ci_high"]
    assert "+2.5" in proc.stdout
    proc = run_bench("pool_seeds.py", "--budget", "1pct", str(tmp_path / "run0"), str(tmp_path / "run0"))
    assert proc.returncode == 2
    assert "seed 0" in proc.stderr and "disjoint" in proc.stderr and "Traceback" not in proc.stderr
