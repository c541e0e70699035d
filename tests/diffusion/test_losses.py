"""The diffusion loss (diffusion/losses.py): min-SNR weighting, golden values for eps and v targets."""

from __future__ import annotations

import pytest
import torch

from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.diffusion.schedules import training_scheduler


class _Const(torch.nn.Module):
    """A 'UNet' predicting a fixed tensor, to check the loss arithmetic exactly."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t, class_labels=None):
        return type("O", (), {"sample": self.out})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_golden(prediction_type: str) -> None:
    s = training_scheduler(prediction_type=prediction_type)
    x0, noise = torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)  # so the eps and v targets are both 0
    t = torch.tensor([5, 900])
    pred = torch.ones(2, 1, 1, 1)  # squared error 1 per sample
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    weight = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    got = diffusion_loss(_Const(pred), s, x0, noise, t, min_snr_gamma=5.0)
    assert float(got) == pytest.approx(float(weight.mean()), rel=1e-5)
    assert float(diffusion_loss(_Const(pred), s, x0, noise, t)) == pytest.approx(1.0)
