"""The command line on real input: data prepare on the smoke config, and every bad input's message."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from .conftest import CONFIGS, REPO


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "histodiffusion", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=300)


def _user_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    return " ".join(proc.stderr.split())  # unwrap rich's line folding


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _folder_dataset(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_help_lists_only_existing_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("data", "config", "run", "train-autoencoder", "pretrain", "sample", "finetune",
                    "train-conditional", "synthesize", "select", "evaluate", "evaluate-generation", "report"):
        assert command in proc.stdout
    sub = cli("data", "--help")
    for command in ("prepare", "fetch", "tile"):
        assert command in sub.stdout


def test_dry_run_prints_resolved_config(tmp_path: Path) -> None:
    proc = cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--dry-run", "--set", "data.resolution=48")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["data"]["resolution"] == 48 and resolved["preset"] == "tiny"


def test_unknown_config_key_exit_2(tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    raw["data"]["resolutoin"] = 32
    msg = _user_error(cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw))))
    assert "data.resolutoin: unknown key; did you mean 'resolution'?" in msg


def test_bad_set_value_exit_2() -> None:
    msg = _user_error(cli("config", str(CONFIGS / "smoke.yaml"), "--set", "data.resolution=-3"))
    assert "data.resolution: Input should be greater than or equal to 8" in msg


def test_set_mapping_without_space_and_emoji_codes_exit_2() -> None:
    msg = _user_error(cli("config", str(CONFIGS / "smoke.yaml"), "--set", "synthesize.class_scales={a:100}"))
    assert "'a:100' reads as a key with no value" in msg and "(write {a: 100})" in msg
    # rich would render ":100:" as an emoji; a key must be printed as typed
    msg = _user_error(cli("config", str(CONFIGS / "smoke.yaml"), "--set", "data.x:100:=3"))
    assert "data.x:100:: unknown key. Allowed here:" in msg


def test_missing_data_root_exit_2(tmp_path: Path) -> None:
    msg = _user_error(cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "r"),
                          "--data-root", str(tmp_path / "nowhere")))
    assert f"data root {tmp_path / 'nowhere'} does not exist" in msg and "HISTODIFFUSION_DATA" in msg


def test_corrupt_image_in_target_exit_2(tmp_path: Path) -> None:
    target = _folder_dataset(tmp_path / "tgt", {"a": 12, "b": 12})
    (target / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    pool = _folder_dataset(tmp_path / "pool", {"x": 6})
    raw = {"experiment": "bad", "preset": "tiny",
           "data": {"max_bad_fraction": 0.0,
                    "target": {"path": str(target), "split_by": "stratified", "budgets": [2]},
                    "pool": [{"path": str(pool)}]}}
    msg = _user_error(cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                          "--run-dir", str(tmp_path / "r")))
    assert "broken.png" in msg and "could not be read" in msg and "max_bad_fraction" in msg
    # Within the tolerated fraction the file is skipped with a warning and listed in the summary.
    proc = cli("data", "prepare", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r2"),
               "--set", "data.max_bad_fraction=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable file" in proc.stderr and "broken.png" in proc.stderr


def test_class_with_no_labeled_images_exit_2(tmp_path: Path) -> None:
    target = _folder_dataset(tmp_path / "tgt", {"common": 40, "rare": 5})
    pool = _folder_dataset(tmp_path / "pool", {"x": 4})
    raw = {"experiment": "rare", "preset": "tiny",
           "data": {"target": {"path": str(target), "split_by": "stratified", "budgets": [0.1]},
                    "pool": [{"path": str(pool)}]}}
    msg = _user_error(cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                          "--run-dir", str(tmp_path / "r")))
    assert "class 'rare' has no labeled images at budget 0.1" in msg


def test_group_leakage_in_manifest_exit_2(tmp_path: Path) -> None:
    _folder_dataset(tmp_path / "img", {"a": 6, "b": 6})
    rows = []
    for label in ("a", "b"):
        for i in range(6):
            split = ["train", "train", "valid", "test", "train", "test"][i]
            group = f"case{label}{i % 3}"  # case a0 has tiles 0 (train) and 3 (test): leakage
            rows.append({"path": f"img/{label}/{i}.png", "label": label, "group": group, "split": split})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group", "split"])
        w.writeheader()
        w.writerows(rows)
    pool = _folder_dataset(tmp_path / "pool", {"x": 4})
    raw = {"experiment": "leak", "preset": "tiny",
           "data": {"target": {"path": str(tmp_path / "m.csv"), "budgets": [1]}, "pool": [{"path": str(pool)}]}}
    msg = _user_error(cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                          "--run-dir", str(tmp_path / "r")))
    assert "group leakage: case 'casea0' is in both the train and the test split" in msg


def test_target_in_pool_exit_2(tmp_path: Path, data_root: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    raw["data"]["pool"].append("pcam")
    msg = _user_error(cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                          "--data-root", str(data_root), "--run-dir", str(tmp_path / "r")))
    assert "'pcam' is the target dataset" in msg


def test_smoke_prepare_on_real_data(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    proc = cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "labeled 8perclass" in proc.stderr and "pre-training pool" in proc.stderr
    for name in ("config.yaml", "environment.json", "data/DONE", "data/pool.csv", "data/train.csv",
                 "data/valid.csv", "data/test.csv", "labels/8perclass/labeled.csv", "data/classes.json",
                 "data/cache/pool/index.json", "data/cache/train/index.json"):
        assert (run / name).is_file(), name
    counts = json.loads((run / "data" / "counts.json").read_text())
    assert counts["counts"]["test"]["total"] == 64
    assert json.loads((run / "labels" / "8perclass" / "counts.json").read_text())["labeled 8perclass"]["total"] == 16
    assert set(counts["pool"]["by_source"]) == {"ebhi", "lc25000", "nct_crc_he", "kather2016", "unlabeled_he"}
    rerun = cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run))
    assert rerun.returncode == 0 and "already done" in rerun.stderr
    resumed = cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run),
                  "--resume")
    assert resumed.returncode == 0 and "already done" in resumed.stderr
    never = _user_error(cli("train-autoencoder", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root),
                            "--run-dir", str(tmp_path / "typo"), "--resume"))
    assert "--resume: stage 'autoencoder' was never started in" in never and "typo" in never
    assert not (tmp_path / "typo" / "autoencoder").exists()
    both = _user_error(cli("pretrain", str(CONFIGS / "smoke.yaml"), "--run-dir", str(run), "--resume", "--force"))
    assert "give one of them" in both


def test_data_fetch_offline_says_where_to_put_files(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening: the offline case, on any machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli("data", "fetch", "nct_crc_he_100k", "--data-root", str(tmp_path),
               env={"HISTODIFFUSION_ZENODO_API": f"http://127.0.0.1:{port}/api"})
    msg = _user_error(proc)
    assert "NCT-CRC-HE-100K.zip" in msg and str(tmp_path / "nct_crc_he_100k" / "downloads") in msg


def test_bench_script_reports_a_missing_data_root_without_traceback(tmp_path: Path) -> None:
    """The bench scripts share the CLI's error handling: a message naming the fix, exit code 2."""
    env = {**os.environ, "HISTODIFFUSION_DATA": str(tmp_path / "nowhere"), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_protocol.py"), "--config",
                           str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    message = _user_error(proc)
    assert "nowhere does not exist" in message and "HISTODIFFUSION_DATA" in message


def _seed_result(folder: Path, arm: str, seed: int, accuracy: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy}
    (folder / f"{arm}-seed{seed}.json").write_text(json.dumps({"arm": arm, "seed": seed, "test": test}))


def test_pool_seeds_pools_disjoint_seeds_and_refuses_a_repeated_one(tmp_path: Path) -> None:
    """bench/pool_seeds.py pairs arms by seed across run directories, as `evaluate` does in one."""
    gains = {0: 0.01, 1: 0.03, 2: 0.02, 3: 0.04}
    for seed, gain in gains.items():
        folder = tmp_path / f"run{seed // 2}" / "evaluate" / "1pct" / "runs"
        _seed_result(folder, "real", seed, 0.70 + 0.01 * seed)
        _seed_result(folder, "real+selected", seed, 0.70 + 0.01 * seed + gain)
    script = str(REPO / "bench" / "pool_seeds.py")
    out = tmp_path / "pooled.json"
    proc = subprocess.run([sys.executable, script, "--budget", "1pct", str(tmp_path / "run0"), str(tmp_path / "run1"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads(out.read_text())
    assert pooled["seeds"] == [0, 1, 2, 3]
    gain = pooled["paired_gain_vs_real"]["real+selected"]["accuracy"]
    assert gain["mean"] == pytest.approx(0.025)
    assert gain["ci_low"] < 0.025 < gain["ci_high"]
    assert "+2.5" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--budget", "1pct", str(tmp_path / "run0"), str(tmp_path / "run0")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "seed 0" in proc.stderr and "disjoint" in proc.stderr and "Traceback" not in proc.stderr


def test_oracle_agreement_names_a_missing_synthesize_stage(tmp_path: Path) -> None:
    """bench/oracle_agreement.py on a run with no synthetic tiles says which stage to run, exit code 2."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "oracle_agreement.py"), "--config",
                           str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "run"), "--budget", "1pct"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    message = _user_error(proc)
    assert str(tmp_path / "run" / "synthesize" / "1pct" / "guided" / "manifest.csv") in message
    assert "synthesize stage" in message


def test_oracle_agreement_counts_per_class() -> None:
    """Agreement overall and per class; a class with no tiles reads None, not a division by zero."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from oracle_agreement import agreement
    finally:
        sys.path.remove(str(REPO / "bench"))
    result = agreement(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert result["agreement"] == pytest.approx(0.75)
    assert result["per_class"]["a"] == {"tiles": 2, "agreement": 0.5}
    assert result["per_class"]["b"] == {"tiles": 2, "agreement": 1.0}
    assert result["per_class"]["c"] == {"tiles": 0, "agreement": None}
