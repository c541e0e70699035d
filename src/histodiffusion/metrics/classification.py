"""Classification metrics from predicted probabilities (numpy; no fitting, no state)."""

from __future__ import annotations

import numpy as np


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {probs.shape} and {labels.shape}")
    return probs, labels


def per_class_recall(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Recall of each class (K,); NaN for a class absent from ``labels``."""
    probs, labels = _check(probs, labels)
    pred = probs.argmax(1)
    return np.array([np.mean(pred[labels == k] == k) if np.any(labels == k) else np.nan
                     for k in range(probs.shape[1])])


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``labels`` or predictions."""
    probs, labels = _check(probs, labels)
    pred = probs.argmax(1)
    scores = []
    for k in range(probs.shape[1]):
        tp = np.sum((pred == k) & (labels == k))
        fp = np.sum((pred == k) & (labels != k))
        fn = np.sum((pred != k) & (labels == k))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def binary_auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction) of ``scores`` for boolean ``positives``."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence-accuracy gap averaged over equal-width confidence bins."""
    probs, labels = _check(probs, labels)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(np.mean(pred[inside] == labels[inside]) - conf[inside].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced_accuracy, macro_f1, auroc (binary tasks), ece, per-class recall."""
    probs, labels = _check(probs, labels)
    recall = per_class_recall(probs, labels)
    out = {
        "accuracy": float(np.mean(probs.argmax(1) == labels)),
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": macro_f1(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall, strict=True)},
        "n": int(len(labels)),
    }
    if probs.shape[1] == 2:
        out["auroc"] = binary_auroc(probs[:, 1], labels == 1)
    return out
