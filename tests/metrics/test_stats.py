"""Confidence intervals (metrics/stats.py): t-intervals of a mean and of paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histodiffusion.metrics.stats import mean_ci, paired_difference_ci


def test_mean_ci_and_paired_difference() -> None:
    ci = mean_ci([0.80, 0.82, 0.84, 0.86, 0.88])
    half = 2.776 * np.std([0.80, 0.82, 0.84, 0.86, 0.88], ddof=1) / math.sqrt(5)
    assert ci["mean"] == pytest.approx(0.84) and ci["ci_high"] - ci["mean"] == pytest.approx(half)
    d = paired_difference_ci([0.9, 0.8, 0.85], [0.8, 0.7, 0.75])
    assert d["mean"] == pytest.approx(0.1) and d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    assert mean_ci([0.5])["ci_low"] is None
