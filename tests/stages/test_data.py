"""Stage ``data`` (stages/data.py) in the practical protocol: the target's unlabeled train tiles join the pool."""

from __future__ import annotations

import csv

from histodiffusion.config import load_config
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from tests.helpers import CONFIGS


def _paths(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_practical_protocol_adds_unlabeled_target_train_tiles_only(data_root, tmp_path) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}", "data.pool_target_train=true"])
    rd = RunDir(tmp_path / "run")
    for stage in ("data", "labels"):
        run_stage(stage, cfg, rd)
    pool = _paths(rd.root / "data" / "pool.csv")
    train = {r["path"] for r in _paths(rd.root / "data" / "train.csv")}
    held_out = {r["path"] for s in ("valid", "test") for r in _paths(rd.root / "data" / f"{s}.csv")}
    labeled = {r["path"] for r in _paths(rd.root / "labels" / "8perclass" / "labeled.csv")}
    added = [r for r in pool if r["source"] == "pcam train, unlabeled"]
    assert {r["path"] for r in added} == train - labeled and len(added) == 64 - 16
    assert all(r["label"] == "" for r in added)
    assert not {r["path"] for r in pool} & (held_out | labeled)
    # the paper's protocol leaves the target out entirely, and its data stage ignores the budgets
    paper = load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}"])
    assert paper.section_hash("data") != cfg.section_hash("data")
