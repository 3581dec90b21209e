"""Loss weighting by sigma, noise offset / multires noise, logit_normal / mode sampling, timestep buckets."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit_trainer.training.losses import LossConfig, flow_loss, sigma_weights
from dit_trainer.training.noise import NoiseConfig, training_noise
from dit_trainer.training.timesteps import TimestepConfig, TimestepPool, sample_sigmas, stratified_pool

SIGMAS = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99])


def test_sigma_weights_follow_their_formulas():
    s = SIGMAS
    torch.testing.assert_close(sigma_weights(LossConfig(weighting="sigma_sqrt"), s), 1 / s**2)
    torch.testing.assert_close(sigma_weights(LossConfig(weighting="cosmap"), s),
                               2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    # min-SNR in flow form is sigma^2 min(SNR, gamma) with SNR = ((1 - sigma) / sigma)^2.
    snr = ((1 - s) / s) ** 2
    torch.testing.assert_close(sigma_weights(LossConfig(weighting="min_snr", min_snr_gamma=2.0), s),
                               s**2 * torch.minimum(snr, torch.tensor(2.0)))
    assert torch.equal(sigma_weights(LossConfig(), s), torch.ones(5))


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap", "min_snr"])
def test_flow_loss_weights_each_sample_by_its_sigma(weighting):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    cfg = LossConfig(weighting=weighting)
    per_sample = (pred - target).square().mean(dim=(1, 2, 3))
    expected = (sigma_weights(cfg, SIGMAS) * per_sample).mean()
    torch.testing.assert_close(flow_loss(pred, target, None, cfg, SIGMAS), expected)
    with pytest.raises(ValueError, match="needs the batch's sigmas"):
        flow_loss(pred, target, None, cfg)
    with pytest.raises(ValueError, match="weighting 'snr' is not one of"):
        flow_loss(pred, target, None, LossConfig(weighting="snr"), SIGMAS)


def test_noise_without_options_is_the_plain_gaussian_draw():
    a = training_noise((2, 3, 8, 8), NoiseConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(a, torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(4)))


def test_noise_offset_adds_a_per_channel_constant():
    g = torch.Generator().manual_seed(1)
    noise = training_noise((2, 3, 8, 8), NoiseConfig(offset=0.1), g)
    replay = torch.Generator().manual_seed(1)
    base = torch.randn((2, 3, 8, 8), generator=replay)
    shift = torch.randn((2, 3, 1, 1), generator=replay)
    torch.testing.assert_close(noise, base + 0.1 * shift, rtol=0, atol=0)
    # Over many draws the channel means spread by the offset (std 0.1), not by 1/8 of plain noise.
    means = torch.stack([training_noise((64, 4, 16, 16), NoiseConfig(offset=0.5), g).mean(dim=(2, 3))
                         for _ in range(4)]).flatten()
    assert 0.45 < float(means.std()) < 0.56


def kohya_pyramid(noise, iterations, discount, generator):
    """kohya's pyramid_noise_like (library/custom_train_functions.py), random.random() -> the generator."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=generator)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_multires_noise_is_kohyas_pyramid_and_has_unit_std():
    cfg = NoiseConfig(multires_iterations=6, multires_discount=0.3)
    noise = training_noise((2, 4, 32, 32), cfg, torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    expected = kohya_pyramid(torch.randn((2, 4, 32, 32), generator=replay), 6, 0.3, replay)
    torch.testing.assert_close(noise, expected)
    assert abs(float(noise.std()) - 1.0) < 1e-5
    # Low frequencies carry power that white noise lacks: neighbouring cells correlate (white noise: ~0).
    def neighbour_correlation(x):
        return float(F.cosine_similarity(x[..., 1:].flatten(), x[..., :-1].flatten(), dim=0))

    coarse = training_noise((8, 4, 32, 32), NoiseConfig(multires_iterations=6, multires_discount=0.8),
                            torch.Generator().manual_seed(3))
    assert neighbour_correlation(coarse) > 0.15
    assert abs(neighbour_correlation(torch.randn(8, 4, 32, 32))) < 0.05


def draw(method, n=40_000, **kw):
    return sample_sigmas(TimestepConfig(method=method, **kw), n, 1024, torch.Generator().manual_seed(0))


def test_logit_normal_quantiles():
    # sigma = S(1 - sigmoid(m + s z); k): with k = 1 the p-quantile is 1 - sigmoid(m + s z_{1-p}).
    z = torch.tensor([-1.2816, 0.0, 1.2816])
    q = torch.quantile(draw("logit_normal", logit_mean=0.5, logit_std=1.5, discrete_flow_shift=1.0),
                       torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(q, 1 - torch.sigmoid(0.5 + 1.5 * z.flip(0)), atol=0.01, rtol=0)


def test_mode_quantiles():
    # u -> 1 - u - s (cos^2(pi u / 2) - 1 + u) is decreasing, so sigma = 1 - f(u) has p-quantile 1 - f(p).
    p = torch.tensor([0.1, 0.5, 0.9])
    f = 1 - p - 1.29 * (torch.cos(math.pi * p / 2) ** 2 - 1 + p)
    q = torch.quantile(draw("mode", mode_scale=1.29, discrete_flow_shift=1.0), p)
    torch.testing.assert_close(q, 1 - f, atol=0.01, rtol=0)


def test_stratified_pool_fills_every_bucket_evenly():
    pool = stratified_pool(8, 64, torch.Generator().manual_seed(0))
    assert torch.bincount((pool * 8).long(), minlength=8).tolist() == [8] * 8
    assert not torch.equal(pool, pool.sort().values)  # shuffled


def test_timestep_pool_is_a_pure_function_of_the_micro_batch():
    pool = TimestepPool(4, seed=3, batch_size=2, examples_per_epoch=8)  # 4 micro-batches per pool
    epoch = torch.cat([pool.uniforms(m, 2) for m in range(4)])
    assert torch.bincount((epoch * 4).long(), minlength=4).tolist() == [2, 2, 2, 2]
    fresh = TimestepPool(4, seed=3, batch_size=2, examples_per_epoch=8)
    assert torch.equal(fresh.uniforms(6, 2), pool.uniforms(6, 2))  # no state: resuming at 6 gives the same
    assert not torch.equal(pool.uniforms(4, 2), pool.uniforms(0, 2))  # the next epoch has a new pool
    assert torch.equal(pool.uniforms(1, 1), epoch[2:3])  # a short batch takes its first rows
    # With the pool, uniform sampling returns the pool's draws and shift maps them through Phi^-1.
    u = pool.uniforms(0, 2)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sample_sigmas(TimestepConfig(method="uniform"), 2, 16, g, u), u.clamp(1e-5, 1 - 1e-5))
    state = g.get_state()
    sample_sigmas(TimestepConfig(method="shift"), 2, 16, g, u)
    assert torch.equal(g.get_state(), state), "a pooled draw replaces the random one"
    with pytest.raises(ValueError, match="range_mode='reject'"):
        sample_sigmas(TimestepConfig(num_buckets=4, range_mode="reject"), 2, 16, g)
