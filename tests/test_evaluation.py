"""Classification metrics, confidence intervals, selection rules and the whole pipeline on a tiny config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from histodiffusion.config import config_from_dict
from histodiffusion.metrics.classification import (
    binary_auroc,
    classification_metrics,
    expected_calibration_error,
    macro_f1,
)
from histodiffusion.metrics.stats import mean_ci, paired_difference_ci
from histodiffusion.models.image_classifier import fit_temperature, softmax
from histodiffusion.stages.select import decide


def test_metrics_match_torchmetrics() -> None:
    from torchmetrics.functional.classification import (
        binary_auroc as tm_auroc,
    )
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_f1_score,
    )

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[labels]
    probs = softmax(logits)
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    p, y = torch.as_tensor(probs), torch.as_tensor(labels)
    assert m["balanced_accuracy"] == pytest.approx(float(multiclass_accuracy(p, y, 3, average="macro")), abs=1e-6)
    assert m["accuracy"] == pytest.approx(float(multiclass_accuracy(p, y, 3, average="micro")), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(float(multiclass_f1_score(p, y, 3, average="macro")), abs=1e-6)
    assert m["ece"] == pytest.approx(float(multiclass_calibration_error(p.float(), y, 3, n_bins=15)), abs=1e-4)
    scores = rng.normal(size=200).round(1)  # ties on purpose
    pos = rng.random(200) < 0.4
    assert binary_auroc(scores, pos) == pytest.approx(float(tm_auroc(torch.as_tensor(scores), torch.as_tensor(pos))),
                                                      abs=1e-6)


def test_metric_golden_values() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(probs, labels, ["n", "t"])
    assert m["accuracy"] == 0.75 and m["recall"] == {"n": 1.0, "t": 0.5}
    assert m["balanced_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["auroc"] == 1.0  # every positive scores above every negative
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert macro_f1(np.eye(3), np.arange(3)) == 1.0


def test_mean_ci_and_paired_difference() -> None:
    ci = mean_ci([0.80, 0.82, 0.84, 0.86, 0.88])
    half = 2.776 * np.std([0.80, 0.82, 0.84, 0.86, 0.88], ddof=1) / math.sqrt(5)
    assert ci["mean"] == pytest.approx(0.84) and ci["ci_high"] - ci["mean"] == pytest.approx(half)
    d = paired_difference_ci([0.9, 0.8, 0.85], [0.8, 0.7, 0.75])
    assert d["mean"] == pytest.approx(0.1) and d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    assert mean_ci([0.5])["ci_low"] is None


def test_temperature_scaling_recovers_the_temperature() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 3)) * 3
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits, 2.0)])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)


def _cfg(**select):
    return config_from_dict({"experiment": "t", "data": {"target": "pcam", "pool": ["ebhi"]}, "select": select})


def test_selection_rule_confidence_class_and_caps() -> None:
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.2, 0.8], [0.97, 0.03], [0.99, 0.01], [0.05, 0.95]])
    targets = np.array([0, 0, 0, 0, 0, 1])
    accepted, reasons = decide(_cfg(threshold=0.9, ratio=None), probs, targets, None, np.array([10, 10]))
    assert reasons == ["accepted", "low confidence", "wrong class", "accepted", "accepted", "accepted"]
    # ratio 0.2 of 10 real tiles keeps the 2 most confident of class 0.
    accepted, reasons = decide(_cfg(threshold=0.9, ratio=0.2), probs, targets, None, np.array([10, 10]))
    assert accepted.tolist() == [False, False, False, True, True, True] and reasons[0] == "cap"
    centroid = np.array([True, True, True, False, True, True])
    _, reasons = decide(_cfg(threshold=0.9, ratio=None, centroid_rule=True), probs, targets, centroid,
                        np.array([10, 10]))
    assert reasons[3] == "centroid"


def test_whole_pipeline_on_the_smoke_config(smoke_cfg, tmp_path) -> None:
    """`histodiffusion run` on the tiny config: the run tree and the report's keys."""
    from histodiffusion.rundir import RunDir
    from histodiffusion.stages import run_pipeline

    rd = RunDir(tmp_path / "run")
    run_pipeline(smoke_cfg, rd)
    b = "8perclass"
    for path in ("config.yaml", "environment.json", "data/DONE", "autoencoder/vae/config.json", "latents/DONE",
                 "pretrain/unet/config.json", f"finetune/{b}/classifier/config.json", f"finetune/{b}/adapt/unet",
                 f"conditional/{b}/unet/config.json", f"synthesize/{b}/guided/manifest.csv",
                 f"synthesize/{b}/unguided/manifest.csv", f"select/{b}/guided/accepted.csv",
                 f"select/{b}/guided/rejected.csv", f"evaluate/{b}/summary.json", "features/encoder/config.json",
                 f"generation/{b}/generation.json", f"generation/{b}/closest_guided.png", "report/report.md",
                 "report/pool_tiles.png", "report/report.html", "report/results.json"):
        assert (rd.root / path).exists(), path
    summary = json.loads((rd.root / "evaluate" / b / "summary.json").read_text())
    assert set(summary) >= {"task", "label_budget", "n_seeds", "arms", "paired_gain_vs_real"}
    assert set(summary["arms"]) == {"real", "real+synthetic", "real+selected", "real+conditional_no_pretrain"}
    for arm in summary["arms"].values():
        assert {"accuracy", "balanced_accuracy", "macro_f1", "auroc"} <= set(arm)
        assert set(arm["accuracy"]) >= {"mean", "ci_low", "ci_high"}
    assert len(list((rd.root / "evaluate" / b / "runs").glob("*.json"))) == 8
    results = json.loads((rd.root / "report" / "results.json").read_text())
    assert set(results) >= {"experiment", "data", "autoencoder", "pretrain", "budgets", "wall_seconds"}
    assert set(results["budgets"][b]) >= {"latent_classifier", "acceptance_guided", "evaluation", "generation"}
    gen = results["budgets"][b]["generation"]
    assert set(gen["histology"]["sets"]) == {"unguided", "guided", "conditional", "selected"}
    assert gen["histology"]["floor"]["n_real"] == 32 and gen["inception"] is None
    assert set(gen["histology"]["per_class"]) == {"0_no_tumor", "1_metastatic_tumor"}
    assert gen["memorization"]["guided"]["n_synthetic"] == 8
    html = (rd.root / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "real+selected" in html
    # A second run skips every stage.
    run_pipeline(smoke_cfg, rd)
    # A selection that accepts nothing leaves real+selected with the real subset alone: that arm
    # reuses the real arm's runs (the same training, bit for bit) instead of training again.
    from histodiffusion.stages import run_stage

    accepted = rd.root / "select" / b / "guided" / "accepted.csv"
    accepted.write_text(accepted.read_text().splitlines()[0] + "\n")
    cfg = smoke_cfg.model_copy(update={"evaluate": smoke_cfg.evaluate.model_copy(
        update={"arms": ["real+selected", "real"]})})
    run_stage("evaluate", cfg, rd, force=True)
    runs = {p.stem: json.loads(p.read_text()) for p in (rd.root / "evaluate" / b / "runs").glob("*.json")}
    assert sorted(runs) == ["real+selected-seed0", "real+selected-seed1", "real-seed0", "real-seed1"]
    for seed in (0, 1):
        reused, real = runs[f"real+selected-seed{seed}"], runs[f"real-seed{seed}"]
        assert reused["same_as"] == "real" and reused["n_synthetic"] == 0 and reused["test"] == real["test"]
    gain = json.loads((rd.root / "evaluate" / b / "summary.json").read_text())["paired_gain_vs_real"]
    assert gain["real+selected"]["accuracy"]["mean"] == 0.0
    # A label budget added to a finished run: the pool-only stages (data, autoencoder, latents,
    # pretrain, features) stay done; only the new budget's subset and its own stages run, and the
    # report is rebuilt over both budgets.
    shared = {s: (rd.root / s / "DONE").read_text()
              for s in ("data", "autoencoder", "latents", "pretrain", "features", f"evaluate/{b}")}
    wider = cfg.model_copy(deep=True)
    wider.data.target.budgets = [8, 4]
    run_pipeline(wider, rd)
    assert {s: (rd.root / s / "DONE").read_text() for s in shared} == shared
    assert (rd.root / "evaluate" / "4perclass" / "DONE").is_file()
    assert set(json.loads((rd.root / "report" / "results.json").read_text())["budgets"]) == {b, "4perclass"}
    small = (rd.root / "labels" / "4perclass" / "labeled.csv").read_text().splitlines()
    large = (rd.root / "labels" / "8perclass" / "labeled.csv").read_text().splitlines()
    assert len(small) == 1 + 8 and set(small) < set(large)  # 4 per class, nested in the 8-per-class subset
