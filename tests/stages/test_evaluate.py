"""Stage ``evaluate`` (stages/evaluate.py): its cache of finished trainings (a run with exactly the
same inputs is reused, across budgets, after ``--force evaluate`` and from another run directory
(``evaluate.reuse_from``); anything that changes the training trains again), and its trainings
side by side in CPU worker processes (``evaluate.cpu_processes``)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

import histodiffusion.stages.evaluate as evaluate_stage
from histodiffusion.config import load_config
from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_pipeline, run_stage
from tests.helpers import CONFIGS


def _cfg(smoke_cfg, *overrides: str):
    """The smoke config cut to the real arm and real@all (no diffusion model), one seed; the
    trainings in this process, one after another (the fixture ``trainings`` counts them here)."""
    return load_config(CONFIGS / "smoke.yaml", [f"data.root={smoke_cfg.data.root}", "evaluate.arms=[real]",
                                                "evaluate.ladder=[]", "evaluate.seeds=[0]", "evaluate.cpu_processes=1",
                                                *overrides])


def _runs(rd: RunDir, budget: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (rd.root / "evaluate" / budget / "runs").glob("*.json")}


@pytest.fixture
def trainings(monkeypatch) -> list[str]:
    """The (arm, seed) runs the evaluate stage actually trains, in order."""
    calls: list[str] = []
    train = evaluate_stage.train_tile_classifier

    def counted(*args, description: str, **kw):
        calls.append(description)
        return train(*args, description=description, **kw)

    monkeypatch.setattr(evaluate_stage, "train_tile_classifier", counted)
    return calls


def test_the_same_training_is_reused_across_budgets_force_and_run_directories(smoke_cfg, tmp_path, trainings) -> None:
    cfg = _cfg(smoke_cfg, "data.target.budgets=[8,4]")
    rd = RunDir(tmp_path / "first")
    run_pipeline(cfg, rd)
    # real@all (the whole train split) is the same training at both budgets: trained once
    assert trainings == ["8perclass real seed 0", "8perclass real@all seed 0", "4perclass real seed 0"]
    eight, four = _runs(rd, "8perclass"), _runs(rd, "4perclass")
    assert four["real@all-seed0"]["test"] == eight["real@all-seed0"]["test"]
    assert four["real@all-seed0"]["reused_from"].endswith(f"{eight['real@all-seed0']['key']}.json")
    assert "reused_from" not in eight["real@all-seed0"] and four["real-seed0"]["key"] != eight["real-seed0"]["key"]
    assert len(list((rd.root / "evaluate" / "cache").glob("*.json"))) == 3

    # --force evaluate (say, to add an arm): the finished runs come back from the cache
    trainings.clear()
    run_stage("evaluate", cfg, rd, force=True)
    assert trainings == []
    assert _runs(rd, "8perclass")["real-seed0"]["test"] == eight["real-seed0"]["test"]

    # another run directory of the same target (another pool, as in the practical protocol): its
    # real-only runs are found through reuse_from; a second seed is new, so it trains
    other = RunDir(tmp_path / "other")
    cfg2 = _cfg(smoke_cfg, "data.target.budgets=[8]", "evaluate.seeds=[0,1]", f"evaluate.reuse_from=[{rd.root}]",
                "data.pool=[{dataset: lc25000, max_images: 32}]")
    run_pipeline(cfg2, other)
    assert trainings == ["8perclass real seed 1", "8perclass real@all seed 1"]
    runs = _runs(other, "8perclass")
    assert runs["real-seed0"]["test"] == eight["real-seed0"]["test"]
    assert Path(runs["real-seed0"]["reused_from"]).parent == rd.root / "evaluate" / "cache"
    # what was reused is now in this run's own cache too (it no longer needs the other directory)
    assert {p.stem for p in (other.root / "evaluate" / "cache").glob("*.json")} == {r["key"] for r in runs.values()}


def test_a_changed_recipe_or_a_damaged_entry_trains_again(smoke_cfg, tmp_path, trainings) -> None:
    rd = RunDir(tmp_path / "first")
    run_pipeline(_cfg(smoke_cfg, "evaluate.ladder_all=false"), rd)
    assert trainings == ["8perclass real seed 0"]
    (entry,) = (rd.root / "evaluate" / "cache").glob("*.json")

    trainings.clear()
    changed = RunDir(tmp_path / "changed")
    run_pipeline(_cfg(smoke_cfg, "evaluate.ladder_all=false", "evaluate.classifier.lr=0.002",
                      f"evaluate.reuse_from=[{rd.root}]"), changed)
    assert trainings == ["8perclass real seed 0"]
    assert "reused_from" not in _runs(changed, "8perclass")["real-seed0"]

    for n, text in enumerate(['{"arm": "real", "test": ', '{"arm": "real"}']):  # cut short; not a record
        trainings.clear()
        entry.write_text(text)
        damaged = RunDir(tmp_path / f"damaged{n}")
        run_pipeline(_cfg(smoke_cfg, "evaluate.ladder_all=false", f"evaluate.reuse_from=[{rd.root}]"), damaged)
        assert trainings == ["8perclass real seed 0"]


def test_reuse_from_must_name_a_run_directory(smoke_cfg, tmp_path) -> None:
    cfg = _cfg(smoke_cfg, "evaluate.ladder_all=false", f"evaluate.reuse_from=[{tmp_path / 'nowhere'}]")
    with pytest.raises(UserError, match="reuse_from names .*nowhere, which is not a directory"):
        run_pipeline(cfg, RunDir(tmp_path / "run"))


def test_reuse_from_and_cpu_processes_do_not_change_the_stage_hash(smoke_cfg, tmp_path) -> None:
    """Where finished runs may come from, and how many train at once, is not part of what the stage computes."""
    a = _cfg(smoke_cfg).section_hash("evaluate")
    assert _cfg(smoke_cfg, f"evaluate.reuse_from=[{tmp_path}]").section_hash("evaluate") == a
    assert _cfg(smoke_cfg, "evaluate.cpu_processes=4").section_hash("evaluate") == a  # nor how many run at once
    assert _cfg(smoke_cfg, "evaluate.classifier.lr=0.002").section_hash("evaluate") != a


def test_processes_train_each_run_once_and_give_what_one_thread_gives(smoke_cfg, tmp_path) -> None:
    """Two arms x two seeds, two at a time in forked processes: the same records as one after
    another in this process with one thread."""
    rd = RunDir(tmp_path / "processes")
    run_pipeline(_cfg(smoke_cfg, "evaluate.seeds=[0,1]", "evaluate.cpu_processes=2"), rd)
    forked = _runs(rd, "8perclass")
    assert sorted(forked) == ["real-seed0", "real-seed1", "real@all-seed0", "real@all-seed1"]
    assert {r["torch_threads"] for r in forked.values()} == {1}
    assert not multiprocessing.active_children()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = RunDir(tmp_path / "one")
        run_pipeline(_cfg(smoke_cfg, "evaluate.seeds=[0,1]"), one)
    finally:
        torch.set_num_threads(before)
    for name, record in _runs(one, "8perclass").items():
        assert forked[name]["test"] == record["test"] and forked[name]["best_step"] == record["best_step"]
    assert json.loads((rd.root / "evaluate" / "8perclass" / "summary.json").read_text())["arms"] == \
        json.loads((one.root / "evaluate" / "8perclass" / "summary.json").read_text())["arms"]


def test_a_failed_training_keeps_the_finished_runs_and_the_rerun_trains_only_what_is_missing(smoke_cfg, tmp_path,
                                                                                      monkeypatch) -> None:
    rd = RunDir(tmp_path / "run")
    cfg = _cfg(smoke_cfg, "evaluate.cpu_processes=2")
    runs = rd.root / "evaluate" / "8perclass" / "runs"
    train = evaluate_stage._run_one

    def real_at_all_fails(ctx, arm, seed, *args, **kw):
        if arm.name == "real@all":  # fails once the other training is written
            t0 = time.monotonic()
            while not (runs / "real-seed0.json").is_file() and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            raise RuntimeError("disk full")
        return train(ctx, arm, seed, *args, **kw)

    monkeypatch.setattr(evaluate_stage, "_run_one", real_at_all_fails)
    with pytest.raises(RuntimeError, match="disk full"):
        run_pipeline(cfg, rd)
    assert not multiprocessing.active_children()
    kept = (runs / "real-seed0.json").read_text()
    assert not (runs / "real@all-seed0.json").exists()

    monkeypatch.undo()
    trained: list[str] = []

    def counted(ctx, arm, seed, *args, **kw):
        trained.append(arm.name)  # in this process: one training left, so nothing is forked
        return train(ctx, arm, seed, *args, **kw)

    monkeypatch.setattr(evaluate_stage, "_run_one", counted)
    run_pipeline(cfg, rd)
    assert trained == ["real@all"]
    assert (runs / "real-seed0.json").read_text() == kept and (runs / "real@all-seed0.json").is_file()
