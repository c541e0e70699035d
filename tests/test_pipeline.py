"""The stage registry and runner (histodiffusion/pipeline.py): DONE markers, skip on rerun, --force (with
what depends on it), changed-config refusal, failed starts, upstream checks, and which names and
commands may be registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from histodiffusion import io
from histodiffusion.errors import UserError
from histodiffusion.pipeline import (
    COMMANDS,
    PIPELINE,
    STAGES,
    Stage,
    command_stages,
    downstream_of,
    load_stages,
    register,
    run_dir_lock,
    run_pipeline,
    run_stage,
)
from histodiffusion.rundir import RunDir
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


def _picky_stage(ctx) -> dict:
    """Fails before writing anything at seed 1 (a bad input), after writing a partial result at seed 3."""
    if ctx.cfg.seed == 3:
        io.write_text(ctx.folder / "partial.txt", "half")
    if ctx.cfg.seed in (1, 3):
        raise UserError("bad input")
    return _fake_stage(ctx)


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """'data' and 'labels' (which reads 'data') replaced, for this test only, by recording stages."""
    load_stages()
    monkeypatch.setitem(STAGES, "data", Stage("data", "data prepare", ("seed",), (), _picky_stage))
    monkeypatch.setitem(STAGES, "labels", Stage("labels", "data prepare", ("seed",), ("data",), _fake_stage))


def test_a_refused_rerun_leaves_config_and_environment_alone(tmp_path: Path, fake_stage) -> None:
    rd = RunDir(tmp_path / "run")
    run_stage("data", make_config(seed=0), rd)
    before = [(rd.root / f).read_bytes() for f in ("config.yaml", "environment.json")]
    with pytest.raises(UserError, match="different config"):
        run_stage("data", make_config(seed=1), rd)
    run_stage("data", make_config(seed=0), rd)  # skipped: nothing ran, nothing to describe
    assert [(rd.root / f).read_bytes() for f in ("config.yaml", "environment.json")] == before


def test_force_redoes_the_stage_and_every_stage_downstream(tmp_path: Path, fake_pipeline) -> None:
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    run_pipeline(make_config(seed=0), rd, stop="labels")
    assert CALLS == ["data", "labels"] and downstream_of("data", make_config())[:1] == ["labels"]
    # a changed config: `run --force data` redoes data, then labels, which is not refused
    run_pipeline(make_config(seed=2), rd, stop="labels", force=("data",))
    assert CALLS[2:] == ["data", "labels"]
    assert yaml.safe_load((rd.root / "config.yaml").read_text())["seed"] == 2
    # the same config: a single stage's --force redoes it now and its dependants when they next run
    run_stage("data", make_config(seed=2), rd, force=True)
    assert CALLS[4:] == ["data"] and not (rd.root / "labels" / "DONE").exists()
    run_stage("labels", make_config(seed=2), rd)
    assert CALLS[5:] == ["labels"] and run_stage("labels", make_config(seed=2), rd)[0]["skipped"]


def test_a_stage_that_failed_before_writing_anything_is_forgotten(tmp_path: Path, fake_pipeline) -> None:
    """A failure before any output (a bad dataset name) leaves no record, so the corrected config runs,
    and config.yaml and environment.json are as they were; a failure after some output keeps it (a rerun resumes it, a changed config is refused)."""
    rd = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match="bad input"):
        run_stage("data", make_config(seed=1), rd)
    assert not (rd.root / "data").exists() and not (rd.root / "config.yaml").exists()
    run_stage("data", make_config(seed=2), rd)
    assert rd.is_done("data", rd.done_hash("data"))
    records = {f: (rd.root / f).read_bytes() for f in ("config.yaml", "environment.json")}
    with pytest.raises(UserError, match="bad input"):  # the run directory still describes the config that ran
        run_stage("data", make_config(seed=1), rd, force=True)
    assert {f: (rd.root / f).read_bytes() for f in records} == records
    rd2 = RunDir(tmp_path / "run2")
    with pytest.raises(UserError, match="bad input"):
        run_stage("data", make_config(seed=3), rd2)
    with pytest.raises(UserError, match="different config"):
        run_stage("data", make_config(seed=2), rd2)


def test_only_the_main_process_of_a_launch_takes_the_run_directory_lock(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `accelerate launch` the other ranks share the main process's hold instead of being refused."""
    import accelerate

    class OtherRank:
        is_main_process = False

        def __init__(self, **_kwargs):
            pass

    rd = RunDir(tmp_path / "run")
    with run_dir_lock(rd, make_config()):
        assert (rd.root / ".lock.json").is_file()
    monkeypatch.setattr(accelerate, "PartialState", OtherRank)
    with run_dir_lock(RunDir(tmp_path / "run2"), make_config()):
        assert not (tmp_path / "run2").exists()
