"""Pool the downstream seeds of several runs that differ only in ``evaluate.seeds``.

    python bench/pool_seeds.py --budget 1pct RUN_DIR [RUN_DIR ...] [--out FILE.json]

Every run directory must hold the same arms, trained on the same synthetic tiles, with disjoint
seeds (e.g. copies of one run evaluated with seeds 0-4, then 5-9). Each finished per-seed result
(``evaluate/<budget>/runs/<arm>-seed<k>.json``) is read, and the arms are summarised exactly as
``histodiffusion evaluate`` does: mean with a 95 % t-interval per arm, and the paired difference
to ``real`` over the matched seeds. Prints a markdown table; ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from histodiffusion.cli import guarded
from histodiffusion.document import fmt_ci
from histodiffusion.errors import UserError
from histodiffusion.io import write_json
from histodiffusion.metrics.arms import summarize


def per_seed_runs(run_dirs: list[Path], budget: str) -> list[dict]:
    """Every per-seed result of ``budget`` in ``run_dirs``; a seed met twice in one arm is an error."""
    runs, seen = [], {}
    for rd in run_dirs:
        folder = rd / "evaluate" / budget / "runs"
        files = sorted(folder.glob("*-seed*.json"))
        if not files:
            raise UserError(f"{folder}: no per-seed results; run `histodiffusion evaluate` there first")
        for f in files:
            run = json.loads(f.read_text())
            key = (run["arm"], run["seed"])
            if key in seen:
                raise UserError(f"arm {run['arm']!r} seed {run['seed']} is in both {seen[key]} and {f}: "
                                "pool runs with disjoint evaluate.seeds")
            seen[key] = f
            runs.append(run)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--budget", required=True, help="label budget folder name, e.g. 1pct")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = per_seed_runs(args.run_dirs, args.budget)
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a != "real", a))
    if "real" not in arms:
        raise UserError(f"no 'real' arm in {', '.join(map(str, args.run_dirs))}: the paired gains need it")
    summary, gains = summarize(runs, arms)
    seeds = sorted({r["seed"] for r in runs})
    print(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); accuracy in %, gains in points\n")
    print("| arm | accuracy | paired gain in accuracy | balanced accuracy gain |\n|---|---|---|---|")
    for arm in arms:
        cells = [fmt_ci(summary[arm]["accuracy"])]
        cells += ["—" if arm not in gains else fmt_ci(gains[arm][m], signed=True) for m in ("accuracy", "balanced_accuracy")]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    if args.out:
        write_json(args.out, {"budget": args.budget, "run_dirs": [str(p) for p in args.run_dirs], "seeds": seeds,
                              "arms": summary, "paired_gain_vs_real": gains})


if __name__ == "__main__":
    guarded(main)
