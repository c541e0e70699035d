"""The whole pipeline (pipeline.py ``run_pipeline``): on the smoke config, on the README's
quickstart config (the demo tiles shipped in the package, no data root) with its step counts cut,
and on the PathMNIST config over a PathMNIST-format file the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from histodiffusion.config import config_from_dict, load_config
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_pipeline, run_stage
from tests.helpers import CONFIGS


def test_whole_pipeline_on_the_smoke_config(smoke_cfg, tmp_path) -> None:
    """`histodiffusion run` on the tiny config: the run tree and the report's keys."""
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
    assert set(summary) >= {"task", "label_budget", "n_seeds", "arms", "paired_gain_vs_real", "label_equivalent",
                            "headroom", "paired_gain_vs_ssl", "ladder"}
    synthetic = {"real+synthetic", "real+selected", "real+conditional_no_pretrain", "ssl+selected"}
    assert set(summary["arms"]) == {"real", "ssl", "real@2x", "real@all"} | synthetic
    for arm in summary["arms"].values():
        assert {"accuracy", "balanced_accuracy", "macro_f1", "auroc"} <= set(arm)
        assert set(arm["accuracy"]) >= {"mean", "ci_low", "ci_high"}
    # the ladder: nested supersets of the 8-per-class subset (16, 32 per class of 32 in train: 'all')
    assert summary["n_real"]["real"] == 16 and summary["n_real"]["real@2x"] == 32 and summary["n_real"]["real@all"] == 64
    assert list(summary["ladder"]) == ["real", "real@2x", "real@all"]
    assert set(summary["label_equivalent"]) == {"ssl"} | synthetic
    for le in summary["label_equivalent"].values():
        assert {"mean", "ci_low", "ci_high"} <= set(le) and 1.0 <= le["ci_low"] <= le["ci_high"] <= 4.0
    assert summary["headroom"]["rung"] == "real@all"
    assert summary["headroom"]["accuracy"]["mean"] == summary["paired_gain_vs_real"]["real@all"]["accuracy"]["mean"]
    assert set(summary["paired_gain_vs_ssl"]) == {"ssl+selected"}
    written = {p.stem for p in (rd.root / "evaluate" / b / "runs").glob("*.json")}
    assert written == {f"{a}-seed{s}" for a in summary["arms"] for s in (0, 1)}
    assert (rd.root / "report" / f"{b}_ladder.png").is_file()
    results = json.loads((rd.root / "report" / "results.json").read_text())
    assert set(results) >= {"experiment", "data", "autoencoder", "pretrain", "budgets", "wall_seconds"}
    fingerprint = json.loads((rd.root / "data" / "fingerprint.json").read_text())
    assert results["data_fingerprint"]["n_inputs"] == len(fingerprint["inputs"]) > 0
    assert f"fingerprint {results['data_fingerprint']['sha256']}" in (rd.root / "report" / "report.md").read_text()
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
    accepted = rd.root / "select" / b / "guided" / "accepted.csv"
    accepted.write_text(accepted.read_text().splitlines()[0] + "\n")
    cfg = smoke_cfg.model_copy(update={"evaluate": smoke_cfg.evaluate.model_copy(
        update={"arms": ["real+selected", "real"], "ladder": [], "ladder_all": False})})
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


def write_pathmnist(root: Path, size: int = 64, per_class: dict[str, int] | None = None) -> Path:
    """A small MedMNIST-format npz: 9 classes, {train,val,test}_{images,labels}."""
    rng = np.random.default_rng(0)
    per_class = per_class or {"train": 8, "val": 2, "test": 12}
    arrays = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(9), n)
        # Class-dependent colour so the classes are learnable, plus texture noise.
        base = np.stack([np.full((size, size, 3), (40 + 20 * k, 200 - 15 * k, 120 + 10 * (k % 3))) for k in labels])
        images = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path = root / "pathmnist" / f"pathmnist_{size}.npz"
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, **arrays)
    return path


QUICK = ["autoencoder.train.steps=6", "pretrain.train.steps=6", "pretrain.sample_every=3", "features.steps=3",
         "finetune.train.steps=3", "finetune.classifier.train.steps=6", "finetune.classifier.eval_every=3",
         "select.classifier.steps=4", "select.classifier.eval_every=2", "evaluate.classifier.steps=4",
         "evaluate.classifier.eval_every=2", "evaluate.seeds=[0]", "sampling.num_steps=4"]


def test_real_and_ssl_arms_alone_run_without_a_diffusion_model(smoke_cfg, tmp_path) -> None:
    """The headroom check a user can make before training any generator: with only the real and
    ssl arms, the pipeline runs the stages they rest on (no autoencoder, LDM or synthesis) and the
    report still draws the real-label ladder with ssl on it."""
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={smoke_cfg.data.root}", "evaluate.arms=[real,ssl]"])
    rd = RunDir(tmp_path / "run")
    run_pipeline(cfg, rd)
    assert sorted(p.name for p in rd.root.iterdir() if p.is_dir()) == ["data", "evaluate", "features", "labels",
                                                                        "report"]
    summary = json.loads((rd.root / "evaluate" / "8perclass" / "summary.json").read_text())
    assert set(summary["arms"]) == {"real", "ssl", "real@2x", "real@all"}
    assert set(summary["label_equivalent"]) == {"ssl"} and summary["headroom"]["rung"] == "real@all"
    assert (rd.root / "report" / "8perclass_ladder.png").is_file()


def test_quickstart_runs_offline_on_the_shipped_demo_tiles(tmp_path: Path, monkeypatch) -> None:
    """The README's main job as shipped (configs/quickstart.yaml), step counts cut with --set: every
    stage runs with no data root and no network, and the report says what a demo shows."""
    monkeypatch.delenv("HISTODIFFUSION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))  # no data root anywhere
    cfg = load_config(CONFIGS / "quickstart.yaml", QUICK)
    rd = RunDir(tmp_path / "run")
    run_pipeline(cfg, rd)
    counts = json.loads((rd.root / "data" / "counts.json").read_text())
    assert counts["classes"] == ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA",
                                 "07_ADIPOSE", "08_EMPTY"]
    assert counts["pool"] == {"total": 291, "by_source": {"demo_pool": 291}} and counts["split_by"] == "group"
    assert sum(counts["counts"][s]["total"] for s in ("train", "valid", "test")) == 364
    summary = json.loads((rd.root / "evaluate" / "10perclass" / "summary.json").read_text())
    assert set(summary["arms"]) == {"real", "real+synthetic", "real+selected", "ssl", "ssl+selected", "real@2x",
                                    "real@all"}
    labeled = json.loads((rd.root / "labels" / "10perclass" / "counts.json").read_text())["labeled 10perclass"]
    assert summary["n_real"]["real"] == labeled["total"] and all(0 < labeled[c] <= 10 for c in counts["classes"])
    results = json.loads((rd.root / "report" / "results.json").read_text())
    assert "not what the method is worth" in results["note"]
    assert "not what the method is worth" in (rd.root / "report" / "report.md").read_text()


def test_pathmnist_pipeline_on_pathmnist_format(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_pathmnist(root)
    raw = yaml.safe_load((CONFIGS / "pathmnist.yaml").read_text())
    # The PathMNIST config's data section as shipped; the training sections at the tiny preset's sizes.
    tiny = {"experiment": raw["experiment"], "preset": "tiny", "data": raw["data"],
            "synthesize": {"per_class": 2}, "evaluate": {"arms": ["real", "real+selected"]}}
    cfg = config_from_dict(tiny, [f"data.root={root}", "data.target.budgets=[2]", "data.pool.0.max_images=40"])
    rd = RunDir(tmp_path / "run")
    run_pipeline(cfg, rd)
    counts = json.loads((rd.root / "data" / "counts.json").read_text())
    labeled = json.loads((rd.root / "labels" / "2perclass" / "counts.json").read_text())
    assert len(counts["classes"]) == 9 and labeled["labeled 2perclass"]["total"] == 18
    assert counts["pool"]["by_source"] == {"pathmnist": 40}
    assert (rd.root / "report" / "report.html").is_file()
    summary = json.loads((rd.root / "evaluate" / "2perclass" / "summary.json").read_text())
    assert set(summary["arms"]) == {"real", "real+selected"}
