"""Stage ``features``: the self-supervised (SimCLR) histology encoder trained on the pool tiles
(labels never used): the feature space of generation quality, and the pre-trained backbone of the
``ssl`` arms of stage ``evaluate``."""

from __future__ import annotations

import numpy as np

from histodiffusion.data.prepared import pool_tiles
from histodiffusion.devices import inference_device
from histodiffusion.models.feature_encoder import ENCODER, save_encoder
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.training.simclr import train_feature_encoder


def run(ctx: StageContext) -> dict:
    """Train the encoder on every pool tile and save it (diffusers-style folder)."""
    f = ctx.cfg.features
    cache = pool_tiles(ctx.upstream("data"))
    pool = cache.take(np.arange(len(cache)))
    encoder = train_feature_encoder(pool, f.steps, f.batch_size, f.lr, ctx.cfg.seed, f.backbone,
                                    inference_device(ctx.cfg.device), folder=ctx.folder, precision=f.precision)
    save_encoder(encoder, ctx.folder / ENCODER)
    return {"backbone": f.backbone, "steps": f.steps, "n_pool": len(pool)}


STAGE = register(Stage("features", "features", ("features", "seed"), ("data",), run,
                       description="self-supervised encoder (SimCLR) on the pool"))
