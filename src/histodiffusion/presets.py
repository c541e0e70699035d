"""Size presets in one table: ``tiny`` (tests), ``cpu`` (a 2-core machine), ``paper`` (the paper).

Each preset is a partial config laid *under* the experiment file, so an experiment only states
what differs from its preset and every value it does state wins.
"""

from __future__ import annotations


def _train(steps: int, batch_size: int, **kw) -> dict:
    return {"steps": steps, "batch_size": batch_size, **kw}


_TINY_CLASSIFIER = {"backbone": "resnet10t", "steps": 4, "batch_size": 16, "eval_every": 2, "eval_max": 32,
                    "warmup_steps": 1}

PRESETS: dict[str, dict] = {
    # Seconds on a CPU: every stage runs end to end on a handful of tiles (tests, smoke runs).
    "tiny": {
        "data": {"resolution": 32, "cache_shard_size": 64},
        "autoencoder": {
            "arch": {"downsample_factor": 4, "channels": [8, 8, 16], "latent_channels": 3, "norm_num_groups": 4},
            "train": _train(6, 8, log_every=2, checkpoint_every=4, warmup_steps=2),
        },
        "pretrain": {
            "unet": {"channels": [16, 32], "layers_per_block": 1, "attention_resolutions": [4],
                     "attention_head_dim": 8, "norm_num_groups": 8},
            "train": _train(6, 8, log_every=2, checkpoint_every=4, warmup_steps=2),
            "sample_every": 0, "num_preview": 4,
        },
        "sampling": {"num_steps": 4, "batch_size": 8},
        "finetune": {
            "train": _train(4, 8, log_every=2, checkpoint_every=4, warmup_steps=1),
            "classifier": {"channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 8, "eval_every": 3,
                           "eval_max": 32, "train": _train(6, 16, log_every=2, checkpoint_every=6, warmup_steps=1)},
        },
        "conditional": {"train": _train(4, 8, log_every=2, checkpoint_every=4, warmup_steps=1)},
        "select": {"classifier": _TINY_CLASSIFIER, "threshold": 0.5},
        "evaluate": {"classifier": _TINY_CLASSIFIER, "seeds": [0, 1]},
        "features": {"backbone": "resnet10t", "steps": 3, "batch_size": 16},
        "generation": {"max_real": 64, "kid_subset_size": 16},
    },
    # A 2-core CPU: one task at one budget end to end in 49 to 80 minutes with these steps, by machine; pcam-fewlabel
    # halves the autoencoder's and the LDM's and takes 60 minutes on an AVX-512 host (bench/results/README.md).
    # Objective, normalisation and bf16 chosen by the trials in bench/results/pretrain_trials.
    "cpu": {
        "data": {"resolution": 64},
        "autoencoder": {
            "arch": {"downsample_factor": 4, "channels": [32, 64, 64], "latent_channels": 3,
                     "norm_num_groups": 16},
            "train": _train(2000, 32, lr=1e-3, warmup_steps=100, checkpoint_every=500, ema_decay=0.0,
                            mixed_precision="bf16"),
            "train_crop": 32,
        },
        "pretrain": {
            "unet": {"channels": [64, 128, 128], "layers_per_block": 1, "attention_resolutions": [4],
                     "attention_head_dim": 32, "norm_num_groups": 32},
            "train": _train(4000, 64, lr=5e-4, warmup_steps=200, checkpoint_every=500, ema_decay=0.999,
                            mixed_precision="bf16"),
            "sample_every": 1000,
        },
        # DPM-Solver++ 15 in bf16: on pcam 1 %, 3.6x the tiles/s of DDIM-50 fp32 at overlapping oracle agreement
        # and the same FD (bench/results/speed.md, 512 tiles per setting).
        "sampling": {"sampler": "dpmpp", "num_steps": 15, "batch_size": 64, "precision": "bf16"},
        "finetune": {
            "train": _train(600, 32, lr=5e-5, ema_decay=0.995, warmup_steps=50, mixed_precision="bf16"),
            "classifier": {"train": _train(1500, 64, lr=3e-4, weight_decay=0.05, ema_decay=0.0, warmup_steps=100,
                                           mixed_precision="bf16")},
        },
        "conditional": {"train": _train(1500, 32, lr=2e-4, ema_decay=0.999, warmup_steps=100,
                                        mixed_precision="bf16")},
        "select": {"classifier": {"steps": 300, "eval_every": 50, "precision": "bf16"}},
        "evaluate": {"classifier": {"steps": 300, "eval_every": 50, "precision": "bf16"}},
        "features": {"steps": 300, "precision": "bf16"},
        "generation": {"max_real": 1000},
    },
    # The paper's sizes (GPU): 256 px, f=4, 3 latent channels, 192-channel UNet (1,2,2,4,4).
    "paper": {
        "data": {"resolution": 256},
        "diffusion": {"prediction_type": "epsilon", "min_snr_gamma": None},
        "autoencoder": {
            "arch": {"downsample_factor": 4, "channels": [128, 256, 512], "layers_per_block": 2,
                     "latent_channels": 3, "norm_num_groups": 32, "mid_attention": True},
            "train": _train(100_000, 16, lr=4.5e-6 * 16, warmup_steps=0, ema_decay=0.0),
            "perceptual_weight": 1.0, "disc_weight": 0.5, "disc_start": 50_001,
        },
        "pretrain": {
            "unet": {"channels": [192, 384, 384, 768, 768], "layers_per_block": 2,
                     "attention_resolutions": [32, 16, 8], "attention_head_dim": 32, "norm_num_groups": 32},
            "train": _train(200_000, 48, lr=9.6e-5, warmup_steps=1000, ema_decay=0.9999,
                            checkpoint_every=5000),
            "sample_every": 5000,
        },
        "sampling": {"sampler": "ddim", "num_steps": 50, "batch_size": 64},
    },
}
