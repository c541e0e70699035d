"""The command line (cli.py) on real input: data prepare on the smoke config, and every bad input's message."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import CONFIGS, REPO, image_folder, run_cli, user_error


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_only_existing_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("data", "config", "run", "train-autoencoder", "pretrain", "sample", "finetune",
                    "train-conditional", "synthesize", "select", "evaluate", "evaluate-generation", "report"):
        assert command in proc.stdout
    sub = run_cli("data", "--help")
    for command in ("prepare", "fetch", "tile"):
        assert command in sub.stdout


def test_dry_run_prints_resolved_config(tmp_path: Path) -> None:
    proc = run_cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--dry-run", "--set", "data.resolution=48")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["data"]["resolution"] == 48 and resolved["preset"] == "tiny"


def test_unknown_config_key_exit_2(tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    raw["data"]["resolutoin"] = 32
    msg = user_error(run_cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw))))
    assert "data.resolutoin: unknown key; did you mean 'resolution'?" in msg


def test_bad_set_value_exit_2() -> None:
    msg = user_error(run_cli("config", str(CONFIGS / "smoke.yaml"), "--set", "data.resolution=-3"))
    assert "data.resolution: Input should be greater than or equal to 8" in msg


def test_set_mapping_without_space_and_emoji_codes_exit_2() -> None:
    msg = user_error(run_cli("config", str(CONFIGS / "smoke.yaml"), "--set", "synthesize.class_scales={a:100}"))
    assert "'a:100' reads as a key with no value" in msg and "(write {a: 100})" in msg
    # rich would render ":100:" as an emoji; a key must be printed as typed
    msg = user_error(run_cli("config", str(CONFIGS / "smoke.yaml"), "--set", "data.x:100:=3"))
    assert "data.x:100:: unknown key. Allowed here:" in msg


def test_missing_data_root_exit_2(tmp_path: Path) -> None:
    msg = user_error(run_cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "r"),
                             "--data-root", str(tmp_path / "nowhere")))
    assert f"data root {tmp_path / 'nowhere'} does not exist" in msg and "HISTODIFFUSION_DATA" in msg


def test_corrupt_image_in_target_exit_2(tmp_path: Path) -> None:
    target = image_folder(tmp_path / "tgt", {"a": 12, "b": 12})
    (target / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    pool = image_folder(tmp_path / "pool", {"x": 6}, seed=1)  # other noise than the target
    raw = {"experiment": "bad", "preset": "tiny",
           "data": {"max_bad_fraction": 0.0,
                    "target": {"path": str(target), "split_by": "stratified", "budgets": [2]},
                    "pool": [{"path": str(pool)}]}}
    msg = user_error(run_cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                             "--run-dir", str(tmp_path / "r")))
    assert "broken.png" in msg and "could not be read" in msg and "max_bad_fraction" in msg
    # Within the tolerated fraction the file is skipped with a warning and listed in the summary.
    proc = run_cli("data", "prepare", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r2"),
                   "--set", "data.max_bad_fraction=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable file" in proc.stderr and "broken.png" in proc.stderr


def test_class_with_no_labeled_images_exit_2(tmp_path: Path) -> None:
    target = image_folder(tmp_path / "tgt", {"common": 40, "rare": 5})
    pool = image_folder(tmp_path / "pool", {"x": 4}, seed=1)  # other noise than the target
    raw = {"experiment": "rare", "preset": "tiny",
           "data": {"target": {"path": str(target), "split_by": "stratified", "budgets": [0.1]},
                    "pool": [{"path": str(pool)}]}}
    msg = user_error(run_cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                             "--run-dir", str(tmp_path / "r")))
    assert "class 'rare' has no labeled images at budget 0.1" in msg


def test_group_leakage_in_manifest_exit_2(tmp_path: Path) -> None:
    image_folder(tmp_path / "img", {"a": 6, "b": 6})
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
    pool = image_folder(tmp_path / "pool", {"x": 4}, seed=1)  # other noise than the target
    raw = {"experiment": "leak", "preset": "tiny",
           "data": {"target": {"path": str(tmp_path / "m.csv"), "budgets": [1]}, "pool": [{"path": str(pool)}]}}
    msg = user_error(run_cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                             "--run-dir", str(tmp_path / "r")))
    assert "group leakage: case 'casea0' is in both the train and the test split" in msg


def test_target_in_pool_exit_2(tmp_path: Path, data_root: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    raw["data"]["pool"].append("pcam")
    msg = user_error(run_cli("data", "prepare", str(_write_config(tmp_path / "c.yaml", raw)),
                             "--data-root", str(data_root), "--run-dir", str(tmp_path / "r")))
    assert "'pcam' is the target dataset" in msg


@pytest.mark.slow  # ~40 s: three `data prepare` runs on the real data
def test_smoke_prepare_on_real_data(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run))
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
    rerun = run_cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run))
    assert rerun.returncode == 0 and "already done" in rerun.stderr
    resumed = run_cli("data", "prepare", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root), "--run-dir", str(run),
                      "--resume")
    assert resumed.returncode == 0 and "already done" in resumed.stderr
    never = user_error(run_cli("train-autoencoder", str(CONFIGS / "smoke.yaml"), "--data-root", str(data_root),
                               "--run-dir", str(tmp_path / "typo"), "--resume"))
    assert "--resume: stage 'autoencoder' was never started in" in never and "typo" in never
    assert not (tmp_path / "typo" / "autoencoder").exists()
    both = user_error(run_cli("pretrain", str(CONFIGS / "smoke.yaml"), "--run-dir", str(run), "--resume", "--force"))
    assert "give one of them" in both


def test_data_fetch_offline_says_where_to_put_files(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening: the offline case, on any machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("data", "fetch", "nct_crc_he_100k", "--data-root", str(tmp_path),
                   env={"HISTODIFFUSION_ZENODO_API": f"http://127.0.0.1:{port}/api"})
    msg = user_error(proc)
    assert "NCT-CRC-HE-100K.zip" in msg and str(tmp_path / "nct_crc_he_100k" / "downloads") in msg


def test_pathmnist_offline_stops_at_once_with_a_message(tmp_path: Path) -> None:
    """The PathMNIST config with no data and no network: a message saying where to put the file."""
    env = {"HISTODIFFUSION_DATA": str(tmp_path / "empty"),
           # No network in the test whatever the machine: every request goes to a closed port.
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = run_cli("run", str(CONFIGS / "pathmnist.yaml"), "--run-dir", str(tmp_path / "run"), env=env, timeout=120)
    message = user_error(proc)
    assert "could not be fetched" in message and "--data-root" in message and "pathmnist_64.npz" in message


def test_sample_command_writes_tiles_of_the_pretrained_unet(smoke_run, data_root: Path) -> None:
    """`histodiffusion sample` on a pre-trained run: one PNG per seed and a grid in the default folder."""
    args = ("sample", str(CONFIGS / "smoke.yaml"), "--run-dir", str(smoke_run.root), "--data-root", str(data_root))
    proc = run_cli(*args, "--num", "3")
    assert proc.returncode == 0, proc.stderr
    out = smoke_run.root / "samples" / "pretrain-ddim4"
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    assert json.loads((out / "sampling.json").read_text())["num"] == 3 and "3 new tiles" in proc.stderr
    assert "--num must be at least 1, got 0" in user_error(run_cli(*args, "--num", "0"))


def test_a_second_process_on_a_run_directory_stops_at_once_naming_the_holder(tmp_path: Path) -> None:
    from histodiffusion.rundir import RunDir

    args = ("data", "prepare", str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "run"),
            "--data-root", str(tmp_path / "nowhere"))
    with RunDir(tmp_path / "run").lock():
        msg = user_error(run_cli(*args))
    assert f"run directory {tmp_path / 'run'} is in use by another histodiffusion process (pid {os.getpid()} on" in msg
    assert "Wait for it to finish or stop it" in msg
    # released: the same command now gets past the lock (and stops at the missing data root)
    assert "data root" in user_error(run_cli(*args)) and not (tmp_path / "run" / ".lock.json").exists()


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGINT, 130, ""), (signal.SIGTERM, 143, " (SIGTERM)")])
def test_ctrl_c_and_sigterm_exit_saying_how_to_resume(sig: int, code: int, name: str, tmp_path: Path,
                                                      data_root: Path) -> None:
    # signalled once the autoencoder stage starts: the stages after it take far longer than a
    # signal to arrive (the data stage alone could finish first on a fast machine)
    proc = subprocess.Popen([sys.executable, "-m", "histodiffusion", "run", str(CONFIGS / "smoke.yaml"),
                             "--run-dir", str(tmp_path / "run"), "--data-root", str(data_root)],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    for line in proc.stderr:
        if "autoencoder: running in" in line:
            break
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    assert f"interrupted{name}: finished stages and checkpoints are kept; rerun the same command to resume" in err
    assert "Traceback" not in err


def test_tiling_only_unreadable_inputs_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    msg = user_error(run_cli("data", "tile", str(tmp_path / "notes.png"), "--out", str(tmp_path / "out")))
    assert "tiling: none of the 1 input(s) could be read" in msg and str(tmp_path / "notes.png") in msg


def test_tiling_skips_an_unreadable_input_with_a_plain_warning(tmp_path: Path) -> None:
    """One good field and one text file named .png: the good one is tiled, exit 0, and the skipped
    file is a 'warning:' line naming it, not Python's warning with its source line."""
    rng = np.random.default_rng(0)
    field = np.full((256, 256, 3), 240, np.uint8)
    field[:, :128] = np.clip(rng.normal((200, 110, 170), 20, (256, 128, 3)), 0, 255)  # H&E-pink tissue half
    Image.fromarray(field).save(tmp_path / "field.png")
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    proc = run_cli("data", "tile", str(tmp_path / "field.png"), str(tmp_path / "notes.png"), "--size", "64",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: tiling: skipped 1 unreadable file(s) of 2" in proc.stderr and "notes.png" in proc.stderr
    assert "TilingWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) >= 4


def test_negative_seed_exit_2() -> None:
    msg = user_error(run_cli("config", str(CONFIGS / "smoke.yaml"), "--set", "seed=-1"))
    assert "seed: Input should be greater than or equal to 0 (got -1)" in msg


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "x.safetensors"),
                                   RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                "message: \"No space left on device\" })")])
def test_a_full_disk_anywhere_is_a_message(error: Exception, capsys: pytest.CaptureFixture) -> None:
    from histodiffusion.cli import guarded

    def entry() -> None:
        raise error

    with pytest.raises(SystemExit) as stop:
        guarded(entry)
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on the device" in err and "Free some space and rerun the same command; nothing finished is lost" in err
