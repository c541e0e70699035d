"""Class fidelity of guided synthesis: does an oracle label guided tiles as their target class?

The oracle is the downstream classifier trained on the task's *full* labeled train split (not
the few-label subset), selected on valid. For each guidance scale, with and without domain
fine-tuning, N tiles per class are synthesized (same seeds for every setting) and the oracle's
agreement with the target class is reported, overall and per class. Unguided (scale 0) should
sit near the class prior. Also: guided-synthesis throughput, fp32 vs bf16.

    python bench/class_fidelity.py --config configs/pcam-fewlabel.yaml --run-dir runs/pcam-fewlabel --budget 1pct
Writes bench/results/<task>/class_fidelity_<budget>.{json,md} and per-class grids (under
bench/results/<task>/<variant>/ with ``--variant NAME``). The oracle is the same for every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from histodiffusion.cli import guarded
from histodiffusion.config import load_config
from histodiffusion.data.prepared import classes_of, split_tiles
from histodiffusion.devices import machine
from histodiffusion.diffusion.guidance import guided_eps
from histodiffusion.diffusion.sampling import latent_shape, sample_batches, unet_eps_fn
from histodiffusion.io import read_json, write_json, write_text
from histodiffusion.models.autoencoder import load_vae, reconstruct_tiles
from histodiffusion.models.latent_classifier import load_latent_classifier
from histodiffusion.models.tile_classifier import build_tile_classifier, predict_logits
from histodiffusion.models.unet import ADAPT, load_unet
from histodiffusion.training.tile_classifier import train_tile_classifier
from histodiffusion.viz import compact_png, labeled_rows, save_image

REPO = Path(__file__).resolve().parents[1]


def oracle(cfg, data: Path, work: Path, steps: int):
    """The oracle classifier (full train split), trained once and cached under ``work``."""
    classes = classes_of(data)
    weights, valid = work / "oracle.safetensors", work / "oracle.json"
    model = build_tile_classifier(cfg.evaluate.classifier.backbone, len(classes))
    if weights.is_file() and valid.is_file():
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), read_json(valid)
    tiles, labels = split_tiles(data, "train")
    valid_tiles, valid_labels = split_tiles(data, "valid", 2048, cfg.seed)
    oc = cfg.evaluate.classifier.model_copy(update={"steps": steps, "eval_every": max(steps // 10, 1)})
    clf = train_tile_classifier(tiles, labels, valid_tiles, valid_labels, len(classes), cfg.seed,
                                **oc.model_dump(exclude={"eval_max"}), description="oracle")
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.model.state_dict().items()}, str(weights))
    write_json(valid, clf.best_valid)
    return clf.model, clf.best_valid


def ceiling(model, vae, data: Path, classes: list[str], n: int, seed: int) -> dict:
    """The oracle on real valid tiles and on their autoencoder reconstructions (mean per-class recall).

    Every tile a latent diffusion model makes passes through the autoencoder's decoder, so the oracle's
    agreement on reconstructions of real tiles is what a model that reproduced the real tiles
    exactly would score. Guidance can exceed it: it pushes tiles towards whatever makes a
    classifier sure, which need not look like an average real tile.
    """
    tiles, labels = split_tiles(data, "valid", n, seed)
    out = {}
    for name, t in (("real", tiles), ("reconstructed", reconstruct_tiles(vae.eval(), tiles))):
        pred = predict_logits(model, t).argmax(1)
        per_class = {c: float(np.mean(pred[labels == k] == k)) for k, c in enumerate(classes)}
        out[name] = {"agreement": float(np.mean(list(per_class.values()))), "per_class": per_class,
                     "tiles": int(len(t))}
    return out


def markdown(r: dict, classes: list[str]) -> str:
    lines = [f"# Class fidelity of guided synthesis: {r['task']}, {r['label_budget']}", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"Oracle: {r['oracle_backbone']} on the full train split, valid balanced accuracy "
             f"{r['oracle_valid']['valid_balanced_accuracy']:.3f}. Sampler {r['sampler']}-{r['num_steps']}, "
             f"{r['per_class']} tiles per class per row; chosen scale {r['chosen_scale']}.", "",
             "| UNet | guidance scale | oracle agrees with target | " + " | ".join(classes) + " | tiles/s |",
             "|---|---|---|" + "---|" * len(classes) + "---|"]
    for row in r["rows"]:
        lines.append(f"| {row['unet']} | {row['scale']:g} | {row['agreement']:.3f} | "
                     + " | ".join(f"{row['per_class'][c]:.2f}" for c in classes) + f" | {row['tiles_per_s']} |")
    rates = r["guided_tiles_per_s"]
    lines += ["", f"Guided synthesis throughput at the chosen scale: fp32 {rates['fp32']} tiles/s, bf16 {rates['bf16']} "
              "tiles/s."]
    if "ceiling" in r:
        c = r["ceiling"]
        lines += ["", f"## The oracle on real tiles ({c['real']['tiles']} valid tiles; mean per-class recall, "
                  "comparable with the agreement above)", "",
                  "| tiles | oracle agrees with label | " + " | ".join(classes) + " |",
                  "|---|---|" + "---|" * len(classes)]
        for name, text in (("real", "real valid tiles"),
                           ("reconstructed", "the same tiles through the autoencoder (a model that reproduced "
                            "real tiles exactly)")):
            lines.append(f"| {text} | {c[name]['agreement']:.3f} | "
                         + " | ".join(f"{c[name]['per_class'][k]:.2f}" for k in classes) + " |")
        if r.get("ceiling_command"):
            lines += ["", f"Command of this section: `{r['ceiling_command']}`"]
    return "\n".join(lines) + "\n"


def synth(cfg, unet, sched, vae, latent_clf, classes, per_class: int, scale: float, precision: str):
    """(tiles, targets, seconds) for ``per_class`` tiles of every class at guidance ``scale``."""
    targets = np.repeat(np.arange(len(classes)), per_class)
    y_all = torch.as_tensor(targets)
    pred = sched.config.prediction_type

    def make_eps(batch: np.ndarray):
        y = y_all[torch.as_tensor(batch)]
        base = unet_eps_fn(unet, pred, sched.alphas_cumprod)
        return guided_eps(base, latent_clf, y, scale, sched.alphas_cumprod)

    s = {**cfg.sampling.model_dump(), "precision": precision}
    t0 = time.perf_counter()
    tiles = np.concatenate([t for _, t, _ in sample_batches(make_eps, vae, sched, latent_shape(unet),
                                                            range(len(targets)), cfg.seed, **s)])
    return tiles, targets, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--budget", required=True, help="label budget folder name, e.g. 1pct")
    ap.add_argument("--scales", default="0,1,3,10")
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--oracle-steps", type=int, default=1500)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--ceiling-n", type=int, default=512, help="valid tiles for the oracle-on-real rows")
    ap.add_argument("--ceiling-only", action="store_true",
                    help="the oracle-on-real rows only, without synthesizing: added to an existing result, "
                         "else printed (needs only the run's data and autoencoder)")
    ap.add_argument("--variant", default=None,
                    help="file the results under bench/results/<task>/<variant>/ (as run_protocol.py --variant)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    run, data = args.run_dir, args.run_dir / "data"
    classes = classes_of(data)
    out = REPO / "bench" / "results" / cfg.experiment / (args.variant or "")
    model, oracle_valid = oracle(cfg, data, REPO / "bench" / "work" / cfg.experiment, args.oracle_steps)
    vae = load_vae(run / "autoencoder")
    limits = ceiling(model, vae, data, classes, args.ceiling_n, cfg.seed)
    print(json.dumps(limits), flush=True)
    if args.ceiling_only:
        path = out / f"class_fidelity_{args.budget}.json"
        if not path.is_file():
            print(f"no result at {path} to add these rows to: printed only (run without --ceiling-only "
                  "to synthesize and file a full result)")
            return
        result = json.loads(path.read_text())
        result.setdefault("oracle_backbone", cfg.evaluate.classifier.backbone)
        result.setdefault("per_class", args.per_class)
        result["ceiling"] = limits
        result["ceiling_command"] = "python bench/class_fidelity.py " + " ".join(sys.argv[1:])
        write_json(path, result)
        write_text(out / f"class_fidelity_{args.budget}.md", markdown(result, classes))
        return
    latent_clf = load_latent_classifier(run / "finetune" / args.budget)
    chosen = cfg.synthesize.guidance_scale
    scales = sorted({float(x) for x in args.scales.split(",")} | {chosen})
    unets = {"domain fine-tuned": run / "finetune" / args.budget / ADAPT, "pre-trained only": run / "pretrain"}
    rows, grids = [], {}
    for name, folder in unets.items():
        unet, sched = load_unet(folder)
        for scale in scales:
            tiles, targets, seconds = synth(cfg, unet, sched, vae, latent_clf, classes, args.per_class, scale, "fp32")
            pred = predict_logits(model, tiles).argmax(1)
            per_class = {c: float(np.mean(pred[targets == k] == k)) for k, c in enumerate(classes)}
            rows.append({"unet": name, "scale": scale, "agreement": float(np.mean(pred == targets)),
                         "per_class": per_class, "tiles": int(len(tiles)), "tiles_per_s": round(len(tiles) / seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
            if scale == chosen:
                grids[name] = (tiles, targets)
        if name == "domain fine-tuned":
            _, _, s16 = synth(cfg, unet, sched, vae, latent_clf, classes, args.per_class, chosen, "bf16")
            bf16_rate = round(len(classes) * args.per_class / s16, 2)
    real, real_labels = split_tiles(data, f"labeled/{args.budget}")
    for name, (tiles, targets) in grids.items():
        parts = []
        for k, c in enumerate(classes):
            parts += [(f"real {c}", real[real_labels == k][:8]), (f"synthetic {c}", tiles[targets == k][:8])]
        compact_png(save_image(labeled_rows(parts, 8, label_width=230, scale=2),
                               out / f"grid_{args.budget}_{name.split()[0].replace('-', '')}.png"))
    fp32_rate = next(r["tiles_per_s"] for r in rows if r["unet"] == "domain fine-tuned" and r["scale"] == chosen)
    result = {"task": cfg.experiment, "label_budget": args.budget, "oracle_valid": oracle_valid,
              "oracle_backbone": cfg.evaluate.classifier.backbone, "per_class": args.per_class,
              "chosen_scale": chosen, "sampler": cfg.sampling.sampler, "num_steps": cfg.sampling.num_steps,
              "rows": rows, "guided_tiles_per_s": {"fp32": fp32_rate, "bf16": bf16_rate}, "ceiling": limits,
              "command": "python bench/class_fidelity.py " + " ".join(sys.argv[1:]),
              "machine": machine()}
    write_json(out / f"class_fidelity_{args.budget}.json", result)
    write_text(out / f"class_fidelity_{args.budget}.md", markdown(result, classes))


if __name__ == "__main__":
    guarded(main)
