"""Stage ``report``: report.md and a self-contained report.html, plus results.json with the numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from histodiffusion import io
from histodiffusion.config import ExperimentConfig, budget_name
from histodiffusion.data import fingerprint as fp
from histodiffusion.data.prepared import labeled_counts, pool_tiles
from histodiffusion.data.sources import read_manifest
from histodiffusion.document import Document, arms_bar_chart, curves, fmt_ci, ladder_chart
from histodiffusion.pipeline import (
    PIPELINE,
    STAGES,
    Stage,
    StageContext,
    register,
    stage_keys,
)
from histodiffusion.rundir import RunDir
from histodiffusion.viz import pool_grid

DEMO_NOTE = ("This run used the demo tiles shipped with the package: a few hundred 32 px tiles and a test split of "
             "a few dozen. It shows that every stage runs and what each writes, not what the method is worth: "
             "its intervals are too wide and its models too small for that. Run a benchmark task "
             "(configs/pcam-fewlabel.yaml, configs/ebhi-fewlabel.yaml) or your own data for a measurement.")


def _done(root: Path, key: str) -> dict | None:
    path = root / key / "DONE"
    return json.loads(path.read_text()) if path.is_file() else None


def wall_seconds(cfg: ExperimentConfig, root: Path) -> dict[str, float]:
    """Wall seconds of each finished stage of the config (per budget for per-budget stages), in pipeline order."""
    done = RunDir(root).summaries()
    keys = [key for name in PIPELINE if name != "report" for key, _ in stage_keys(STAGES[name], cfg)]
    return {key: done[key].get("wall_seconds") for key in keys if key in done}


def _series(path: Path, key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in io.read_jsonl(path) if key in r]


def _latest(folder: Path) -> Path | None:
    files = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
    return files[-1] if files else None


def _pretraining(doc: Document, root: Path, out: Path) -> dict:
    ae = io.read_json(root / "autoencoder" / "metrics.json")
    pt = (_done(root, "pretrain") or {}).get("summary", {})
    doc.heading("Pre-training (unlabeled pool, no labels)")
    doc.table(["autoencoder held-out PSNR (dB)", "SSIM", "latent scale", "UNet parameters", "steps", "final loss"],
              [[ae["psnr_db"], ae["ssim"], ae["scaling_factor"], pt.get("parameters"), pt.get("steps"),
                pt.get("final_loss")]])
    plot = curves({"autoencoder loss": _series(root / "autoencoder" / "metrics.jsonl", "loss"),
                   "LDM loss": _series(root / "pretrain" / "metrics.jsonl", "loss")},
                  out / "pretraining_curves.png", "training losses", "loss", log_y=True)
    doc.image(plot, "Training curves: autoencoder and unconditional LDM")
    sample = _latest(root / "pretrain" / "samples")
    if sample is not None:
        doc.image(shutil.copy(sample, out / "pretrain_samples.png"), "Unconditional samples of the pre-trained LDM")
    doc.image(pool_grid(pool_tiles(root / "data"), out / "pool_tiles.png"), "Real pool tiles (a random draw) to compare the samples with")
    return {"autoencoder": ae, "pretrain": pt}


def _budget(doc: Document, cfg: ExperimentConfig, root: Path, out: Path, name: str) -> dict:
    doc.heading(f"Label budget {name}")
    result: dict = {}
    best = root / "finetune" / name / "classifier" / "best.json"
    if best.is_file():
        b = io.read_json(best)
        result["latent_classifier"] = b
        doc.paragraph("Noise-aware latent classifier on the valid split (kept checkpoint), accuracy per noise "
                      "quartile (q1 = least noise):")
        doc.table(["q1", "q2", "q3", "q4", "valid loss"], [[b["acc_q1"], b["acc_q2"], b["acc_q3"], b["acc_q4"],
                                                           b["val_loss"]]])
        valid = root / "finetune" / name / "classifier_training" / "valid.jsonl"
        doc.image(curves({f"q{q}": _series(valid, f"acc_q{q}") for q in range(1, 5)},
                         out / f"{name}_latent_classifier.png", f"latent classifier, {name}", "valid accuracy"),
                  "Latent classifier: valid accuracy per noise quartile during training")
    for source in cfg.synthesize.sources:
        grid = root / "synthesize" / name / source / "grid.png"
        if grid.is_file():
            doc.image(shutil.copy(grid, out / f"{name}_{source}_grid.png"),
                      f"Real (top of each pair) vs {source} synthetic tiles per class, {name}")
    for source in ("guided", "conditional"):
        acc = root / "select" / name / source / "acceptance.json"
        if acc.is_file():
            table = io.read_json(acc)
            result[f"acceptance_{source}"] = table
            doc.paragraph(f"Selection of {source} tiles (tau = {cfg.select.threshold}):")
            doc.table(["class", "real", "generated", "wrong class", "low confidence", "centroid", "cap", "accepted"],
                      [[c, r["real"], r["generated"], r["wrong_class"], r["low_confidence"], r["centroid"], r["cap"],
                        r["accepted"]] for c, r in table.items()])
    summary_file = root / "evaluate" / name / "summary.json"
    if summary_file.is_file():
        summary = io.read_json(summary_file)
        result["evaluation"] = summary
        _evaluation(doc, cfg, summary, out, name)
    generation = root / "generation" / name / "generation.json"
    if generation.is_file():
        result["generation"] = _generation(doc, io.read_json(generation), generation.parent, out, name)
    return result


def _evaluation(doc: Document, cfg: ExperimentConfig, summary: dict, out: Path, name: str) -> None:
    metrics = ["accuracy", "balanced_accuracy", "macro_f1"] + (["auroc"] if any(
        "auroc" in a for a in summary["arms"].values()) else []) + ["ece"]
    le = summary.get("label_equivalent", {})
    doc.paragraph(f"Downstream classifier on the test split ({summary['n_test']} tiles): mean and 95% CI over the "
                  "seeds, in %. Label-equivalent: the real labels at which the real-only ladder reaches the arm's "
                  "accuracy, as a multiple of the budget (bootstrap 95% interval over seeds).")
    doc.table(["arm", "seeds", "real tiles", "synthetic tiles", "steps"] + metrics + ["label-equivalent"],
              [[a, summary["n_seeds"][a], summary["n_real"][a], summary["n_synthetic"][a], summary["steps"][a]]
               + [fmt_ci(summary["arms"][a].get(m)) for m in metrics] + [_multiple(le.get(a))]
               for a in summary["arms"]])
    gains = {**summary["paired_gain_vs_real"], **{f"{a} vs ssl": g for a, g in summary.get("paired_gain_vs_ssl", {}).items()}}
    if gains:
        doc.paragraph("Paired differences (same seeds), percentage points, mean [95% CI]; against real unless named:")
        doc.table(["arm", "accuracy", "balanced accuracy", "macro-F1"],
                  [[a] + [fmt_ci(g[m], signed=True) for m in ("accuracy", "balanced_accuracy", "macro_f1")]
                   for a, g in gains.items()])
    same = [a for a, n in summary["n_synthetic"].items() if a in ("real+selected", "ssl+selected",
                                                                   "real+conditional_no_pretrain") and n == 0]
    if same:
        doc.paragraph(f"{', '.join(same)}: the selection accepted no synthetic tiles, so these arms train on the real "
                      "subset alone, the same training as their base arm with the same seeds; their gain is 0 by "
                      "construction, not a measured effect.")
    if "ladder" in summary:
        h = summary["headroom"]
        doc.paragraph(f"Headroom: {h['rung']} - real = {fmt_ci(h['accuracy'], signed=True)} accuracy points. "
                      + _ladder_verdict(summary))
        doc.image(ladder_chart(summary, out / f"{name}_ladder.png", f"{cfg.experiment}, {name}"),
                  "Test accuracy against real labels (log scale) for the real-only ladder (points: mean, bars: "
                  "95% CI); every other arm at its own accuracy (line and band), marked on the ladder at its "
                  "label-equivalent")
    doc.image(arms_bar_chart(summary, "accuracy", out / f"{name}_arms.png", f"{cfg.experiment}, {name}"),
              "Test accuracy per arm (bars: mean; whiskers: 95% CI over seeds)")


def _ladder_verdict(summary: dict) -> str:
    """Whether the real-only ladder rises: a rung rises when its paired accuracy gain over real has a
    95% CI above 0; rungs trained for more steps than real are named, since their gain mixes both."""
    gains = summary["paired_gain_vs_real"]
    rungs = [r for r in summary["ladder"] if r != "real"]
    rises = [r for r in rungs if (gains[r]["accuracy"]["ci_low"] or 0) > 0]
    below = [r for r in rungs if (gains[r]["accuracy"]["ci_high"] or 0) < 0]
    level = [r for r in rungs if r not in rises and r not in below]
    if not rises:
        return ("The real-only ladder is flat: more real labels do not raise test accuracy here, so no synthetic set "
                "can show a gain measured in labels; what limits the task is not the number of labels (compare "
                "the valid accuracies per rung: "
                + ", ".join(f"{a} {100 * summary['valid_accuracy'][a]:.1f}" for a in summary["ladder"]) + ").")
    text = (f"The ladder rises ({', '.join(rises)} above real, paired CI above 0), so a synthetic set can be "
            "priced in labels" + (f"; {', '.join(level)} not distinguishable from real" if level else "")
            + (f"; {', '.join(below)} below real" if below else "") + ".")
    steps = summary["steps"]
    longer = [r for r in rises if (steps.get(r) or 0) > (steps.get("real") or 0)]
    if longer:
        text += (" " + ", ".join(f"{r} trains {steps[r]} steps" for r in longer)
                 + f" against real's {steps['real']} (steps scale with the training set): "
                 + ("its gain is" if len(longer) == 1 else "their gains are")
                 + " that of more labels and more steps together.")
    return text


def _multiple(le: dict | None) -> str:
    if not le:
        return "-"
    return f"{le['text']} [{le['ci_low']:.2g}, {le['ci_high']:.2g}]"


def _generation(doc: Document, gen: dict, folder: Path, out: Path, name: str) -> dict:
    for space in ("histology", "inception"):
        if gen.get(space) is None:
            if space == "inception":
                doc.paragraph("Inception-v3 distances: skipped (weights not available locally).")
            continue
        m = gen[space]
        doc.paragraph(f"Generation quality in {space} features ({gen['feature_space'] if space == 'histology' else 'Inception-v3 pool'}); "
                      "the floor compares two disjoint halves of the real held-out tiles:")
        rows = [["real vs real (floor)", *_gen_row(m["floor"])]]
        rows += [[set_name, *_gen_row(v)] for set_name, v in m["sets"].items()]
        doc.table(["set", "n real", "n synthetic", "FD", "KID", "precision", "recall"], rows)
    mem = gen.get("memorization", {})
    if mem:
        doc.table(["set", "synthetic tiles", "near-copies of labeled tiles", "threshold",
                   "median NN distance to labeled", "median NN distance to pool"],
                  [[k, v["n_synthetic"], v["n_near_copies"], v["threshold"], v["median_nn_distance_labeled"],
                    v["median_nn_distance_pool"]] for k, v in mem.items()])
        closest = folder / "closest_guided.png"
        if closest.is_file():
            doc.image(shutil.copy(closest, out / f"{name}_closest_guided.png"),
                      "The synthetic tiles closest to a labeled tile (top) and that labeled tile (bottom)")
    return gen


def _gen_row(d: dict) -> list:
    return [d.get("n_real"), d.get("n_synthetic"), d.get("fd"), d.get("kid"), d.get("precision"), d.get("recall")]


def build(cfg: ExperimentConfig, root: Path, out: Path) -> dict:
    """Write report.md, report.html and results.json into ``out``; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    doc = Document(f"histodiffusion report: {cfg.experiment}")
    env = io.read_json(root / "environment.json") if (root / "environment.json").is_file() else {}
    doc.paragraph(f"Target '{cfg.data.target.name}' at {cfg.data.resolution} px, preset '{cfg.preset}', "
                  f"seed {cfg.seed}, git {env.get('git_commit')}, torch {env.get('packages', {}).get('torch')}.")
    note = DEMO_NOTE if cfg.data.target.dataset == "demo" else None
    if note:
        doc.paragraph(note)
    counts = io.read_json(root / "data" / "counts.json")
    counts["counts"] = {**labeled_counts(root, [budget_name(b) for b in cfg.data.target.budgets]), **counts["counts"]}
    classes = counts["classes"]
    doc.heading("Data")
    doc.table(["split"] + classes + ["total"], [[part] + [row[c] for c in classes] + [row["total"]]
                                                for part, row in counts["counts"].items()])
    doc.paragraph("Pre-training pool (labels ignored): " + ", ".join(
        f"{s} {n}" for s, n in counts["pool"]["by_source"].items()) + f"; total {counts['pool']['total']}.")
    results: dict = {"experiment": cfg.experiment, "data": counts, **({"note": note} if note else {})}
    fingerprint = root / "data" / "fingerprint.json"
    if fingerprint.is_file():
        files = io.read_json(fingerprint)
        digest = fp.content_digest(files["inputs"], {role: read_manifest(root / "data" / f"{role}.csv")
                                                     for role in ("train", "valid", "test", "pool")})
        results["data_fingerprint"] = {"n_inputs": len(files["inputs"]), "n_outputs": len(files["outputs"]),
                                       "sha256": digest}
        doc.paragraph(f"Data read: {len(files['inputs'])} files, fingerprint {digest} (of the content of every file read "
                      "and of each manifest row's split, label and content, wherever the files lie; each file is listed "
                      "in data/fingerprint.json. Two runs with the same fingerprint read the same data with the same "
                      "labels and splits, and a rerun stops if a file changed).")
    if (root / "autoencoder" / "metrics.json").is_file():
        results.update(_pretraining(doc, root, out))
    results["budgets"] = {budget_name(b): _budget(doc, cfg, root, out, budget_name(b)) for b in cfg.data.target.budgets}
    results["wall_seconds"] = wall_seconds(cfg, root)
    doc.heading("Wall time per stage")
    doc.table(["stage", "seconds"], [[k, None if v is None else f"{v:.0f}"] for k, v in results["wall_seconds"].items()])
    doc.write(out)
    io.write_json(out / "results.json", results)
    return results


def run(ctx: StageContext) -> dict:
    """Assemble the report of everything finished in the run directory."""
    results = build(ctx.cfg, ctx.run_dir.root, ctx.folder)
    return {"budgets": list(results["budgets"])}


def _upstream(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ("data", "labels", "evaluate") + (("generation",) if cfg.evaluate.synthetic() else ())


STAGE = register(Stage("report", "report", ("evaluate", "synthesize", "select"), _upstream, run,
                       description="report.md, report.html, results.json", rebuild=True))
