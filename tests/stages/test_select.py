"""Stage ``select`` (stages/select.py): the acceptance rule (confidence, target class, centroid, cap)."""

from __future__ import annotations

import numpy as np

from histodiffusion.stages.select import decide
from tests.helpers import make_config


def _select(**select):
    return make_config(select=select)


def test_selection_rule_confidence_class_and_caps() -> None:
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.2, 0.8], [0.97, 0.03], [0.99, 0.01], [0.05, 0.95]])
    targets = np.array([0, 0, 0, 0, 0, 1])
    accepted, reasons = decide(_select(threshold=0.9, ratio=None), probs, targets, None, np.array([10, 10]))
    assert reasons == ["accepted", "low confidence", "wrong class", "accepted", "accepted", "accepted"]
    # ratio 0.2 of 10 real tiles keeps the 2 most confident of class 0.
    accepted, reasons = decide(_select(threshold=0.9, ratio=0.2), probs, targets, None, np.array([10, 10]))
    assert accepted.tolist() == [False, False, False, True, True, True] and reasons[0] == "cap"
    centroid = np.array([True, True, True, False, True, True])
    _, reasons = decide(_select(threshold=0.9, ratio=None, centroid_rule=True), probs, targets, centroid,
                        np.array([10, 10]))
    assert reasons[3] == "centroid"
