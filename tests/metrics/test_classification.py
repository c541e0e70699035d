"""Classification metrics (metrics/classification.py): agreement with torchmetrics and golden values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodiffusion.metrics.classification import (
    binary_auroc,
    classification_metrics,
    expected_calibration_error,
    macro_f1,
)
from histodiffusion.models.tile_classifier import softmax


def test_metrics_match_torchmetrics() -> None:
    from torchmetrics.functional.classification import (
        binary_auroc as tm_auroc,
    )
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_f1_score,
    )

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[labels]
    probs = softmax(logits)
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    p, y = torch.as_tensor(probs), torch.as_tensor(labels)
    assert m["balanced_accuracy"] == pytest.approx(float(multiclass_accuracy(p, y, 3, average="macro")), abs=1e-6)
    assert m["accuracy"] == pytest.approx(float(multiclass_accuracy(p, y, 3, average="micro")), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(float(multiclass_f1_score(p, y, 3, average="macro")), abs=1e-6)
    assert m["ece"] == pytest.approx(float(multiclass_calibration_error(p.float(), y, 3, n_bins=15)), abs=1e-4)
    scores = rng.normal(size=200).round(1)  # ties on purpose
    pos = rng.random(200) < 0.4
    assert binary_auroc(scores, pos) == pytest.approx(float(tm_auroc(torch.as_tensor(scores), torch.as_tensor(pos))),
                                                      abs=1e-6)


def test_metric_golden_values() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(probs, labels, ["n", "t"])
    assert m["accuracy"] == 0.75 and m["recall"] == {"n": 1.0, "t": 0.5}
    assert m["balanced_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["auroc"] == 1.0  # every positive scores above every negative
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert macro_f1(np.eye(3), np.arange(3)) == 1.0
