"""Latent normalisation and the latent cache (data/latents.py): normalize and denormalize are
inverses, with and without per-channel statistics; a full disk while encoding is a user error."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from histodiffusion.data.latents import denormalize_latents, encode_to_shards, normalize_latents
from histodiffusion.errors import UserError


def test_normalization_round_trip() -> None:
    z = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + 3
    for cfg in (SimpleNamespace(scaling_factor=0.4, latents_mean=[3.0, 3.0, 3.0], latents_std=[1.5, 0.4, 0.8]),
                SimpleNamespace(scaling_factor=0.4, latents_mean=None, latents_std=None)):
        assert torch.allclose(denormalize_latents(normalize_latents(z, cfg), cfg), z, atol=1e-5)


class _StubVAE(torch.nn.Module):
    """Encodes a tile as its every fourth pixel: enough to write a latent cache."""

    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        z = x[:, :, ::4, ::4]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z, std=z.abs() + 0.1))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" })')])
def test_a_full_disk_while_encoding_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    """The latent cache's writer: a message saying what to do, no half-written shard, and a rerun resumes."""
    from histodiffusion.data import latents

    cache = SimpleNamespace(take=lambda rows: np.full((len(rows), 8, 8, 3), 100, np.uint8))
    rows = np.arange(6)

    def full(*_a, **_k):
        raise error

    monkeypatch.setattr(latents, "save_file", full)
    with pytest.raises(UserError, match=r"no space left on the device while writing .*shard-00000.safetensors.*"
                                        "nothing finished is lost"):
        encode_to_shards(_StubVAE(), cache, rows, tmp_path, shard_size=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    index = encode_to_shards(_StubVAE(), cache, rows, tmp_path, shard_size=4, progress=False)
    assert index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"] and index["n"] == 6
