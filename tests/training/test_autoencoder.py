"""Autoencoder training (training/autoencoder.py): the pool rows the latent scale is measured on."""

from __future__ import annotations

import numpy as np

from histodiffusion.data.prepared import split_records
from histodiffusion.rundir import RunDir


def test_latent_scale_is_measured_on_every_source(smoke_run: RunDir, smoke_cfg, smoke_pool) -> None:
    """The pool's rows come grouped by source; the tiles that set the normalisation must not be its first rows."""
    pool = smoke_pool
    sources = np.array([r.source for r in split_records(smoke_run.root / "data", "pool")])
    n = len(pool.train) // 2
    rows = pool.scale_rows(smoke_cfg.seed, size=n)
    assert len(rows) == n and len(set(rows.tolist())) == n and np.all(np.diff(rows) > 0)
    assert set(rows.tolist()) <= set(pool.train.tolist())
    assert set(sources[rows]) == set(sources[pool.train]) != set(sources[pool.train[:n]])
    assert np.array_equal(rows, pool.scale_rows(smoke_cfg.seed, size=n))
    assert np.array_equal(pool.scale_rows(smoke_cfg.seed, size=10 * len(pool.train)), pool.train)
