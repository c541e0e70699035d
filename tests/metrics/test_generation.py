"""Generation metrics (metrics/generation.py) on toy features: FD, KID, precision/recall, nearest
neighbours, near-copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodiffusion.metrics.generation import (
    frechet_distance,
    kernel_inception_distance,
    memorization,
    nearest_neighbours,
    precision_recall,
    split_halves,
)


def _feats(n: int = 300, d: int = 8, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + shift


def test_frechet_identical_and_shift():
    a = _feats()
    assert abs(frechet_distance(a, a)) < 1e-6
    b = _feats(seed=1)
    fds = [frechet_distance(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(fds, fds[1:], strict=False))


def test_frechet_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    a, b = _feats(seed=2), _feats(seed=3, shift=0.3)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ref = _compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)).item()
    assert frechet_distance(ta, tb) == pytest.approx(ref, rel=1e-6)


def test_kid_identical_and_full_set():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(200, 16)) / 4, rng.normal(size=(200, 16)) / 4
    mean, std = kernel_inception_distance(a, a, subsets=5, subset_size=100)
    assert abs(mean) < 0.01 and std >= 0
    kids = [kernel_inception_distance(a, b + s, subsets=5, subset_size=100)[0] for s in (0.1, 0.3)]
    assert abs(mean) < kids[0] < kids[1]
    kid, kid_std = kernel_inception_distance(a, b + 0.1, subsets=1, subset_size=10_000)
    x, y, d, m = a, b + 0.1, a.shape[1], len(a)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    by_hand = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    assert kid == pytest.approx(by_hand, rel=1e-9) and kid_std == 0
    assert kid == pytest.approx(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)).item(), rel=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    centres = np.array([[-10.0, 0.0], [10.0, 0.0]])
    two = np.concatenate([centres[0] + rng.normal(size=(200, 2)), centres[1] + rng.normal(size=(200, 2))])
    half = centres[0] + rng.normal(size=(400, 2))
    precision, recall = precision_recall(two, half, k=3, block=64)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5


def test_nearest_neighbours_blocked():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(50, 6)), rng.normal(size=(70, 6))
    idx, dist = nearest_neighbours(q, r, block=7)
    full = np.linalg.norm(q[:, None] - r[None], axis=2)
    np.testing.assert_array_equal(idx, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-12)


def test_memorization_flags_copies():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(200, 16))
    reference = rng.normal(size=(100, 16))
    copies = [5, 17, 42]
    fake = np.concatenate([rng.normal(size=(10, 16)), train[copies], rng.normal(size=(10, 16))])
    pool = rng.normal(size=(30, 16))
    mem = memorization(fake, train, pool=pool, reference=reference)
    assert mem.n_flagged == 3
    np.testing.assert_array_equal(np.flatnonzero(mem.flagged), [10, 11, 12])
    assert mem.threshold > 0
    assert mem.nn_dist_pool is not None and mem.nn_dist_pool.shape == (23,)
    assert [(f, t) for f, t, _ in mem.closest(3)] == list(zip([10, 11, 12], copies, strict=True))
    assert all(d == 0.0 for _, _, d in mem.closest(3))
    assert memorization(fake, train).n_flagged == 3  # leave-one-out fallback threshold


def test_split_halves_and_validation():
    a, b = split_halves(11, seed=0)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    np.testing.assert_array_equal(split_halves(11, seed=0)[0], a)
    x = _feats(n=10)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(x[0], x)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="dimensions"):
        kernel_inception_distance(x, x[:, :3])
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError):
        split_halves(1, seed=0)
