"""Loss formulas, the scheduled Huber threshold and the weighted-mean mask loss, by hand values."""

import math

import pytest
import torch

from dit_trainer.training.data.masks import mask_weights
from dit_trainer.training.losses import LossConfig, flow_loss, huber_threshold


def one_diff(d: float, c: float, kind: str) -> float:
    pred, target = torch.full((1, 1, 1, 1), d), torch.zeros(1, 1, 1, 1)
    return flow_loss(pred, target, loss=LossConfig(kind=kind, huber_c=c)).item()


def test_elementwise_formulas():
    root = math.sqrt(0.3**2 + 0.1**2)  # d = 0.3, c = 0.1
    assert one_diff(0.3, 0.1, "l2") == pytest.approx(0.09)
    assert one_diff(0.3, 0.1, "huber") == pytest.approx(2 * 0.1 * (root - 0.1), rel=1e-6)
    assert one_diff(0.3, 0.1, "smooth_l1") == pytest.approx(2 * (root - 0.1), rel=1e-6)


def test_huber_is_quadratic_near_zero_and_linear_far_out():
    c = 0.5
    assert one_diff(1e-3, c, "huber") == pytest.approx(1e-6, rel=1e-3)  # d^2
    assert one_diff(1e-3, c, "smooth_l1") == pytest.approx(1e-6 / c, rel=1e-3)  # d^2 / c
    far = one_diff(200.0, c, "huber") - one_diff(100.0, c, "huber")
    assert far == pytest.approx(2 * c * 100.0, rel=1e-3)  # slope 2c
    assert one_diff(200.0, c, "smooth_l1") - one_diff(100.0, c, "smooth_l1") == pytest.approx(200.0, rel=1e-3)


SIGMA = torch.tensor([0.0, 0.25, 0.5, 1.0])


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [0.2 * 3.0] * 4),  # huber_c * huber_scale
        ("exponential", [3.0 * 0.2**s for s in (0.0, 0.25, 0.5, 1.0)]),  # scale at sigma 0 -> c * scale at 1
        ("snr", [(1 - 0.2) * (1 - s) ** 2 + 0.2 for s in (0.0, 0.25, 0.5, 1.0)]),  # noise/signal = s / (1 - s)
    ],
)
def test_huber_threshold_schedules(schedule, expected):
    c = huber_threshold(LossConfig(kind="huber", huber_c=0.2, huber_schedule=schedule, huber_scale=3.0), SIGMA, 4)
    assert c.tolist() == pytest.approx(expected, rel=1e-6)


def test_snr_schedule_equals_the_ddpm_form_with_the_flow_noise_to_signal_ratio():
    sigma = torch.tensor([0.1, 0.4, 0.8])
    ratio = sigma / (1 - sigma)  # sd-scripts' sqrt((1 - a) / a) for x_t = (1 - sigma) x0 + sigma noise
    c = huber_threshold(LossConfig(kind="huber", huber_c=0.1, huber_schedule="snr"), sigma, 3)
    torch.testing.assert_close(c, (1 - 0.1) / (1 + ratio) ** 2 + 0.1)


def test_scheduled_threshold_applies_per_sample():
    d = torch.tensor([0.3, 0.3]).view(2, 1, 1, 1).expand(2, 2, 2, 2)
    sigma = torch.tensor([0.0, 1.0])
    cfg = LossConfig(kind="huber", huber_c=0.1, huber_schedule="exponential")
    loss = flow_loss(d, torch.zeros_like(d), loss=cfg, sigma=sigma).item()
    per_sample = [2 * c * (math.sqrt(0.09 + c * c) - c) for c in (1.0, 0.1)]  # c = 0.1 ** sigma
    assert loss == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_weighted_loss_is_the_weighted_mean_and_zero_weight_gets_no_gradient():
    pred = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = torch.arange(1.0, 13.0).view(1, 3, 2, 2)
    # the data pipeline's w = m^gamma (1 - mu) + mu with gamma 2, mu 0: [[1, 0.25], [0, 1]]
    weights = mask_weights(torch.tensor([[[[1.0, 0.5], [0.0, 1.0]]]]), gamma=2.0, min_weight=0.0)
    loss = flow_loss(pred, target, weights)
    # sum over channels of target^2 per pixel: (1,2,3,4)^2 + (5..8)^2 + (9..12)^2
    per_pixel = [1 + 25 + 81, 4 + 36 + 100, 9 + 49 + 121, 16 + 64 + 144]
    expected = (per_pixel[0] * 1.0 + per_pixel[1] * 0.25 + per_pixel[3] * 1.0) / (3 * 2.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[..., 1, 0] == 0)  # the zero-weight pixel, every channel
    assert torch.all(pred.grad[..., 0, :] != 0) and torch.all(pred.grad[..., 1, 1] != 0)


def test_weights_scale_does_not_matter():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    weights = torch.rand(2, 1, 3, 3)
    assert flow_loss(pred, target, weights).item() == pytest.approx(flow_loss(pred, target, 7 * weights).item(), rel=1e-6)
    assert flow_loss(pred, target, torch.ones(2, 1, 3, 3)).item() == pytest.approx(flow_loss(pred, target).item(), rel=1e-6)


@pytest.mark.parametrize(
    "cfg,kwargs,match",
    [
        (LossConfig(kind="l1"), {}, "loss 'l1' is not one of"),
        (LossConfig(kind="huber", huber_schedule="cosine"), {}, "huber_schedule 'cosine' is not one of"),
        (LossConfig(kind="huber", huber_schedule="snr"), {}, "needs the batch's sigmas"),
        (LossConfig(kind="huber", huber_c=0.0), {}, r"huber_c 0.0 must be in \(0, 1\]"),
        (LossConfig(), {"weights": torch.ones(2, 1, 5, 5)}, r"do not broadcast to the prediction \(2, 4, 3, 3\)"),
    ],
)
def test_bad_settings_are_refused_by_name(cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), loss=cfg, **kwargs)
