"""Label-equivalents on hand-made ladders (metrics/arms.py): golden values, below and above the
ladder, a flat ladder, a ladder that dips; and the bootstrap interval."""

from __future__ import annotations

import math

import pytest

from histodiffusion.metrics.arms import format_multiple, label_equivalent_labels, label_equivalents

LADDER = [(100.0, 0.70), (200.0, 0.74), (400.0, 0.76), (10000.0, 0.80)]


def test_label_equivalent_interpolates_in_log_labels() -> None:
    labels, censored = label_equivalent_labels(0.72, LADDER)  # half way from 100 to 200 in log: sqrt(2) x 100
    assert censored == 0 and labels == pytest.approx(100 * math.sqrt(2))
    labels, _ = label_equivalent_labels(0.75, LADDER)
    assert labels == pytest.approx(200 * math.sqrt(2))
    labels, _ = label_equivalent_labels(0.78, LADDER)  # half way from 400 to 10000: 400 * 25 ** 0.5
    assert labels == pytest.approx(2000.0)
    assert label_equivalent_labels(0.74, LADDER) == (pytest.approx(200.0), 0)  # on a rung


def test_below_and_above_the_ladder() -> None:
    assert label_equivalent_labels(0.70, LADDER) == (100.0, -1)  # no better than the budget itself: "< 1x"
    assert label_equivalent_labels(0.65, LADDER) == (100.0, -1)
    assert label_equivalent_labels(0.85, LADDER) == (10000.0, 1)  # beyond the top rung: "> 100x"
    assert format_multiple(1.0, -1) == "< 1x" and format_multiple(100.0, 1) == "> 100x"
    assert format_multiple(1.6, 0) == "1.6x" and format_multiple(25.0, 0) == "25x"


def test_flat_ladder_prices_any_gain_beyond_the_top() -> None:
    flat = [(100.0, 0.73), (200.0, 0.72), (400.0, 0.73), (12000.0, 0.725)]
    assert label_equivalent_labels(0.74, flat) == (12000.0, 1)
    assert label_equivalent_labels(0.725, flat) == (100.0, -1)


def test_a_dipping_ladder_is_reached_where_it_first_climbs_back() -> None:
    dip = [(100.0, 0.734), (200.0, 0.723), (300.0, 0.713), (12000.0, 0.741)]
    labels, censored = label_equivalent_labels(0.736, dip)
    f = (0.736 - 0.713) / (0.741 - 0.713)
    assert censored == 0 and labels == pytest.approx(math.exp(math.log(300) + f * math.log(12000 / 300)))


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    ladder = {"real": (100, [0.70, 0.71, 0.69, 0.70, 0.70]), "real@2x": (200, [0.74, 0.75, 0.73, 0.74, 0.74]),
              "real@4x": (400, [0.78, 0.77, 0.79, 0.78, 0.78])}
    out = label_equivalents({"a": [0.72, 0.72, 0.73, 0.71, 0.72], "b": [0.60] * 5, "c": [0.90] * 5}, ladder, 100)
    a = out["a"]
    assert a["censored"] == 0 and a["mean"] == pytest.approx(math.sqrt(2))
    assert 1.0 <= a["ci_low"] <= a["mean"] <= a["ci_high"] <= 2.0
    assert out["b"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "censored": -1, "text": "< 1x"}
    assert out["c"]["text"] == "> 4x" and out["c"]["ci_low"] == out["c"]["ci_high"] == 4.0
    assert label_equivalents({"a": [0.72, 0.72]}, ladder, 100, seed=3) == label_equivalents({"a": [0.72, 0.72]},
                                                                                             ladder, 100, seed=3)
