"""Stage ``labels``: one label budget's labeled subset of the train split (seeded, stratified, nested)."""

from __future__ import annotations

from histodiffusion import io
from histodiffusion.data import splits as sp
from histodiffusion.data.prepared import classes_of, split_records
from histodiffusion.data.sources import write_manifest
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import print_counts


def run(ctx: StageContext) -> dict:
    """Draw the budget's subset of the train split and check every class is in it."""
    cfg = ctx.cfg
    data = ctx.upstream("data")
    classes = classes_of(data)
    train = split_records(data, "train")
    subset = sp.labeled_subset(train, ctx.budget, cfg.seed)  # type: ignore[arg-type]
    sp.check_classes_present(subset, train, ctx.budget)  # type: ignore[arg-type]
    write_manifest(ctx.folder / "labeled.csv", subset)
    row = sp.count_table({f"labeled {ctx.budget_name}": subset}, classes)
    io.write_json(ctx.folder / "counts.json", row)
    print_counts(f"{cfg.experiment}: labeled subset {ctx.budget_name} of '{cfg.data.target.name}'/train", row, classes)
    return {"counts": row}


STAGE = register(Stage("labels", "data prepare", ("seed",), ("data",), run, per_budget=True,
                       description="the labeled subset of one label budget"))
