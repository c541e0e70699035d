"""Stage ``synthesize``: tiles of chosen classes from each configured source (guided, unguided,
conditional), guided in latent space by the noise-aware classifier.

Sample k (a global index over all classes) starts from the noise of its own seed, so guided,
unguided and conditional tiles with the same k share their starting noise (paired comparisons),
and the set is the same whatever the batch size or number of processes (up to the rounding of
batched kernels). Under ``accelerate launch`` process r takes k = r, r + P, r + 2P, ... in batches
of ``sampling.batch_size``; a resume redoes every batch that is not complete, whole, so an
interrupted run ends with exactly the tiles of an uninterrupted one.
"""

from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.images import read_rgb, save_png
from histodiffusion.data.prepared import (
    classes_of,
    read_manifest_rows,
    real_examples,
    split_records,
)
from histodiffusion.data.sources import label_folders
from histodiffusion.devices import process_state
from histodiffusion.diffusion.guidance import guided_eps
from histodiffusion.diffusion.sampling import latent_shape, sample_batches, unet_eps_fn
from histodiffusion.errors import UserError
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.models.latent_classifier import CLASSIFIER, load_latent_classifier
from histodiffusion.models.unet import ADAPT, UNET, load_unet
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console, progress_bar
from histodiffusion.viz import labeled_rows, save_image

FIELDS = ["path", "label", "index", "source", "guidance_scale", "sampler", "num_steps", "eta",
          "target_prob", "unet_sha256", "classifier_sha256"]


def plan(cfg: ExperimentConfig, classes: list[str], labeled_counts: dict[str, int]) -> list[tuple[int, int]]:
    """(global index k, class index) for every tile to make: per_class, or a multiple of the real count."""
    s = cfg.synthesize
    out, k = [], 0
    for c, name in enumerate(classes):
        n = s.per_class if s.per_class is not None else int(round(s.multiple_of_real * labeled_counts.get(name, 0)))
        out += [(k + j, c) for j in range(n)]
        k += n
    return out


def class_scales(cfg: ExperimentConfig, classes: list[str]) -> torch.Tensor:
    """Guidance scale per class index (``class_scales`` overriding ``guidance_scale``)."""
    unknown = sorted(set(cfg.synthesize.class_scales) - set(classes))
    if unknown:
        raise UserError(f"synthesize.class_scales: {unknown} are not classes of the target ({classes})")
    return torch.tensor([cfg.synthesize.class_scales.get(c, cfg.synthesize.guidance_scale) for c in classes])


def read_part(part: Path) -> list[dict]:
    """The complete rows of a process's part file. An interrupted process may have left it empty,
    without its header or with a torn last row: those rows are not taken (their tiles are redone)."""
    text = part.read_text(encoding="utf-8", errors="replace") if part.is_file() else ""
    records = list(csv.reader(StringIO(text, newline="")))
    if text and not text.endswith("\n"):
        records = records[:-1]  # the last row was cut short
    rows = []
    for values in records:
        row = dict(zip(FIELDS, values, strict=False))
        if len(values) == len(FIELDS) and values != FIELDS and row["index"].isdigit():
            rows.append(row)
    return rows


def _done_indices(out: Path) -> dict[int, dict]:
    """Tile index -> manifest row of every tile made so far (its row complete and its PNG on disk)."""
    rows: dict[int, dict] = {}
    for part in sorted(out.glob("manifest.part-*.csv")):
        for row in read_part(part):
            if (out / row["path"]).is_file():
                rows[int(row["index"])] = row
    return rows


def _restart_part(part: Path, redo: set[int]) -> None:
    """Rewrite a process's part file as its header and its complete rows, less those of the tiles
    to ``redo``, so appending to it is safe."""
    rows = [r for r in read_part(part) if int(r["index"]) not in redo]
    with io.atomic_path(part) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def unet_folder(ctx: StageContext, source: str) -> Path:
    """Folder of the UNet a source samples: the conditional baseline, the domain-adapted one or the pre-trained one."""
    if source == "conditional":
        return ctx.upstream("conditional")
    return ctx.upstream("finetune") / ADAPT if ctx.cfg.finetune.domain_adapt else ctx.upstream("pretrain")


def synthesize_source(ctx: StageContext, source: str, classes: list[str], todo_plan: list[tuple[int, int]]) -> Path:
    """Make the tiles of one source (guided / unguided / conditional) into ``folder/<source>``."""
    cfg = ctx.cfg
    state = process_state(cfg.device)
    device = state.device
    out = ctx.folder / source
    finetune = ctx.upstream("finetune")
    folder = unet_folder(ctx, source)
    unet, noise_scheduler = load_unet(folder, device)
    vae = load_vae(ctx.upstream("autoencoder"), device)
    classifier = load_latent_classifier(finetune, device)
    scales = class_scales(cfg, classes) if source == "guided" else torch.zeros(len(classes))
    alphas = noise_scheduler.alphas_cumprod
    pred = noise_scheduler.config.prediction_type
    shas = {"unet_sha256": io.weights_hash(folder / UNET), "classifier_sha256": io.weights_hash(finetune / CLASSIFIER)}
    cls_of = dict(todo_plan)
    folders = label_folders(classes)
    done = _done_indices(out)
    assigned = [k for k, _ in todo_plan[state.process_index::state.num_processes]]
    batches = [assigned[i:i + cfg.sampling.batch_size] for i in range(0, len(assigned), cfg.sampling.batch_size)]
    # Whole batches only: a tile's bytes depend (by a grey level) on the batch it was sampled in.
    mine = [k for b in batches if not all(k in done for k in b) for k in b]

    def make_eps(batch: np.ndarray):
        y = torch.as_tensor([cls_of[int(k)] for k in batch], device=device)
        base = unet_eps_fn(unet, pred, alphas, class_labels=y if source == "conditional" else None)
        if source != "guided":
            return base
        return guided_eps(base, classifier, y, scales.to(device)[y], alphas)

    part = out / f"manifest.part-{state.process_index}.csv"
    _restart_part(part, redo=set(mine))
    s = cfg.sampling
    with open(part, "a", newline="", encoding="utf-8") as f, progress_bar(
            f"synthesize {source}", total=len(mine), enabled=state.is_main_process, unit="tiles") as advance:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        for batch, tiles, z_0 in sample_batches(make_eps, vae, noise_scheduler, latent_shape(unet), mine, cfg.seed,
                                                **s.model_dump(), device=device):
            y = torch.as_tensor([cls_of[int(k)] for k in batch], device=device)
            with torch.no_grad():
                probs = classifier(z_0.float(), torch.zeros(len(batch), dtype=torch.long, device=device)).softmax(-1)
            for k, tile, c, p in zip(batch, tiles, y.tolist(), probs[torch.arange(len(y)), y].tolist(), strict=True):
                rel = f"tiles/{folders[classes[c]]}/{int(k):06d}.png"  # the label itself is in the row
                save_png(out / rel, tile)
                writer.writerow({"path": rel, "label": classes[c], "index": int(k), "source": source,
                                 "guidance_scale": float(scales[c]), "sampler": s.sampler, "num_steps": s.num_steps,
                                 "eta": s.eta, "target_prob": round(p, 5), **shas})
            f.flush()
            advance(len(batch))
    state.wait_for_everyone()
    if state.is_main_process:
        _merge(out)
    state.wait_for_everyone()
    return out


def _merge(out: Path) -> None:
    rows = sorted(_done_indices(out).values(), key=lambda r: int(r["index"]))
    with io.atomic_path(out / "manifest.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def class_grid(folder: Path, real: dict[str, np.ndarray], classes: list[str], ncol: int = 8) -> Path:
    """Real tiles beside synthetic tiles, one pair of rows per class."""
    rows = read_manifest_rows(folder / "manifest.csv")
    parts = []
    for c in classes:
        paths = [folder / r["path"] for r in rows if r["label"] == c][:ncol]
        if not paths:
            continue
        parts.append((f"real {c}", real[c][:ncol]))
        parts.append((f"synthetic {c}", np.stack([read_rgb(p) for p in paths])))
    return save_image(labeled_rows(parts, ncol, scale=2), folder / "grid.png")


def run(ctx: StageContext) -> dict:
    """Synthesize every configured source's tiles; write manifests and real-vs-synthetic grids."""
    cfg = ctx.cfg
    data = ctx.upstream("data")
    classes = classes_of(data)
    labeled = split_records(data, f"labeled/{ctx.budget_name}")
    counts = {c: sum(r.label == c for r in labeled) for c in classes}
    todo = plan(cfg, classes, counts)
    real = real_examples(data, f"labeled/{ctx.budget_name}", classes, 8, cfg.seed)
    summary = {"per_class": {c: sum(1 for _, k in todo if k == i) for i, c in enumerate(classes)}}
    for source in cfg.synthesize.sources:
        out = synthesize_source(ctx, source, classes, todo)
        rows = read_manifest_rows(out / "manifest.csv")
        probs = [float(r["target_prob"]) for r in rows]
        summary[source] = {"n": len(rows), "mean_target_prob": float(np.mean(probs)) if probs else None}
        class_grid(out, real, classes)
        console.print(f"{source}: {len(rows)} tiles in {out} (latent classifier's mean p(target) "
                      f"{summary[source]['mean_target_prob']:.3f})")
    return summary


def _upstream(cfg: ExperimentConfig) -> tuple[str, ...]:
    base = ("data", "labels", "autoencoder", "pretrain", "finetune")
    return base + (("conditional",) if "conditional" in cfg.synthesize.sources else ())


STAGE = register(Stage("synthesize", "synthesize", ("synthesize", "sampling", "seed"), _upstream, run,
                       per_budget=True, description="class-guided synthetic tiles", distributed=True))
