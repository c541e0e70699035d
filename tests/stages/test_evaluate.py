"""Stage ``evaluate``'s cache of finished trainings (stages/evaluate.py): a run with exactly the
same inputs is reused, across budgets, after ``--force evaluate`` and from another run directory
(``evaluate.reuse_from``); anything that changes the training trains again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import histodiffusion.stages.evaluate as evaluate_stage
from histodiffusion.config import load_config
from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_pipeline, run_stage
from tests.helpers import CONFIGS


def _cfg(smoke_cfg, *overrides: str):
    """The smoke config cut to the real arm and real@all (no diffusion model), one seed."""
    return load_config(CONFIGS / "smoke.yaml", [f"data.root={smoke_cfg.data.root}", "evaluate.arms=[real]",
                                                "evaluate.ladder=[]", "evaluate.seeds=[0]", *overrides])


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


def test_reuse_from_does_not_change_the_stage_hash(smoke_cfg, tmp_path) -> None:
    """Where finished runs may come from is not part of what the stage computes."""
    a = _cfg(smoke_cfg).section_hash("evaluate")
    assert _cfg(smoke_cfg, f"evaluate.reuse_from=[{tmp_path}]").section_hash("evaluate") == a
    assert _cfg(smoke_cfg, "evaluate.classifier.lr=0.002").section_hash("evaluate") != a
