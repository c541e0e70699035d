"""Noise schedules and samplers as diffusers schedulers, built from the experiment config.

The training scheduler's config is saved beside the UNet (``scheduler/``) so a checkpoint samples
with plain diffusers. Every sampler here is told the model predicts epsilon: model functions
convert v-predictions to epsilon first (:func:`histodiffusion.diffusion.sampling.unet_eps_fn`), so
guidance and samplers only ever see epsilon.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# LDM's "linear" schedule interpolates sqrt(beta) linearly (ldm/modules/diffusionmodules/util.py),
# which diffusers calls "scaled_linear"; the paper's 0.0015 -> 0.0155 refers to that one.
_BETA_SCHEDULES = {"sqrt_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = ("ddim", "dpmpp", "ddpm")


def training_scheduler(num_train_timesteps: int = 1000, schedule: str = "sqrt_linear", beta_start: float = 0.0015,
                       beta_end: float = 0.0155, prediction_type: str = "v_prediction") -> DDPMScheduler:
    """The forward process q(x_t | x_0) used for training (``add_noise``, ``get_velocity``)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
        beta_schedule=_BETA_SCHEDULES[schedule], prediction_type=prediction_type,
        clip_sample=False, timestep_spacing="trailing",
    )


def sampling_scheduler(name: str, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A sampler sharing the training betas; it receives epsilon whatever the UNet predicts."""
    common = dict(prediction_type="epsilon", timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                         **common)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++",
                                                       solver_order=2, final_sigmas_type="zero", **common)
    if name == "ddpm":
        return DDPMScheduler.from_config(train_scheduler.config, clip_sample=False, **common)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
