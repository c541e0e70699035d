"""Stage ``report`` (stages/report.py): what it says about the real-only ladder, on the summaries of
the practical-protocol runs filed in bench/results."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from histodiffusion.stages.report import _ladder_verdict

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _summary(task: str, budget: str) -> dict:
    return json.loads((RESULTS / f"{task}-practical" / "ladder-ssl" / budget / "summary.json").read_text())


def test_a_ladder_rises_when_any_rung_beats_real_even_if_the_top_rung_is_noisy() -> None:
    """ebhi 10%: real@4x is above real (paired CI above 0) while real@all's CI still reaches below 0."""
    summary = _summary("ebhi", "10pct")
    assert summary["headroom"]["accuracy"]["ci_low"] < 0 < summary["paired_gain_vs_real"]["real@4x"]["accuracy"]["ci_low"]
    text = _ladder_verdict(summary)
    assert text.startswith("The ladder rises (real@4x above real")
    assert "real@2x" in text.split("priced in labels")[1]  # named as not distinguishable from real


def test_a_rung_with_more_steps_is_named_as_mixing_labels_and_steps() -> None:
    """pcam 1%: only real@all rises, and it trains for more steps than real."""
    text = _ladder_verdict(_summary("pcam", "1pct"))
    assert text.startswith("The ladder rises (real@all above real")
    assert "real@2x, real@4x not distinguishable from real" in text
    assert "real@all trains 1500 steps against real's 300" in text


def test_a_ladder_with_no_rung_above_real_is_called_flat() -> None:
    summary = copy.deepcopy(_summary("pcam", "1pct"))
    summary["paired_gain_vs_real"]["real@all"]["accuracy"]["ci_low"] = -0.01
    assert _ladder_verdict(summary).startswith("The real-only ladder is flat")


def test_a_rung_below_real_is_named_so() -> None:
    summary = copy.deepcopy(_summary("pcam", "1pct"))
    summary["paired_gain_vs_real"]["real@2x"]["accuracy"].update(ci_low=-0.03, ci_high=-0.01)
    assert "; real@4x not distinguishable from real; real@2x below real." in _ladder_verdict(summary)
