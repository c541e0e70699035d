"""The README's main job: quickstart on a PathMNIST-format file the test writes, and its offline message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from histodiffusion.config import config_from_dict
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_pipeline

from .conftest import CONFIGS, REPO


def write_pathmnist(root: Path, size: int = 64, per_class: dict[str, int] | None = None) -> Path:
    """A small MedMNIST-format npz: 9 classes, {train,val,test}_{images,labels}."""
    rng = np.random.default_rng(0)
    per_class = per_class or {"train": 8, "val": 2, "test": 12}
    arrays = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(9), n)
        # Class-dependent colour so the classes are learnable, plus texture noise.
        base = np.stack([np.full((size, size, 3), (40 + 20 * k, 200 - 15 * k, 120 + 10 * (k % 3))) for k in labels])
        images = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path = root / "pathmnist" / f"pathmnist_{size}.npz"
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, **arrays)
    return path


def test_quickstart_pipeline_on_pathmnist_format(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_pathmnist(root)
    raw = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    # The quickstart's data section as shipped; the training sections at the tiny preset's sizes.
    tiny = {"experiment": raw["experiment"], "preset": "tiny", "data": raw["data"],
            "synthesize": {"per_class": 2}, "evaluate": {"arms": ["real", "real+selected"]}}
    cfg = config_from_dict(tiny, [f"data.root={root}", "data.target.budgets=[2]", "data.pool.0.max_images=40"])
    rd = RunDir(tmp_path / "run")
    run_pipeline(cfg, rd)
    counts = json.loads((rd.root / "data" / "counts.json").read_text())
    labeled = json.loads((rd.root / "labels" / "2perclass" / "counts.json").read_text())
    assert len(counts["classes"]) == 9 and labeled["labeled 2perclass"]["total"] == 18
    assert counts["pool"]["by_source"] == {"pathmnist": 40}
    assert (rd.root / "report" / "report.html").is_file()
    summary = json.loads((rd.root / "evaluate" / "2perclass" / "summary.json").read_text())
    assert set(summary["arms"]) == {"real", "real+selected"}


def test_quickstart_offline_stops_at_once_with_a_message(tmp_path: Path) -> None:
    env = {**os.environ, "HISTODIFFUSION_DATA": str(tmp_path / "empty"), "COLUMNS": "200",
           # No network in the test whatever the machine: every request goes to a closed port.
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "histodiffusion", "run", str(CONFIGS / "quickstart.yaml"),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "could not be fetched" in message and "--data-root" in message and "pathmnist_64.npz" in message
