"""Stage ``synthesize`` (with the finetune and conditional stages it needs) on the smoke run:
manifests, tiles, grids, and a resume that makes only the missing tiles."""

from __future__ import annotations

import csv
import json

from histodiffusion.stages import run_stage


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
    # Resume after an interruption (no DONE): only the missing tile is made again, identical to before.
    lost = root / "guided" / "tiles" / "0_no_tumor" / "000000.png"
    kept = root / "guided" / "tiles" / "1_metastatic_tumor" / "000007.png"
    first, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    lost.unlink()
    (root / "DONE").unlink()
    run_stage("synthesize", smoke_cfg, smoke_run)
    assert lost.read_bytes() == first
    assert kept.stat().st_mtime_ns == kept_mtime
