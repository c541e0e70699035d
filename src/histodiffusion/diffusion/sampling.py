"""Model functions and the sampling loop (k-diffusion style: samplers take an eps function).

An ``EpsFn`` maps (x_t (N, C, h, w), t (N,) long) to the predicted noise eps (N, C, h, w).
Guidance is a wrapper that turns one EpsFn into another (see ``guidance.py``), so the loop never
knows a classifier exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(a_t) v + sqrt(1 - a_t) x_t  (Salimans & Ho 2022), a_t = alphas_cumprod[t]."""
    a = alphas_cumprod_t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def unet_eps_fn(unet: torch.nn.Module, prediction_type: str, alphas_cumprod: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> EpsFn:
    """Wrap a diffusers UNet as an EpsFn (converting v-predictions to epsilon)."""
    alphas_cumprod = alphas_cumprod.to(next(unet.parameters()).device)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(x_t, t, class_labels=class_labels).sample.to(x_t.dtype)
        if prediction_type == "v_prediction":
            return eps_from_v(out, x_t, alphas_cumprod[t])
        return out

    return eps_fn


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for a batch: one draw per sample from its own generator (batch-size independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@torch.no_grad()  # guidance turns gradients on for its own classifier call only
def sample_loop(eps_fn: EpsFn, scheduler: SchedulerMixin, x_T: torch.Tensor, num_steps: int,
                generators: Sequence[torch.Generator] | None = None, eta: float = 0.0,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run ``scheduler`` from x_T for ``num_steps`` steps; returns x_0 (latents).

    ``generators`` (one per sample) drive the noise that stochastic samplers (DDPM, DDIM with
    eta > 0) add at each step, so a sample does not depend on its batch neighbours.
    """
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    kwargs: dict = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    ddpm = isinstance(scheduler, DDPMScheduler)
    stochastic = ddpm or (isinstance(scheduler, DDIMScheduler) and eta > 0)
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x_in = scheduler.scale_model_input(x, t)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            eps = eps_fn(x_in, t_batch)
        step_kwargs = dict(kwargs)
        if stochastic and generators is not None:
            if ddpm:  # DDPMScheduler draws its own noise: one generator per sample
                step_kwargs["generator"] = list(generators)
            else:
                step_kwargs["variance_noise"] = torch.stack(
                    [torch.randn(tuple(x.shape[1:]), generator=g) for g in generators]).to(x.device, x.dtype)
        x = scheduler.step(eps.float(), t, x, **step_kwargs).prev_sample
    return x
