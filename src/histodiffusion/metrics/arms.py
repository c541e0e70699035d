"""Summaries of an evaluation over seeds: each arm's mean and 95% CI per metric, and paired gains.

A *run* is one (arm, seed) result: ``{"arm", "seed", "test": {metric: value}}``. Seeds pair the
arms (seed k has the same initialisation and batch randomness in every arm), so the paired
difference to a reference arm removes seed noise.
"""

from __future__ import annotations

import math

import numpy as np

from histodiffusion.metrics.stats import mean_ci, paired_difference_ci

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
GAIN_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def by_arm(runs: list[dict], arms: list[str]) -> dict[str, dict[int, dict]]:
    """{arm: {seed: run}}."""
    return {a: {r["seed"]: r for r in runs if r["arm"] == a} for a in arms}


def arm_summaries(runs: list[dict], arms: list[str]) -> dict[str, dict]:
    """Per arm and metric: mean with its 95% t-interval over seeds."""
    grouped = by_arm(runs, arms)
    return {arm: {m: mean_ci([grouped[arm][s]["test"].get(m) for s in sorted(grouped[arm])]) for m in METRICS
                  if any(r["test"].get(m) is not None for r in grouped[arm].values())} for arm in arms}


def paired_gains(runs: list[dict], arms: list[str], reference: str = "real") -> dict[str, dict]:
    """Per arm other than ``reference``: the paired difference to it over their common seeds."""
    grouped = by_arm(runs, [*arms, reference])
    gains = {}
    for arm in arms:
        if arm == reference:
            continue
        paired = sorted(set(grouped[arm]) & set(grouped[reference]))
        gains[arm] = {m: paired_difference_ci([grouped[arm][s]["test"][m] for s in paired],
                                              [grouped[reference][s]["test"][m] for s in paired])
                      for m in GAIN_METRICS}
    return gains


def summarize(runs: list[dict], arms: list[str]) -> tuple[dict, dict]:
    """(per-arm summaries, paired gains vs 'real')."""
    return arm_summaries(runs, arms), paired_gains(runs, arms, "real")


# ------------------------------------------------------------------------- label ladder
def label_equivalent_labels(accuracy: float, ladder: list[tuple[float, float]]) -> tuple[float, int]:
    """The number of real labels at which the real-only curve first reaches ``accuracy``.

    ``ladder``: (labels, mean accuracy) of the real-only arms, sorted by labels, the budget first.
    The curve is piecewise linear in log(labels). Returns (labels, censored): censored is -1 when
    ``accuracy`` is not above the budget's own accuracy (the labels returned are the budget's:
    "< 1x"), +1 when the curve never reaches it (the top rung's labels: "> Nx"), else 0.
    """
    (n0, a0), rest = ladder[0], ladder[1:]
    if accuracy <= a0:
        return float(n0), -1
    prev_n, prev_a = n0, a0
    for n, a in rest:
        if a >= accuracy > prev_a:
            f = (accuracy - prev_a) / (a - prev_a)
            return float(math.exp(math.log(prev_n) + f * (math.log(n) - math.log(prev_n)))), 0
        prev_n, prev_a = n, a
    return float(ladder[-1][0]), 1


def format_multiple(multiple: float, censored: int) -> str:
    """'1.6x', '< 1x' or '> 100x'."""
    if censored < 0:
        return "< 1x"
    if censored > 0:
        return f"> {multiple:.3g}x"
    return f"{multiple:.2g}x" if multiple < 10 else f"{multiple:.0f}x"


def label_equivalents(arm_accuracies: dict[str, list[float]], ladder: dict[str, tuple[float, list[float]]],
                      budget_labels: float, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Each arm's label-equivalent as a multiple of the budget, with a bootstrap interval over seeds.

    Args:
        arm_accuracies: per arm (not on the ladder), its per-seed test accuracies.
        ladder: per real-only rung, (its number of labels, its per-seed test accuracies); the
            budget's own ``real`` arm included.
        budget_labels: the labels of the budget (the ``real`` arm), the unit of the multiples.
    Returns:
        {arm: {mean, ci_low, ci_high, censored, text}}: mean from the seed means; the interval is
        the 2.5-97.5 percentiles over ``n_boot`` resamplings of the seeds of every arm and rung
        (censored resamples count at the boundary, 1x or the top rung).
    """
    rungs = sorted(ladder.values(), key=lambda r: r[0])
    rng = np.random.default_rng(seed)
    boot_ladders = [[(n, float(np.mean(rng.choice(accs, len(accs))))) for n, accs in rungs] for _ in range(n_boot)]
    point_ladder = [(n, float(np.mean(accs))) for n, accs in rungs]
    out = {}
    for arm, accs in arm_accuracies.items():
        labels, censored = label_equivalent_labels(float(np.mean(accs)), point_ladder)
        boots = [label_equivalent_labels(float(np.mean(rng.choice(accs, len(accs)))), lad)[0] / budget_labels
                 for lad in boot_ladders]
        mean = labels / budget_labels
        out[arm] = {"mean": mean, "ci_low": float(np.percentile(boots, 2.5)),
                    "ci_high": float(np.percentile(boots, 97.5)), "censored": censored,
                    "text": format_multiple(mean, censored)}
    return out
