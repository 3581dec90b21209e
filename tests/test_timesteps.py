"""Sigma samplers against their analytic CDFs (Kolmogorov-Smirnov distance, fixed seeds).

Every method is a monotone map of a normal (or uniform) draw, so its CDF is closed-form in
logit space: shift by k adds log k to logit(t), logsnr has logit(sigma) = -logSNR / 2.
"""

import math

import pytest
import torch

from dit_trainer.training.timesteps import TimestepConfig, sample_sigmas

N = 20_000
KS_LIMIT = 1.95 / math.sqrt(N)  # the KS critical distance at significance 0.001


def draw(n_tokens=1024, **kw) -> torch.Tensor:
    return sample_sigmas(TimestepConfig(**kw), N, n_tokens, torch.Generator().manual_seed(1234)).double()


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x) - torch.log1p(-x)


def cdf_logit_normal(x, shift_log=0.0, scale=1.0):
    """sigma = S(sigmoid(scale n); exp(shift_log)): logit(sigma) = scale n + shift_log."""
    return torch.special.ndtr((logit(x) - shift_log) / scale)


def cdf_logsnr(x, mean, std):
    """sigma = sigmoid(-L / 2), L ~ N(mean, std): sigma <= x  <=>  L >= -2 logit(x)."""
    return torch.special.ndtr((2 * logit(x) + mean) / std)


def cdf_qinglong(x, mu, logsnr_mean, logsnr_std, shares=(0.80, 0.075, 0.125)):
    mid, styled, detail = shares
    return mid * cdf_logit_normal(x, mu) + styled * cdf_logsnr(x, logsnr_mean, logsnr_std) + detail * cdf_logsnr(x, 5.36, 1.0)


def ks_distance(samples: torch.Tensor, cdf) -> float:
    x, _ = samples.sort()
    f = cdf(x)
    n = len(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


def flux_mu(tokens):
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


def qwen_mu(tokens):
    return 0.5 + (0.9 - 0.5) * (tokens - 256) / (8192 - 256)


@pytest.mark.parametrize(
    "kw,cdf",
    [
        ({"method": "uniform"}, lambda x: x),
        ({"method": "sigmoid", "sigmoid_scale": 1.5}, lambda x: cdf_logit_normal(x, 0.0, 1.5)),
        ({"method": "shift", "discrete_flow_shift": 3.0}, lambda x: cdf_logit_normal(x, math.log(3.0))),
        ({"method": "shift", "discrete_flow_shift": 2.2, "sigmoid_scale": 0.8}, lambda x: cdf_logit_normal(x, math.log(2.2), 0.8)),
        ({"method": "flux_shift"}, lambda x: cdf_logit_normal(x, flux_mu(1024))),
        ({"method": "qwen_shift"}, lambda x: cdf_logit_normal(x, qwen_mu(1024))),
        ({"method": "logsnr", "logsnr_mean": -1.0, "logsnr_std": 1.5}, lambda x: cdf_logsnr(x, -1.0, 1.5)),
        ({"method": "qinglong_flux", "logsnr_std": 1.0}, lambda x: cdf_qinglong(x, flux_mu(1024), 0.0, 1.0)),
        ({"method": "qinglong_qwen", "logsnr_mean": -2.0}, lambda x: cdf_qinglong(x, qwen_mu(1024), -2.0, 2.0)),
    ],
    ids=lambda v: v.get("method") if isinstance(v, dict) else "",
)
def test_sampler_follows_its_analytic_cdf(kw, cdf):
    assert ks_distance(draw(**kw), cdf) < KS_LIMIT


def test_resolution_methods_use_the_token_count():
    samples = draw(n_tokens=4096, method="flux_shift")
    assert ks_distance(samples, lambda x: cdf_logit_normal(x, 1.15)) < KS_LIMIT
    assert ks_distance(samples, lambda x: cdf_logit_normal(x, flux_mu(1024))) > 5 * KS_LIMIT


def test_qinglong_mixture_shares_are_resolved_by_the_test():
    """A sampler with a fork's 79 / 11 / 10 split would fail the check above."""
    samples = draw(method="qinglong_flux", logsnr_std=1.0)
    wrong = lambda x: cdf_qinglong(x, flux_mu(1024), 0.0, 1.0, shares=(0.79, 0.11, 0.10))  # noqa: E731
    assert ks_distance(samples, wrong) > KS_LIMIT


def test_rescale_maps_the_distribution_into_the_range():
    samples = draw(method="shift", min_sigma=0.2, max_sigma=0.7)
    assert samples.min() >= 0.2 and samples.max() <= 0.7
    assert ks_distance(samples, lambda x: cdf_logit_normal((x - 0.2) / 0.5, math.log(3.0))) < KS_LIMIT


def test_reject_keeps_the_shape_inside_the_range():
    samples = draw(method="sigmoid", min_sigma=0.3, max_sigma=0.9, range_mode="reject")
    low, high = cdf_logit_normal(torch.tensor(0.3, dtype=torch.float64)), cdf_logit_normal(torch.tensor(0.9, dtype=torch.float64))
    assert samples.min() >= 0.3 and samples.max() <= 0.9
    assert ks_distance(samples, lambda x: (cdf_logit_normal(x) - low) / (high - low)) < KS_LIMIT


def test_clamp_puts_the_outside_mass_on_the_bounds():
    samples = draw(method="uniform", min_sigma=0.2, max_sigma=0.6, range_mode="clamp")
    assert samples.min() == pytest.approx(0.2) and samples.max() == pytest.approx(0.6)
    assert (samples <= 0.2 + 1e-7).double().mean().item() == pytest.approx(0.2, abs=0.01)
    assert (samples >= 0.6 - 1e-7).double().mean().item() == pytest.approx(0.4, abs=0.01)


def test_same_seed_same_sigmas_and_bounds_are_open():
    a = sample_sigmas(TimestepConfig(method="qinglong_qwen"), 64, 2048, torch.Generator().manual_seed(5))
    b = sample_sigmas(TimestepConfig(method="qinglong_qwen"), 64, 2048, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert sample_sigmas(TimestepConfig(method="uniform"), 4096, 1, torch.Generator().manual_seed(0)).min() >= 1e-5


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "bogus"}, "not one of"),
        ({"range_mode": "wrap"}, "range_mode 'wrap' is not one of"),
        ({"min_sigma": 0.6, "max_sigma": 0.6}, "need 0 <= min_sigma < max_sigma <= 1"),
        ({"method": "logsnr", "logsnr_mean": 40.0, "min_sigma": 0.9, "range_mode": "reject"}, "widen the range"),
    ],
)
def test_bad_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        sample_sigmas(TimestepConfig(**kw), 4, 1024, torch.Generator().manual_seed(0))
