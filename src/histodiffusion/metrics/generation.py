"""Generation metrics on feature arrays: FD, KID, precision/recall, nearest neighbours, memorization.

All functions take (N, D) features (numpy arrays or torch tensors) and compute in float64. They are
feature-space agnostic: the same code scores Inception-v3 pool features (FID/KID proper) and the
project's own histology encoder (``histodiffusion.models.features``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _features(x: ArrayLike, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite (N, D) float64 array with N >= ``min_rows``; ValueError otherwise."""
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names} have different feature dimensions: {a.shape[1]} vs {b.shape[1]}")


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigh, negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with unbiased covariances; the trace of
    the square root is computed as ``sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))`` (symmetric, float64).

    Args:
        feats_a: (N_a, D) features, N_a >= 2.
        feats_b: (N_b, D) features, N_b >= 2.

    Returns:
        The distance (>= 0 up to rounding).
    """
    a = _features(feats_a, "feats_a", 2)
    b = _features(feats_b, "feats_b", 2)
    _same_dim(a, b, "feats_a and feats_b")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(s_a)
    m = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def _poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of equal-size sets with the cubic kernel ``(x.y / D + 1)^3``."""
    d, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


def kernel_inception_distance(feats_a: ArrayLike, feats_b: ArrayLike, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel (Inception) distance (Binkowski et al. 2018): unbiased MMD^2, cubic kernel, over subsets.

    Same formula as ``torchmetrics.image.kid`` (``poly_mmd`` with gamma = 1/D, coef 1, degree 3;
    population std over subsets). Each subset draws ``subset_size`` rows of each set without
    replacement; ``subset_size`` is clipped to ``min(N_a, N_b)``.

    Args:
        feats_a: (N_a, D) features, N_a >= 2.
        feats_b: (N_b, D) features, N_b >= 2.
        subsets: number of random subsets (>= 1).
        subset_size: rows per set in each subset.
        seed: seed of the subset sampling.

    Returns:
        (mean, std) of the per-subset MMD^2 estimates.
    """
    a = _features(feats_a, "feats_a", 2)
    b = _features(feats_b, "feats_b", 2)
    _same_dim(a, b, "feats_a and feats_b")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    scores = [_poly_mmd(a[rng.permutation(len(a))[:m]], b[rng.permutation(len(b))[:m]]) for _ in range(subsets)]
    return float(np.mean(scores)), float(np.std(scores))


def _blocked(fn: Callable[[torch.Tensor, int], torch.Tensor], queries: torch.Tensor, block: int) -> list:
    """``fn`` applied to consecutive row blocks of ``queries`` (bounds the cdist memory)."""
    return [fn(queries[i:i + block], i) for i in range(0, len(queries), block)]


def _knn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row (itself excluded)."""

    def radii(q: torch.Tensor, start: int) -> torch.Tensor:
        d = torch.cdist(q, x)
        rows = torch.arange(len(q))
        d[rows, rows + start] = float("inf")
        return d.topk(k, dim=1, largest=False).values[:, -1]

    return torch.cat(_blocked(radii, x, block))


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of ``queries`` inside at least one ball (``centres``, ``radii``), boundary included."""
    inside = _blocked(lambda q, _: (torch.cdist(q, centres) <= radii[None]).any(1), queries, block)
    return float(torch.cat(inside).double().mean())


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls as manifold estimates.

    Each real sample gets a ball of radius its distance to its k-th nearest other real sample;
    precision is the fraction of fakes inside the union of real balls. Recall is the same with
    the roles swapped (fake balls from fakes among fakes, fraction of reals inside them).

    Args:
        real: (N_r, D) features, N_r > k.
        fake: (N_f, D) features, N_f > k.
        k: neighbour rank of the ball radii.
        block: rows per cdist block (memory ~ block * N * 8 bytes).

    Returns:
        (precision, recall), both in [0, 1].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = torch.from_numpy(_features(real, "real", k + 1))
    f = torch.from_numpy(_features(fake, "fake", k + 1))
    _same_dim(r.numpy(), f.numpy(), "real and fake")
    precision = _coverage(f, r, _knn_radii(r, k, block), block)
    recall = _coverage(r, f, _knn_radii(f, k, block), block)
    return precision, recall


def nearest_neighbours(queries: ArrayLike, refs: ArrayLike, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index and Euclidean distance of each query's nearest reference row (blocked cdist).

    The distance is recomputed directly for the chosen pair, so exact copies give exactly 0.

    Args:
        queries: (N_q, D) features.
        refs: (N_r, D) features, N_r >= 1.
        block: query rows per cdist block.

    Returns:
        (index (N_q,) int64, distance (N_q,) float64).
    """
    q = torch.from_numpy(_features(queries, "queries", 0))
    r = torch.from_numpy(_features(refs, "refs", 1))
    _same_dim(q.numpy(), r.numpy(), "queries and refs")
    if len(q) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx = torch.cat(_blocked(lambda x, _: torch.cdist(x, r).argmin(1), q, block))
    dist = (q - r[idx]).norm(dim=1)
    return idx.numpy().astype(np.int64), dist.numpy()


@dataclass
class Memorization:
    """Per-synthetic-tile nearest training (and pool) neighbours and the near-copy flags."""

    nn_index_train: np.ndarray
    nn_dist_train: np.ndarray
    nn_index_pool: np.ndarray | None
    nn_dist_pool: np.ndarray | None
    flagged: np.ndarray
    threshold: float

    @property
    def n_flagged(self) -> int:
        """Number of synthetic tiles flagged as near-copies of a training tile."""
        return int(self.flagged.sum())

    def closest(self, n: int) -> list[tuple[int, int, float]]:
        """The ``n`` (fake index, train index, distance) pairs with the smallest distances, closest first."""
        order = np.argsort(self.nn_dist_train, kind="stable")[:n]
        return [(int(i), int(self.nn_index_train[i]), float(self.nn_dist_train[i])) for i in order]


def memorization(fake: ArrayLike, train: ArrayLike, pool: ArrayLike | None = None,
                 reference: ArrayLike | None = None, threshold: float | None = None,
                 quantile: float = 0.01, block: int = 1024) -> Memorization:
    """Nearest training (and pool) neighbour of every synthetic tile, and near-copy flags.

    Near-copy rule: a synthetic tile is flagged when the distance to its nearest training tile
    is strictly below ``threshold``. When ``threshold`` is None it is derived from the data as
    the ``quantile`` (default 0.01) of the nearest-training-tile distances of ``reference``, real
    held-out tiles the generator never saw: a synthetic tile is flagged when it is closer to a
    training tile than 99% of genuinely new real tiles are. Without ``reference`` the leave-one-out
    nearest-neighbour distances within ``train`` stand in for it (less reliable when the training
    set holds near-duplicate tiles, e.g. overlapping crops). The pool distances are reported but
    do not set the flags.

    Args:
        fake: (N_f, D) features of synthetic tiles.
        train: (N_t, D) features of the labeled training tiles (N_t >= 2 without ``reference``).
        pool: optional (N_p, D) features of the unlabeled pool.
        reference: optional (N_r, D) features of real held-out tiles.
        threshold: explicit distance threshold; overrides ``reference``/``quantile``.
        quantile: quantile in (0, 1) of the reference distances used as the threshold.
        block: query rows per cdist block.

    Returns:
        A ``Memorization`` with per-fake arrays (N_f,) and the threshold used.
    """
    f = _features(fake, "fake")
    t = _features(train, "train")
    _same_dim(f, t, "fake and train")
    nn_index_train, nn_dist_train = nearest_neighbours(f, t, block)
    nn_index_pool = nn_dist_pool = None
    if pool is not None:
        p = _features(pool, "pool")
        _same_dim(f, p, "fake and pool")
        nn_index_pool, nn_dist_pool = nearest_neighbours(f, p, block)
    if threshold is None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if reference is not None:
            ref = _features(reference, "reference")
            _same_dim(ref, t, "reference and train")
            ref_dist = nearest_neighbours(ref, t, block)[1]
        else:
            t_torch = torch.from_numpy(_features(t, "train (no reference given)", 2))
            ref_dist = _knn_radii(t_torch, 1, block).numpy()
        threshold = float(np.quantile(ref_dist, quantile))
    return Memorization(nn_index_train, nn_dist_train, nn_index_pool, nn_dist_pool,
                        nn_dist_train < threshold, float(threshold))


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``range(n)`` (sorted, n // 2 each) for the real-vs-real floor.

    Args:
        n: number of items, >= 2 (an odd last item is left out).
        seed: seed of the permutation.

    Returns:
        (first half, second half) index arrays of shape (n // 2,).
    """
    if n < 2:
        raise ValueError(f"split_halves needs n >= 2, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    h = n // 2
    return np.sort(perm[:h]), np.sort(perm[h:2 * h])
