"""Means with 95% confidence intervals over seeds, and paired differences between arms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (standard table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and the 95% t-interval over independent runs: {"mean", "ci_low", "ci_high", "n"}."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(x.mean())
    if len(x) == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": 1}
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(len(x))}


def paired_difference_ci(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a_i - b_i (paired by seed) with its 95% t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b, strict=True)])
