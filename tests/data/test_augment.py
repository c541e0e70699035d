"""Augmentations (data/augment.py): the dihedral group."""

from __future__ import annotations

import torch

from histodiffusion.data.augment import dihedral, random_dihedral


def test_dihedral_group() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8
    y = random_dihedral(x.repeat(5, 1, 1, 1), torch.Generator().manual_seed(0))
    assert all(tuple(y[i].flatten().tolist()) in outs for i in range(5))
