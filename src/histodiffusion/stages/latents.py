"""Stage ``latents``: encode every pool tile once into posterior moments (safetensors shards)."""

from __future__ import annotations

import numpy as np

from histodiffusion.data.latents import encode_to_shards
from histodiffusion.data.prepared import pool_tiles
from histodiffusion.devices import inference_device
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.pipeline import Stage, StageContext, register


def run(ctx: StageContext) -> dict:
    """Encode the pool with the trained autoencoder."""
    cache = pool_tiles(ctx.upstream("data"))
    device = inference_device(ctx.cfg.device)
    index = encode_to_shards(load_vae(ctx.upstream("autoencoder"), device), cache, np.arange(len(cache)),
                             ctx.folder / "pool", device=device)
    return {"n": index["n"], "scaling_factor": index["scaling_factor"]}


STAGE = register(Stage("latents", "pretrain", ("data.resolution", "autoencoder", "seed"), ("autoencoder",), run,
                       description="encode the pool once"))
