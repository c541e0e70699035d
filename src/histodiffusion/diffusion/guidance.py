"""Classifier guidance in latent space, written once as a wrapper around an eps function.

eps'(x_t, t) = eps(x_t, t) - sqrt(1 - alphas_cumprod[t]) * s * grad_{x_t} log p(y | x_t, t)
(Dhariwal & Nichol 2021, eq. 14 / Algorithm 2). Because the result is again an eps function,
every sampler (DDIM at any step count, DPM-Solver++, DDPM) uses it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from histodiffusion.diffusion.sampling import EpsFn

ClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> logits


def log_prob_grad(classifier_fn: ClassifierFn, x_t: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_{x_t} log p(y | x_t, t) per sample, and p(y | x_t, t); computed in fp32."""
    with torch.enable_grad(), torch.autocast(x_t.device.type, enabled=False):
        x = x_t.detach().float().requires_grad_(True)
        log_p = F.log_softmax(classifier_fn(x, t).float(), dim=-1)
        picked = log_p[torch.arange(len(y), device=x.device), y]
        # Samples are independent, so the gradient of the sum is each sample's own gradient.
        grad = torch.autograd.grad(picked.sum(), x)[0]
    return grad, picked.detach().exp()


def guided_eps(eps_fn: EpsFn, classifier_fn: ClassifierFn, y: torch.Tensor, scale: float | torch.Tensor,
               alphas_cumprod: torch.Tensor) -> EpsFn:
    """Wrap ``eps_fn`` with classifier guidance towards classes ``y`` (N,) at ``scale`` (scalar or (N,)).

    A scale of 0 returns ``eps_fn``'s output untouched (bit-identical to unguided sampling).
    """
    alphas_cumprod = alphas_cumprod.to(y.device)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=y.device).expand(len(y))

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = eps_fn(x_t, t)
        if not bool((scale != 0).any()):
            return eps
        grad, _ = log_prob_grad(classifier_fn, x_t, t, y)
        a_t = alphas_cumprod[t].float().view(-1, *([1] * (x_t.ndim - 1)))
        s = scale.view(-1, *([1] * (x_t.ndim - 1)))
        return (eps.float() - (1 - a_t).sqrt() * s * grad).to(eps.dtype)

    return fn
