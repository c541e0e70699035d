"""Training a tile classifier (selection, every evaluation arm, the class-fidelity oracle) with early
stopping on the valid split, in memory (a few minutes each; the stage records each finished run)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histodiffusion.data.augment import classifier_augment
from histodiffusion.devices import autocast_dtype
from histodiffusion.metrics.classification import per_class_recall
from histodiffusion.models.tile_classifier import build_tile_classifier, predict_logits, softmax
from histodiffusion.seeding import step_generator, step_rng
from histodiffusion.training.harness import (
    LoopSpec,
    accumulate_step,
    lr_lambda,
    make_optimizer,
    run_loop,
)


@dataclass
class TrainedClassifier:
    """A trained classifier, its kept step and validation history, and an optional temperature."""

    model: nn.Module
    best_step: int
    best_valid: dict
    history: list[dict] = field(default_factory=list)
    temperature: float = 1.0


def _sample_weights(labels: np.ndarray, num_classes: int, class_balanced: bool) -> np.ndarray:
    if not class_balanced:
        return np.full(len(labels), 1.0 / len(labels))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = 1.0 / counts[labels]
    return w / w.sum()


def valid_scores(model: nn.Module, tiles: np.ndarray, labels: np.ndarray, device, precision: str) -> dict:
    """Loss, balanced accuracy and accuracy of ``model`` on the valid tiles."""
    logits = predict_logits(model, tiles, device, precision=precision)
    loss = float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)))
    recall = per_class_recall(softmax(logits), labels)
    return {"valid_loss": loss, "valid_balanced_accuracy": float(np.nanmean(recall)),
            "valid_accuracy": float(np.mean(logits.argmax(1) == labels))}


def steps_for(n_tiles: int, steps: int, batch_size: int, epochs: float | None = None,
              max_steps: int | None = None) -> int:
    """Optimiser steps for a training set of ``n_tiles``: ``steps``, or with ``epochs``
    ceil(epochs x n_tiles / batch_size) clipped to [steps, max_steps]."""
    if epochs is None:
        return steps
    n = max(steps, math.ceil(epochs * n_tiles / batch_size))
    return min(n, max_steps) if max_steps is not None else n


def load_backbone(model: nn.Module, backbone_state: dict[str, torch.Tensor]) -> None:
    """Load pre-trained backbone weights (a timm model built with ``num_classes=0``) into a timm
    classifier of the same architecture; only its classification head keeps its initialisation."""
    head = model.pretrained_cfg.get("classifier", "fc")
    missing, unexpected = model.load_state_dict(backbone_state, strict=False)
    wrong = [k for k in missing if not k.startswith(f"{head}.")]
    if unexpected or wrong:
        raise ValueError(f"the pre-trained backbone does not fit the classifier: missing {wrong[:5]}, "
                         f"unexpected {unexpected[:5]}")


def tile_classifier_step_loss(model: nn.Module, tiles: torch.Tensor, labels: torch.Tensor, p: np.ndarray,
                              batch_size: int, color_jitter: float, seed: int, step: int,
                              device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The loss of step ``step``: a batch drawn by the weights ``p`` from (N, H, W, 3) uint8
    ``tiles``, augmented (dihedral, colour jitter), channels_last, under ``dtype`` autocast.
    Seeded by (seed, step)."""
    rows = torch.as_tensor(step_rng(seed, step, stream=11).choice(len(p), size=batch_size, p=p))
    x = classifier_augment(tiles[rows], color_jitter, step_generator(seed, step, stream=11))
    x = x.to(device, memory_format=torch.channels_last)
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        return F.cross_entropy(model(x).float(), labels[rows].to(device))


def train_tile_classifier(train_tiles: np.ndarray, train_labels: np.ndarray, valid_tiles: np.ndarray,
                          valid_labels: np.ndarray, num_classes: int, seed: int, *, backbone: str, steps: int,
                          batch_size: int, lr: float, weight_decay: float, warmup_steps: int, eval_every: int,
                          color_jitter: float, class_balanced: bool, precision: str = "fp32",
                          epochs: float | None = None, max_steps: int | None = None,
                          init_backbone: dict[str, torch.Tensor] | None = None,
                          device: torch.device | str = "cpu", description: str = "classifier",
                          progress: bool = True) -> TrainedClassifier:
    """Train (from scratch, or from ``init_backbone``); every ``eval_every`` steps score the valid
    split and keep the best weights.

    The keyword arguments are the training fields of an ``ImageClassifierCfg``; the number of
    steps is :func:`steps_for` the training set.

    Args:
        train_tiles: (N, H, W, 3) uint8; train_labels: (N,) class indices.
        valid_tiles, valid_labels: the model-selection split (never the test split).
        init_backbone: pre-trained backbone weights (the ``ssl`` arms); the head starts afresh.
    Returns:
        The model with the weights of the best valid balanced accuracy (ties: lower valid loss).
    """
    steps = steps_for(len(train_labels), steps, batch_size, epochs, max_steps)
    torch.manual_seed(seed)
    model = build_tile_classifier(backbone, num_classes)
    if init_backbone is not None:
        load_backbone(model, init_backbone)
    # channels_last: oneDNN's fastest layout for convolutions (bench/results/speed.md)
    model = model.to(device, memory_format=torch.channels_last)
    opt, sched = make_optimizer(model.parameters(), lr, weight_decay, lr_lambda("cosine", warmup_steps, steps, 0.0))
    p = _sample_weights(train_labels, num_classes, class_balanced)
    tiles_t, labels_t = torch.as_tensor(train_tiles), torch.as_tensor(train_labels, dtype=torch.long)
    dtype = autocast_dtype(precision)
    best: dict = {}
    kept: dict = {}
    history: list[dict] = []
    last_loss = [0.0]

    def micro_loss(step: int) -> tuple[torch.Tensor, dict]:
        loss = tile_classifier_step_loss(model, tiles_t, labels_t, p, batch_size, color_jitter, seed, step, device, dtype)
        return loss, {"loss": loss.item()}

    def step_fn(step: int) -> dict:
        model.train()
        metrics = accumulate_step(None, model, opt, sched, lambda _m: micro_loss(step))
        last_loss[0] = metrics["loss"]
        return metrics

    def on_eval(step: int) -> None:
        scores = {"step": step, "train_loss": last_loss[0],
                  **valid_scores(model, valid_tiles, valid_labels, device, precision)}
        history.append(scores)
        key = (scores["valid_balanced_accuracy"], -scores["valid_loss"])
        if not best or key > (best["valid_balanced_accuracy"], -best["valid_loss"]):
            best.update(scores)
            kept["state"] = copy.deepcopy(model.state_dict())

    run_loop(LoopSpec(steps, log_every=steps, sample_every=eval_every, images_per_step=batch_size,
                      description=description), step_fn,
             on_sample=on_eval, progress=progress)
    model.load_state_dict(kept["state"])
    return TrainedClassifier(model.eval(), best["step"], best, history)
