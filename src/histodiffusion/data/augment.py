"""Dihedral augmentation: the 8 flips and 90-degree rotations (tissue has no orientation)."""

from __future__ import annotations

import torch


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply dihedral transform ``k`` in 0..7 to (..., H, W): k % 4 quarter turns, then a flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent random dihedral transform to each item of a (N, C, H, W) batch."""
    ks = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for k in range(8):
        idx = (ks == k).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = dihedral(x[idx], k)
    return out
