"""Experiment tracking (tracking.py) through accelerate's TensorBoard tracker, on the smoke config."""

from __future__ import annotations

import json

import pytest

from histodiffusion.config import load_config
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from tests.helpers import CONFIGS


def test_tensorboard_holds_the_loss_scalars_of_metrics_jsonl(data_root, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}", "tracking=[tensorboard]"])
    rd = RunDir(tmp_path / "run")
    for stage in ("data", "labels", "autoencoder", "latents", "pretrain"):
        run_stage(stage, cfg, rd)
    for stage in ("autoencoder", "pretrain"):
        events = list((rd.root / "tracking" / stage).rglob("events.out.tfevents.*"))
        assert events, f"no event file for {stage}"
        acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        logged = [(e.step, e.value) for e in acc.Scalars("loss")]
        expected = [(r["step"], r["loss"]) for r in map(json.loads, (rd.root / stage / "metrics.jsonl").open())]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
        assert {"lr", "images_per_s"} <= set(acc.Tags()["scalars"])
    assert "samples" in EventAccumulator(str(next((rd.root / "tracking" / "pretrain").rglob("events*")).parent)).Reload().Tags()["images"]
    assert not (rd.root / "tracking" / "data").exists()  # a stage that trains nothing leaves no run
    # without a tracker nothing is written
    plain = RunDir(tmp_path / "plain")
    for stage in ("data", "labels", "autoencoder"):
        run_stage(stage, load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}"]), plain)
    assert not (plain.root / "tracking").exists()


def test_tracking_hash_free_and_validated() -> None:
    """Choosing a tracker changes no stage's hash; an unknown one is a config error naming the key."""
    from histodiffusion.errors import ConfigError

    a = load_config(CONFIGS / "smoke.yaml")
    b = load_config(CONFIGS / "smoke.yaml", ["tracking=[tensorboard]"])
    assert a.section_hash() == b.section_hash()
    with pytest.raises(ConfigError, match="tracking"):
        load_config(CONFIGS / "smoke.yaml", ["tracking=[neptune]"])
