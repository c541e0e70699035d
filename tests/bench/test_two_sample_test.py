"""bench/two_sample_test.py: a classifier tells real tiles from other sets; every kind of set on the smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histodiffusion.config import ImageClassifierCfg
from histodiffusion.data.images import read_rgb
from histodiffusion.data.prepared import pool_tiles
from histodiffusion.rundir import RunDir
from tests.helpers import import_bench, run_bench


@pytest.mark.slow  # ~30 s: trains a classifier, then runs the script on every kind of set
def test_two_sample_test(smoke_run: RunDir, tmp_path: Path) -> None:
    """bench/two_sample_test.py: a classifier tells real tiles from colour-inverted ones almost always;
    the script runs every kind of set on the smoke run and writes its table."""
    two_sample = import_bench("two_sample_test")
    real_rows, separability = two_sample.real_rows, two_sample.separability
    # The reference and control rows are disjoint and each spread over the whole pool (whose rows
    # come grouped by source): halves of one sorted draw would sit at its two ends.
    pool = pool_tiles(smoke_run.root / "data")
    cache, reference, other = real_rows(smoke_run.root, len(pool) // 4, 0)
    assert len(reference) == len(other) and not set(reference) & set(other)
    assert abs(reference.mean() - other.mean()) < 0.2 * len(cache)

    tiles = pool.take(np.arange(96))
    cfg = ImageClassifierCfg(backbone="resnet10t", steps=30, batch_size=32, lr=1e-3, warmup_steps=3, eval_every=10,
                             color_jitter=0.0)
    told = separability(tiles[:48], 255 - tiles[48:], cfg, seed=0, progress=False)
    assert told["n_test"] == 24 and told["test_accuracy"] >= 0.9 and told["test_auc"] >= 0.9

    out = tmp_path / "two"
    script = ["--out", str(out)]
    saved = tmp_path / "saved.npy"
    np.save(saved, pool.take(np.arange(16)))
    proc = run_bench("two_sample_test.py", *script, "--run", f"ldm={smoke_run.root}", "--run", f"ddpm={smoke_run.root}",
                     "--samples", f"npy={saved}", "--samples-run", str(smoke_run.root),
                     "--set", "ddpm:sampling.sampler=ddpm", "--set", "ddpm:sampling.num_steps=4",
                     "--control", str(smoke_run.root), "--n", "16", "--steps", "2", "--backbone", "resnet10t",
                     timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "two_sample.json").read_text())
    assert set(results) == {"ldm", "ddpm", "npy", f"control-reconstructed-{smoke_run.root.name}",
                            f"control-raw-{smoke_run.root.name}"}
    for r in results.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["n_test"] == 8  # a quarter of each side
    table = (out / "README.md").read_text()
    assert "| ldm | LDM samples |" in table and "| ddpm | LDM samples (sampling.sampler=ddpm, sampling.num_steps=4) |" in table
    assert all((out / f"{name}.png").is_file() for name in results) and "| npy | samples from saved.npy |" in table
    # Each sampler draws into its own cache folder (never reusing the other's tiles), and they differ.
    folders = sorted((smoke_run.root / "samples").glob("two-sample-*"))
    assert [f.name.split("-", 3)[3] for f in folders] == ["ddim4-eta0-fp32", "ddpm4-eta0-fp32"]
    ddim, ddpm = (read_rgb(f / "000000.png").astype(int) for f in folders)
    assert np.abs(ddim - ddpm).mean() > 1.0

    bad = run_bench("two_sample_test.py", *script, "--run", f"ldm={smoke_run.root}", "--set", "other:sampling.eta=1")
    assert bad.returncode == 2 and "--set 'other:sampling.eta=1'" in bad.stderr and "ldm" in bad.stderr
    few = run_bench("two_sample_test.py", *script, "--samples", f"npy={saved}", "--samples-run", str(smoke_run.root),
                    "--n", "32")
    assert few.returncode != 0 and "saved.npy: 16 tiles, fewer than --n 32" in few.stderr
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    broken = run_bench("two_sample_test.py", *script, "--samples", f"npy={tmp_path / 'broken.npy'}", "--samples-run",
                       str(smoke_run.root), "--n", "8")
    assert broken.returncode != 0 and "broken.npy: not a NumPy .npy array" in broken.stderr
    assert "Traceback" not in broken.stderr
    unnamed = run_bench("two_sample_test.py", *script, "--samples", str(saved), "--samples-run", str(smoke_run.root))
    assert unnamed.returncode == 2 and "expected NAME=FILE.npy" in unnamed.stderr
