"""Stage ``features``: the self-supervised (SimCLR) histology encoder trained on the pool tiles
(labels never used): the feature space of generation quality."""

from __future__ import annotations

import numpy as np

from histodiffusion.data.prepared import pool_tiles
from histodiffusion.devices import inference_device
from histodiffusion.models.feature_encoder import ENCODER, save_encoder
from histodiffusion.stages.registry import Stage, StageContext, register
from histodiffusion.training.simclr import train_feature_encoder


def run(ctx: StageContext) -> dict:
    """Train the encoder on every pool tile and save it (diffusers-style folder)."""
    g = ctx.cfg.generation
    cache = pool_tiles(ctx.upstream("data"))
    pool = cache.take(np.arange(len(cache)))
    encoder = train_feature_encoder(pool, g.encoder_steps, g.encoder_batch_size, g.encoder_lr, ctx.cfg.seed,
                                    g.encoder_backbone, inference_device(ctx.cfg.device), folder=ctx.folder)
    save_encoder(encoder, ctx.folder / ENCODER)
    return {"backbone": g.encoder_backbone, "steps": g.encoder_steps, "n_pool": len(pool)}


STAGE = register(Stage("features", "evaluate-generation",
                       ("generation.encoder_backbone", "generation.encoder_steps", "generation.encoder_batch_size",
                        "generation.encoder_lr", "seed"), ("data",), run,
                       description="histology feature encoder (SimCLR on the pool)"))
