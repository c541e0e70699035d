"""Stage ``synthesize`` (with the finetune and conditional stages it needs) on the smoke run:
manifests, tiles, grids, a resume that makes only the missing tiles, a resume after a kill that
damaged the part files, and labels that read as paths."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from histodiffusion.rundir import RunDir
from histodiffusion.stages import run_stage
from histodiffusion.stages.synthesize import FIELDS, read_part


def test_synthesize_stage_outputs(smoke_run, smoke_cfg) -> None:
    for stage in ("finetune", "conditional", "synthesize"):
        run_stage(stage, smoke_cfg, smoke_run)
    root = smoke_run.root / "synthesize" / "8perclass"
    for source in ("guided", "unguided", "conditional"):
        with open(root / source / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 8 and {r["label"] for r in rows} == {"0_no_tumor", "1_metastatic_tumor"}
        assert all((root / source / r["path"]).is_file() for r in rows)
        assert all(0.0 <= float(r["target_prob"]) <= 1.0 for r in rows)
        assert {r["source"] for r in rows} == {source}
        assert {r["guidance_scale"] for r in rows} == ({"3.0"} if source == "guided" else {"0.0"})
        assert (root / source / "grid.png").is_file()
    best = smoke_run.root / "finetune" / "8perclass" / "classifier" / "best.json"
    assert {"acc_q1", "acc_q4", "val_loss"} <= set(json.loads(best.read_text()))
    # Resume after an interruption (no DONE): the batch of the missing tile (here all 8) is made again,
    # identical to before.
    lost = root / "guided" / "tiles" / "0_no_tumor" / "000000.png"
    kept = root / "guided" / "tiles" / "1_metastatic_tumor" / "000007.png"
    first, kept_bytes = lost.read_bytes(), kept.read_bytes()
    lost.unlink()
    (root / "DONE").unlink()
    run_stage("synthesize", smoke_cfg, smoke_run)
    assert lost.read_bytes() == first
    assert kept.read_bytes() == kept_bytes


SOURCES = ("guided", "unguided", "conditional")


def _made(root: Path) -> dict[str, list[tuple[dict, bytes]]]:
    """Each source's manifest rows (in order) with the bytes of each row's PNG."""
    out = {}
    for source in SOURCES:
        with open(root / source / "manifest.csv", newline="") as f:
            out[source] = [(row, (root / source / row["path"]).read_bytes()) for row in csv.DictReader(f)]
    return out


def test_an_interrupted_synthesis_is_redone_exactly(smoke_run, smoke_cfg) -> None:
    """A kill leaves a part file empty (header still in a buffer), torn mid-row, or (from a resume by
    older code) without its header: the rerun redoes what is missing and ends with exactly the tiles
    of an uninterrupted run, each once."""
    for stage in ("finetune", "conditional", "synthesize"):
        run_stage(stage, smoke_cfg, smoke_run)
    root = smoke_run.root / "synthesize" / "8perclass"
    uninterrupted = _made(root)
    (root / "guided" / "manifest.part-0.csv").write_bytes(b"")
    (root / "guided" / "tiles" / "1_metastatic_tumor" / "000005.png").unlink()
    torn = root / "unguided" / "manifest.part-0.csv"
    torn.write_bytes(torn.read_bytes()[:-30])
    headless = root / "conditional" / "manifest.part-0.csv"
    headless.write_text("".join(headless.read_text().splitlines(keepends=True)[1:]))
    for source in SOURCES:
        (root / source / "manifest.csv").unlink()
    (root / "DONE").unlink()
    run_stage("synthesize", smoke_cfg, smoke_run)
    assert _made(root) == uninterrupted
    for source in SOURCES:
        assert [int(r["index"]) for r, _ in uninterrupted[source]] == list(range(8))
        part = (root / source / "manifest.part-0.csv").read_text()
        assert part.startswith(",".join(FIELDS)) and part.count("path,label") == 1
        assert sorted(int(r["index"]) for r in read_part(root / source / "manifest.part-0.csv")) == list(range(8))


def test_a_batch_cut_short_is_sampled_again_whole(smoke_run, smoke_cfg, tmp_path: Path) -> None:
    """Ctrl-C while a batch's tiles are being written leaves part of that batch on disk. A tile's
    bytes depend (by a grey level) on the batch it is sampled in, so the rerun samples that whole
    batch again rather than the missing tiles alone: it ends with exactly the tiles of an
    uninterrupted run, and the finished batch is not touched."""
    for stage in ("finetune", "conditional"):
        run_stage(stage, smoke_cfg, smoke_run)
    cfg = smoke_cfg.model_copy(update={"sampling": smoke_cfg.sampling.model_copy(update={"batch_size": 4})})
    run = RunDir(tmp_path / "run")
    shutil.copytree(smoke_run.root, run.root, ignore=shutil.ignore_patterns("synthesize", "select", "evaluate"))
    run_stage("synthesize", cfg, run)
    root = run.root / "synthesize" / "8perclass"
    uninterrupted = _made(root)
    guided = root / "guided"
    part = guided / "manifest.part-0.csv"
    rows = read_part(part)  # tiles 0-3 (batch one) and 4, 5 of batch two were written, 6 and 7 not
    with open(part, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["index"]) < 6)
    for r in rows:
        if int(r["index"]) >= 6:
            (guided / r["path"]).unlink()
    mtime = {int(r["index"]): (guided / r["path"]).stat().st_mtime_ns for r in rows if int(r["index"]) < 6}
    (guided / "manifest.csv").unlink()
    (root / "DONE").unlink()
    run_stage("synthesize", cfg, run)
    assert _made(root) == uninterrupted
    now = {int(r["index"]): (guided / r["path"]).stat().st_mtime_ns for r in rows}
    assert all(now[k] == mtime[k] for k in range(4))  # batch one kept
    assert all(now[k] != mtime[k] for k in (4, 5))  # batch two sampled again, whole
    assert sorted(int(r["index"]) for r in read_part(part)) == list(range(8))


def test_a_label_is_a_safe_folder_name_and_stays_the_label(smoke_run, smoke_cfg, tmp_path: Path) -> None:
    """A label that reads as a path (from a CSV manifest) cannot make synthesis write outside the run
    directory: its tiles go to a sanitised folder, its manifest rows keep the label."""
    for stage in ("finetune", "conditional"):
        run_stage(stage, smoke_cfg, smoke_run)
    run = tmp_path / "run"
    shutil.copytree(smoke_run.root, run, ignore=shutil.ignore_patterns("synthesize", "select", "evaluate"))
    evil = "../../../../../escaped"
    (run / "data" / "classes.json").write_text(json.dumps([evil, "1_metastatic_tumor"]))
    for path in [*run.glob("data/*.csv"), run / "labels" / "8perclass" / "labeled.csv"]:
        with open(path, newline="") as f:
            rows = [{**r, "label": evil if r["label"] == "0_no_tumor" else r["label"]} for r in csv.DictReader(f)]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    run_stage("synthesize", smoke_cfg, RunDir(run))
    root = run / "synthesize" / "8perclass" / "guided"
    assert not (tmp_path / "escaped").exists()
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {evil, "1_metastatic_tumor"}
    assert {r["path"].split("/")[1] for r in rows if r["label"] == evil} == {"escaped"}
    assert len(list((root / "tiles" / "escaped").glob("*.png"))) == 4
