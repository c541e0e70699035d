"""Stage ``data`` (stages/data.py): the practical protocol's pool, and the guards on a small CSV target
(a file listed twice, identical copies across splits or in the pool, one class, huge images) and the
fingerprint of what it read."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from histodiffusion.config import config_from_dict, load_config
from histodiffusion.data import fingerprint as fp
from histodiffusion.data.sources import read_manifest
from histodiffusion.errors import UserError
from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from tests.helpers import CONFIGS, image_folder, noise, write_image


def _paths(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_practical_protocol_adds_unlabeled_target_train_tiles_only(data_root, tmp_path) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}", "data.pool_target_train=true"])
    rd = RunDir(tmp_path / "run")
    for stage in ("data", "labels"):
        run_stage(stage, cfg, rd)
    pool = _paths(rd.root / "data" / "pool.csv")
    train = {r["path"] for r in _paths(rd.root / "data" / "train.csv")}
    held_out = {r["path"] for s in ("valid", "test") for r in _paths(rd.root / "data" / f"{s}.csv")}
    labeled = {r["path"] for r in _paths(rd.root / "labels" / "8perclass" / "labeled.csv")}
    added = [r for r in pool if r["source"] == "pcam train, unlabeled"]
    assert {r["path"] for r in added} == train - labeled and len(added) == 64 - 16
    assert all(r["label"] == "" for r in added)
    assert not {r["path"] for r in pool} & (held_out | labeled)
    # the paper's protocol leaves the target out entirely, and its data stage ignores the budgets
    paper = load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}"])
    assert paper.section_hash("data") != cfg.section_hash("data")


# ------------------------------------------------------------------ guards on a small CSV target
def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _small(tmp_path: Path, rows: list[dict] | None = None, **target) -> tuple:
    """A target of two classes x 6 noise PNGs (a CSV manifest: ``rows`` or one row per image), a pool
    of 4, and the config and run directory of a data stage on them."""
    image_folder(tmp_path / "img", {"a": 6, "b": 6}, size=24)
    image_folder(tmp_path / "pool", {"x": 4}, size=24, seed=1)
    rows = rows or [{"path": f"img/{c}/{i}.png", "label": c} for c in "ab" for i in range(6)]
    raw = {"experiment": "t", "preset": "tiny",
           "data": {"target": {"path": str(_csv(tmp_path / "m.csv", rows)), "split_by": "stratified", "budgets": [1],
                               **target},
                    "pool": [{"path": str(tmp_path / "pool")}]}}
    return config_from_dict(raw), RunDir(tmp_path / "run")


def test_a_file_listed_twice_is_used_once_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"path": f"img/{c}/{i}.png", "label": c} for c in "ab" for i in range(6)]
    cfg, rd = _small(tmp_path, rows + [rows[0]])
    run_stage("data", cfg, rd)
    assert "source 'm': 1 row(s) list a file again; each file is used once" in " ".join(capsys.readouterr().err.split())
    used = [r["path"] for s in ("train", "valid", "test") for r in _paths(rd.root / "data" / f"{s}.csv")]
    assert len(used) == len(set(used)) == 12


def test_a_file_with_two_labels_is_refused(tmp_path: Path) -> None:
    rows = [{"path": f"img/{c}/{i}.png", "label": c} for c in "ab" for i in range(6)]
    cfg, rd = _small(tmp_path, rows + [{"path": "img/a/0.png", "label": "b"}])
    with pytest.raises(UserError, match=r"(?s)lists 1 file\(s\) twice .*img/a/0.png: label 'a' and 'b'"):
        run_stage("data", cfg, rd)


def test_a_copy_of_a_train_image_in_test_is_refused(tmp_path: Path) -> None:
    splits = ["train", "train", "train", "valid", "test", "test"]
    rows = [{"path": f"img/{c}/{i}.png", "label": c, "split": splits[i]} for c in "ab" for i in range(6)]
    cfg, rd = _small(tmp_path, rows, split_by="own")
    shutil.copy(tmp_path / "img" / "a" / "0.png", tmp_path / "img" / "a" / "copy.png")
    _csv(tmp_path / "m.csv", rows + [{"path": "img/a/copy.png", "label": "a", "split": "test"}])
    with pytest.raises(UserError, match=r"(?s)would be in two splits .*img/a/0.png \(train\) = .*img/a/copy.png \(test\)"):
        run_stage("data", cfg, rd)
    assert not (rd.root / "data").exists()  # refused before writing anything: no record kept


def test_a_pool_copy_of_a_test_image_is_refused(tmp_path: Path) -> None:
    splits = ["train", "train", "train", "valid", "test", "test"]
    rows = [{"path": f"img/{c}/{i}.png", "label": c, "split": splits[i]} for c in "ab" for i in range(6)]
    cfg, rd = _small(tmp_path, rows, split_by="own")
    shutil.copy(tmp_path / "img" / "b" / "5.png", tmp_path / "pool" / "x" / "renamed.png")
    with pytest.raises(UserError, match=r"(?s)1 pool file\(s\) are copies .*pool/x/renamed.png .* = .*img/b/5.png \(test split\)"):
        run_stage("data", cfg, rd)


def test_a_one_class_target_is_refused(tmp_path: Path) -> None:
    cfg, rd = _small(tmp_path, [{"path": f"img/a/{i}.png", "label": "a"} for i in range(6)])
    with pytest.raises(UserError, match="target 'm' has only the class 'a'; a classifier needs at least two"):
        run_stage("data", cfg, rd)


def test_a_huge_target_image_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, rd = _small(tmp_path)
    write_image(tmp_path / "img" / "a" / "0.png", noise((300, 280)))  # > 8 x 32 px on its short side
    run_stage("data", cfg, rd)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 target image(s) are more than 8x data.resolution (32 px)" in err and "img/a/0.png (280x300)" in err
    assert "histodiffusion data tile" in err


def test_a_rerun_says_which_data_files_changed(tmp_path: Path) -> None:
    """The data stage records what it read; a rerun that finds a file changed refuses to reuse the results."""
    cfg, rd = _small(tmp_path)
    run_stage("data", cfg, rd)
    facts = json.loads((rd.root / "data" / "fingerprint.json").read_text())
    assert str((tmp_path / "pool" / "x" / "0.png").resolve()) in facts["inputs"]
    assert {"train.csv", "pool.csv", "classes.json", "cache/train/index.json"} <= set(facts["outputs"])
    touched = tmp_path / "img" / "b" / "2.png"
    os.utime(touched, ns=(1, 1))  # a new time, the same bytes: not a change
    assert run_stage("data", cfg, rd)[0]["skipped"]
    write_image(touched, noise(24, 7))
    with pytest.raises(UserError, match=rf"(?s)the data changed since stage 'data' ran in {rd.root}: 1 file\(s\) .*"
                                        rf"{touched.resolve()}.*--force data"):
        run_stage("data", cfg, rd)
    run_stage("data", cfg, rd, force=True)
    assert run_stage("data", cfg, rd)[0]["skipped"]


def _digest(rd: RunDir) -> str:
    data = rd.root / "data"
    return fp.content_digest(json.loads((data / "fingerprint.json").read_text())["inputs"],
                             {role: read_manifest(data / f"{role}.csv") for role in ("train", "valid", "test", "pool")})


def test_the_fingerprint_digest_is_of_content_labels_and_splits_not_of_where_or_when(tmp_path: Path) -> None:
    """The same files copied to another folder (new paths, new times) give the same digest; one changed
    image, or the same images with one label changed, give another."""
    digests = []
    for where in ("first", "second"):
        cfg, rd = _small(tmp_path / where)
        run_stage("data", cfg, rd)
        digests.append(_digest(rd))
    assert digests[0] == digests[1]
    cfg, rd = _small(tmp_path / "second")
    write_image(tmp_path / "second" / "img" / "a" / "0.png", noise(24, 7))
    run_stage("data", cfg, rd, force=True)
    assert _digest(rd) != digests[0]
    rows = [{"path": f"img/{c}/{i}.png", "label": c} for c in "ab" for i in range(6)]
    rows[0]["label"], rows[6]["label"] = "b", "a"  # two files swap labels: the same files, other labels
    cfg, rd = _small(tmp_path / "third", rows)
    run_stage("data", cfg, rd)
    assert _digest(rd) != digests[0]
