"""Classifier guidance (diffusion/guidance.py): scale 0 is exact, the gradient is autograd's, every sampler and step count works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from histodiffusion.diffusion.guidance import guided_eps, log_prob_grad
from histodiffusion.diffusion.sampling import initial_noise, sample_loop, unet_eps_fn
from histodiffusion.diffusion.schedules import sampling_scheduler
from histodiffusion.models.latent_classifier import LatentClassifier
from histodiffusion.seeding import sample_generator


@pytest.fixture(scope="module")
def models(tiny_unet, train_scheduler):
    """The tiny UNet, an untrained three-class latent classifier (seed 0) and the training scheduler."""
    torch.manual_seed(0)
    clf = LatentClassifier(in_channels=3, num_classes=3, sample_size=8, block_out_channels=(16, 32),
                           norm_num_groups=8, attention_head_dim=8).eval()
    return tiny_unet, clf, train_scheduler


def test_guidance_gradient_equals_autograd_of_log_softmax(models) -> None:
    _, clf, _ = models
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([3, 200, 600, 999])
    y = torch.tensor([0, 2, 1, 2])
    grad, p = log_prob_grad(clf, x, t, y)
    # Reference: each sample on its own, autograd of log_softmax at its class.
    for i in range(4):
        xi = x[i:i + 1].clone().requires_grad_(True)
        lp = F.log_softmax(clf(xi, t[i:i + 1]), dim=-1)[0, y[i]]
        (ref,) = torch.autograd.grad(lp, xi)
        assert torch.allclose(grad[i], ref[0], atol=1e-6, rtol=1e-4)
        assert float(p[i]) == pytest.approx(float(lp.detach().exp()), rel=1e-5)


def test_guided_eps_formula(models) -> None:
    unet, clf, s = models
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    y = torch.tensor([1, 0])
    base = unet_eps_fn(unet, "epsilon", s.alphas_cumprod)
    with torch.no_grad():
        got = guided_eps(base, clf, y, 2.5, s.alphas_cumprod)(x, t)
        eps = base(x, t)
    grad, _ = log_prob_grad(clf, x, t, y)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(got, eps - (1 - a).sqrt() * 2.5 * grad, atol=1e-5)
    # A per-sample scale of 0 leaves that sample's eps untouched.
    with torch.no_grad():
        partial = guided_eps(base, clf, y, torch.tensor([2.5, 0.0]), s.alphas_cumprod)(x, t)
    assert torch.allclose(partial[0], got[0], atol=1e-6) and torch.equal(partial[1], eps[1])


def _run(models, sampler: str, steps: int, scale: float, guided: bool = True) -> torch.Tensor:
    unet, clf, s = models
    gens = [sample_generator(0, k) for k in range(3)]
    x_T = initial_noise((3, 8, 8), gens)
    eps_fn = unet_eps_fn(unet, "epsilon", s.alphas_cumprod)
    if guided:
        eps_fn = guided_eps(eps_fn, clf, torch.tensor([0, 1, 2]), scale, s.alphas_cumprod)
    with torch.no_grad():
        return sample_loop(eps_fn, sampling_scheduler(sampler, s), x_T, steps, gens)


def test_scale_zero_reproduces_unguided_samples_exactly(models) -> None:
    assert torch.equal(_run(models, "ddim", 10, 0.0), _run(models, "ddim", 10, 0.0, guided=False))
    assert not torch.equal(_run(models, "ddim", 10, 5.0), _run(models, "ddim", 10, 0.0, guided=False))


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 25), ("ddim", 50), ("dpmpp", 20)])
def test_guidance_runs_with_any_step_count(models, sampler: str, steps: int) -> None:
    x = _run(models, sampler, steps, 3.0)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()


def test_guidance_raises_the_target_probability(models) -> None:
    """On a fixed classifier, a strong scale steers samples towards each target class."""
    unet, clf, s = models
    y = torch.tensor([0, 1, 2])
    t0 = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        p_free = clf(_run(models, "ddim", 20, 0.0), t0).softmax(-1)[torch.arange(3), y]
        p_guided = clf(_run(models, "ddim", 20, 30.0), t0).softmax(-1)[torch.arange(3), y]
    assert (p_guided > p_free).all()


def test_sampling_keeps_no_autograd_graph_across_steps(models) -> None:
    """Callers need no torch.no_grad(): a graph chained over 50 steps ran a 64-tile batch out of memory."""
    unet, clf, s = models
    gens = [sample_generator(0, k) for k in range(3)]
    eps_fn = guided_eps(unet_eps_fn(unet, "epsilon", s.alphas_cumprod), clf, torch.tensor([0, 1, 2]), 3.0,
                        s.alphas_cumprod)
    x = sample_loop(eps_fn, sampling_scheduler("ddim", s), initial_noise((3, 8, 8), gens), 5, gens)
    assert x.grad_fn is None and not x.requires_grad
    assert torch.equal(x, _run(models, "ddim", 5, 3.0))


def test_guidance_gradient_stays_fp32_under_bf16_autocast(models) -> None:
    """The fast path samples under bf16 autocast; the classifier's gradient is still computed in fp32."""
    unet, clf, sched = models
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([10, 250, 500, 900])
    y = torch.tensor([1, 0, 2, 1])
    ref, _ = log_prob_grad(clf, x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad, _ = log_prob_grad(clf, x, t, y)
        eps = guided_eps(unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod), clf, y, 3.0,
                         sched.alphas_cumprod)(x, t)
    assert grad.dtype == torch.float32 and eps.dtype == torch.float32
    assert torch.equal(grad, ref)
