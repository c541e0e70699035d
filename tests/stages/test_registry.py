"""The stage registry and runner (stages/registry.py): DONE markers, skip on rerun, --force,
changed-config refusal, upstream checks, and which names and commands may be registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histodiffusion import io
from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir
from histodiffusion.stages.registry import (
    COMMANDS,
    PIPELINE,
    STAGES,
    Stage,
    command_stages,
    load_stages,
    register,
    run_stage,
)
from tests.helpers import make_config

CALLS: list[str] = []


def _fake_stage(ctx) -> dict:
    CALLS.append(ctx.folder.name)
    io.write_text(ctx.folder / "out.txt", "result")
    return {"ok": 1}


@pytest.fixture
def fake_stage(monkeypatch: pytest.MonkeyPatch) -> Stage:
    """The 'data' stage replaced, for this test only, by one that records its calls and reads ``seed``."""
    load_stages()  # the real stages first, so that importing them later cannot replace the fake
    monkeypatch.setitem(STAGES, "data", Stage("data", "data prepare", ("seed",), (), _fake_stage))
    return STAGES["data"]


def test_rerun_skips_then_force_redoes(tmp_path: Path, fake_stage) -> None:
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    run_stage("data", make_config(seed=0), rd)
    assert CALLS == ["data"]
    assert (rd.root / "config.yaml").is_file() and (rd.root / "environment.json").is_file()
    env = json.loads((rd.root / "environment.json").read_text())
    assert env["seed"] == 0 and "torch" in env["packages"]
    done = json.loads((rd.root / "data" / "DONE").read_text())
    assert done["summary"]["ok"] == 1 and len(done["hash"]) == 16
    out = run_stage("data", make_config(seed=0), rd)
    assert CALLS == ["data"] and out[0]["skipped"]
    run_stage("data", make_config(seed=0), rd, force=True)
    assert CALLS == ["data", "data"]


def test_changed_config_is_refused_not_silently_reused(tmp_path: Path, fake_stage) -> None:
    rd = RunDir(tmp_path / "run")
    run_stage("data", make_config(seed=0), rd)
    with pytest.raises(UserError, match=r"stage 'data' .* different config .*--force data"):
        run_stage("data", make_config(seed=1), rd)
    run_stage("data", make_config(seed=1), rd, force=True)


def test_stage_needs_its_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_stages()
    monkeypatch.setitem(STAGES, "labels", Stage("labels", "data prepare", ("seed",), ("data",), _fake_stage))
    with pytest.raises(UserError, match=r"needs stage 'data' .*histodiffusion data prepare"):
        run_stage("labels", make_config(), RunDir(tmp_path))


def test_only_pipeline_stages_and_cli_commands_register() -> None:
    with pytest.raises(ValueError, match="'fake'"):
        register(Stage("fake", "data prepare", ("seed",), (), _fake_stage))
    with pytest.raises(ValueError, match="'no-such-command'"):
        register(Stage("data", "no-such-command", ("seed",), (), _fake_stage))
    assert "fake" not in STAGES


def test_every_stage_and_command_is_registered() -> None:
    """Every pipeline stage has a module that registers it under its name; every command runs a stage."""
    stages = load_stages()
    assert set(stages) == set(PIPELINE)
    assert all(stages[name].name == name for name in PIPELINE)
    assert {stage.command for stage in stages.values()} == set(COMMANDS)
    assert command_stages("data prepare") == ("data", "labels")
    assert command_stages("pretrain") == ("latents", "pretrain")
    assert command_stages("features") == ("features",)
    assert command_stages("evaluate-generation") == ("generation",)
