"""Diffusion training loss: epsilon or v targets, optional min-SNR weighting."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, x_0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, min_snr_gamma: float | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of w(t) * ||model(x_t, t) - target||^2 over the batch.

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps. The target is eps or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    by ``scheduler.config.prediction_type``. Min-SNR-gamma (Hang et al. 2023):
    w = min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, with SNR = a_t / (1 - a_t).
    """
    x_t = scheduler.add_noise(x_0, noise, t)
    pred_type = scheduler.config.prediction_type
    target = noise if pred_type == "epsilon" else scheduler.get_velocity(x_0, noise, t)
    pred = unet(x_t, t, class_labels=class_labels).sample
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        a = scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = a / (1 - a)
        clipped = snr.clamp(max=min_snr_gamma)
        per_sample = per_sample * (clipped / snr if pred_type == "epsilon" else clipped / (snr + 1))
    return per_sample.mean()
