"""Self-supervised training of the feature encoder (training/simclr.py): deterministic per seed,
logged, and saved and loaded (models/feature_encoder.py) to the same features."""

from __future__ import annotations

import numpy as np

from histodiffusion import io
from histodiffusion.models.feature_encoder import extract_features, load_encoder, save_encoder
from histodiffusion.training.simclr import train_feature_encoder


def test_feature_encoder_train_save_load(tmp_path):
    tiles = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    kw = dict(steps=3, batch_size=8, lr=1e-3, seed=0, backbone="resnet10t", progress=False)
    enc = train_feature_encoder(tiles, folder=tmp_path / "train", log_every=1, **kw)
    feats = extract_features(enc, tiles, batch_size=8)
    assert feats.shape == (16, enc.dim) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    records = io.read_jsonl(tmp_path / "train" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    again = extract_features(train_feature_encoder(tiles, **kw), tiles, batch_size=8)
    np.testing.assert_allclose(again, feats, atol=1e-6)
    save_encoder(enc, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert (loaded.config.architecture, loaded.dim, loaded.resolution) == ("resnet10t", enc.dim, 32)
    np.testing.assert_array_equal(extract_features(loaded, tiles, batch_size=8), feats)
