"""Run a benchmark task end to end and file its results in a stable, machine-readable form.

    python bench/run_protocol.py --config configs/pcam-fewlabel.yaml [--run-dir runs/pcam-fewlabel]

Runs (or resumes) ``histodiffusion run`` for the task, then writes, per label budget,
``bench/results/<task>/<budget>/summary.json`` (arms with mean and 95% CI, paired gains vs
real, wall seconds per stage, command, machine), ``bench/results/<task>/report/`` (``report.md`` and
the figures it shows; the self-contained ``report.html`` stays in the run directory: it embeds
every figure and is too large for the repository), and
``bench/results/<task>/generation.{json,md}`` (distances, floors, precision/recall, near-copies).
With ``--variant NAME`` (a setting tried beside the configured one, given by ``--set``) the same
files go under ``bench/results/<task>/NAME/``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from histodiffusion import io, run_pipeline
from histodiffusion.cli import guarded
from histodiffusion.config import budget_name, load_config
from histodiffusion.devices import machine
from histodiffusion.rundir import RunDir, default_run_dir
from histodiffusion.viz import compact_png

REPO = Path(__file__).resolve().parents[1]
SHARED = ("data", "autoencoder", "latents", "pretrain", "features")


def stage_seconds(all_seconds: dict[str, float], budget: str) -> dict[str, float]:
    """Wall seconds of the stages one budget's result rests on (shared stages included)."""
    out = {k: v for k, v in all_seconds.items() if k in SHARED}
    out.update({k.split("/")[0]: v for k, v in all_seconds.items() if k.endswith(f"/{budget}")})
    return out


def generation_table(task: str, gens: dict[str, dict]) -> str:
    lines = [f"# Generation quality: {task}", "",
             "Histology features (SimCLR encoder trained on the pool); FD and KID vs real held-out (valid) tiles; "
             "the floor compares two disjoint halves of those real tiles. Inception-v3: "
             + ("reported below." if any(g.get("inception") for g in gens.values()) else
                "skipped (weights not available offline)."), ""]
    for budget, g in gens.items():
        h = g["histology"]
        lines += [f"## {budget}", "", "| set | n real | n synthetic | FD | KID | precision | recall |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in [("real vs real (floor)", h["floor"]), *h["sets"].items()]:
            lines.append(f"| {name} | {d.get('n_real')} | {d.get('n_synthetic')} | {d.get('fd', float('nan')):.4f} | "
                         f"{d.get('kid', float('nan')):.5f} | {d.get('precision', float('nan')):.3f} | "
                         f"{d.get('recall', float('nan')):.3f} |")
        lines += ["", "Per class FD (n synthetic):", "", "| class | floor | " + " | ".join(h["sets"]) + " |",
                  "|---|---|" + "---|" * len(h["sets"])]
        for c, row in h["per_class"].items():
            cells = [f"{row[s].get('fd', float('nan')):.4f} ({row[s].get('n_synthetic')})" for s in h["sets"]]
            lines.append(f"| {c} | {row['floor'].get('fd', float('nan')):.4f} | " + " | ".join(cells) + " |")
        lines += ["", "| set | synthetic | near-copies | median NN distance to labeled | to pool |", "|---|---|---|---|---|"]
        for name, m in g["memorization"].items():
            lines.append(f"| {name} | {m['n_synthetic']} | {m['n_near_copies']} | "
                         f"{m['median_nn_distance_labeled']:.4f} | {m['median_nn_distance_pool']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def copy_report(src: Path, dst: Path, shared: list[Path] = ()) -> None:
    """``report.md`` and the images it links to (not the self-contained HTML, which repeats them);
    images over 1 MB are stored with a 256-colour palette (the originals stay in the run directory).
    An image identical to the one of the same name in a folder of ``shared`` (the configured run's
    report and the other variants' reports, when filing a variant) is linked there instead of
    stored twice."""
    text = (src / "report.md").read_text()
    for name in sorted(set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))):
        copy = compact_png(io.write_bytes(dst / name, (src / name).read_bytes()))
        same = next((d / name for d in shared if (d / name).is_file()
                     and (d / name).read_bytes() == copy.read_bytes()), None)
        if same is not None:
            copy.unlink()
            text = text.replace(f"]({name})", f"]({os.path.relpath(same, dst)})")
    io.write_text(dst / "report.md", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--skip-run", action="store_true", help="only file the results of a finished run")
    ap.add_argument("--variant", default=None,
                    help="file the results under bench/results/<task>/<variant>/ (a setting tried beside the "
                         "task's configured one, e.g. scale30-tau0.5)")
    args = ap.parse_args()
    overrides = args.overrides + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    rd = RunDir(default_run_dir(cfg))
    if not args.skip_run:
        run_pipeline(cfg, rd)
    task_results = REPO / "bench" / "results" / cfg.experiment
    out = task_results / (args.variant or "")
    command = "python bench/run_protocol.py " + " ".join(sys.argv[1:])
    if args.skip_run:  # refiling a finished run: keep the command that ran it, when it is on file
        previous = out / budget_name(cfg.data.target.budgets[0]) / "summary.json"
        command = io.read_json(previous).get("command", command) if previous.is_file() else command
    seconds = {key: s.get("wall_seconds") for key, s in rd.summaries().items() if key != "report"}
    gens = {}
    for b in cfg.data.target.budgets:
        name = budget_name(b)
        summary = io.read_json(rd.root / "evaluate" / name / "summary.json")
        summary.update({"wall_seconds": stage_seconds(seconds, name), "command": command, "machine": machine()})
        io.write_json(out / name / "summary.json", summary)
        gen = rd.root / "generation" / name / "generation.json"
        if gen.is_file():
            gens[name] = io.read_json(gen)
    others = sorted(p for p in task_results.glob("*/report") if p != out / "report")
    copy_report(rd.root / "report", out / "report", [task_results / "report", *others] if args.variant else [])
    if gens:
        io.write_json(out / "generation.json", {"task": cfg.experiment, "command": command, "machine": machine(),
                                                "budgets": gens})
        io.write_text(out / "generation.md", generation_table(cfg.experiment, gens))


if __name__ == "__main__":
    guarded(main)
