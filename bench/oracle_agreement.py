"""The class-fidelity oracle applied to a finished run's own synthetic tiles.

    python bench/oracle_agreement.py --config configs/pcam-fewlabel.yaml --run-dir RUN --budget 1pct \
        [--set key=value ...] [--variant NAME]

``class_fidelity.py`` synthesizes fresh tiles per guidance scale; this script scores the tiles the
pipeline itself made (``synthesize/<budget>/<source>``) and those selection kept, with the same
cached oracle (the downstream classifier trained on the full train split). It writes
``bench/results/<task>/[<variant>/]oracle_agreement_<budget>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from class_fidelity import REPO, oracle

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.prepared import classes_of, load_synthetic, read_manifest_rows
from histodiffusion.errors import UserError
from histodiffusion.io import write_json, write_text
from histodiffusion.models.tile_classifier import predict_logits


def agreement(pred: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    """Overall and per-class fraction of tiles the oracle labels as their target class."""
    return {"tiles": int(len(targets)), "agreement": float(np.mean(pred == targets)) if len(targets) else None,
            "per_class": {c: {"tiles": int(np.sum(targets == k)),
                              "agreement": float(np.mean(pred[targets == k] == k)) if np.any(targets == k) else None}
                          for k, c in enumerate(classes)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--budget", required=True, help="label budget folder name, e.g. 1pct")
    ap.add_argument("--source", default="guided", help="guided, unguided or conditional")
    ap.add_argument("--oracle-steps", type=int, default=1500)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variant", default=None, help="file under bench/results/<task>/<variant>/")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    run, data = args.run_dir, args.run_dir / "data"
    folder = run / "synthesize" / args.budget / args.source
    if not (folder / "manifest.csv").is_file():
        raise UserError(f"{folder / 'manifest.csv'} does not exist: run the synthesize stage of {run} first")
    classes = classes_of(data)
    model, _ = oracle(cfg, data, REPO / "bench" / "work" / cfg.experiment, args.oracle_steps)
    rows, tiles, targets = load_synthetic(folder / "manifest.csv", classes)
    pred = predict_logits(model, tiles).argmax(1)
    result = {"task": cfg.experiment, "label_budget": args.budget, "source": args.source,
              "guidance_scale": sorted({float(r["guidance_scale"]) for r in rows}),
              "all": agreement(pred, targets, classes),
              "command": "python bench/oracle_agreement.py " + " ".join(sys.argv[1:])}
    accepted = run / "select" / args.budget / args.source / "accepted.csv"
    kept = read_manifest_rows(accepted) if accepted.is_file() else []
    if kept:  # a subset of the tiles scored above, found by their per-sample index
        position = {r["index"]: i for i, r in enumerate(rows)}
        sel = np.array([position[r["index"]] for r in kept], dtype=np.int64)
        result["selected"] = agreement(pred[sel], targets[sel], classes)
    out = REPO / "bench" / "results" / cfg.experiment / (args.variant or "")
    write_json(out / f"oracle_agreement_{args.budget}.json", result)
    lines = [f"# The oracle on the pipeline's own {args.source} tiles: {cfg.experiment}, {args.budget}", "",
             f"Command: `{result['command']}`  ", f"Guidance scale(s): {result['guidance_scale']}", "",
             "| tiles | n | oracle agrees with target | " + " | ".join(classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for name in ("all", "selected"):
        if name in result:
            r = result[name]
            cells = [f"{r['per_class'][c]['agreement']:.2f} ({r['per_class'][c]['tiles']})"
                     if r["per_class"][c]["agreement"] is not None else "-" for c in classes]
            overall = f"{r['agreement']:.3f}" if r["agreement"] is not None else "-"
            lines.append(f"| {name} | {r['tiles']} | {overall} | " + " | ".join(cells) + " |")
    write_text(out / f"oracle_agreement_{args.budget}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    guarded(main)
