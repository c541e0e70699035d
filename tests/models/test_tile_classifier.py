"""Tile classifiers (models/tile_classifier.py): temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from histodiffusion.models.tile_classifier import fit_temperature, softmax


def test_temperature_scaling_recovers_the_temperature() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 3)) * 3
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits, 2.0)])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)
