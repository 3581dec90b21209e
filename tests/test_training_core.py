"""Timestep sampling, schedules, losses, the Euler sampler and the loop itself."""

import math

import pytest
import torch
import torch.nn as nn

from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.loop import train
from dit_trainer.training.losses import flow_loss
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.sampler import sample_euler, sigma_schedule
from dit_trainer.training.schedules import lr_multiplier
from dit_trainer.training.timesteps import TimestepConfig, resolution_mu, sample_sigmas

N = 40_000


def draw(method: str, n_tokens: int = 1024, **kw) -> torch.Tensor:
    return sample_sigmas(TimestepConfig(method=method, **kw), N, n_tokens, torch.Generator().manual_seed(0))


def test_uniform_sigmas_have_uniform_quantiles():
    q = torch.quantile(draw("uniform"), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(q, torch.tensor([0.1, 0.5, 0.9]), atol=0.01)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sigmoid_quantiles_follow_the_logistic_normal(scale):
    # sigma = sigmoid(scale * n): its p-quantile is sigmoid(scale * z_p).
    z = torch.tensor([-1.2816, 0.0, 1.2816])  # normal 10%, 50%, 90% quantiles
    q = torch.quantile(draw("sigmoid", sigmoid_scale=scale), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(q, torch.sigmoid(scale * z), atol=0.01)


def test_shift_moves_the_median_to_S_of_one_half():
    median = draw("shift", discrete_flow_shift=3.0).median()
    assert median == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.01)  # 0.75


@pytest.mark.parametrize("method,tokens,mu", [("flux_shift", 4096, 1.15), ("flux_shift", 256, 0.5), ("qwen_shift", 8192, 0.9)])
def test_resolution_shift_median_is_sigmoid_mu(method, tokens, mu):
    # exp(mu) / (exp(mu) + 1/t - 1) at t = 1/2 is sigmoid(mu).
    assert draw(method, n_tokens=tokens).median() == pytest.approx(1 / (1 + math.exp(-mu)), abs=0.01)


def test_resolution_mu_is_linear_in_tokens():
    assert resolution_mu(4096, (256, 0.5), (4096, 1.15)) == pytest.approx(1.15)
    assert resolution_mu(2176, (256, 0.5), (4096, 1.15)) == pytest.approx(0.825)


def test_logsnr_median_and_clamps():
    assert draw("logsnr", logsnr_mean=-2.0).median() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)
    s = draw("uniform", min_sigma=0.2, max_sigma=0.6)
    assert s.min() >= 0.2 and s.max() <= 0.6


def test_unknown_timestep_method_names_choices():
    with pytest.raises(ValueError, match="not one of"):
        draw("bogus")


def test_schedule_values_at_known_steps():
    assert lr_multiplier(0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, "constant", warmup=10) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, "constant", warmup=10) == 1.0
    assert lr_multiplier(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(100, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(60, 110, "cosine", warmup=10) == pytest.approx(0.5)  # midpoint of the 100 decay steps


def test_weighted_loss_is_the_weighted_mean_and_ignores_zero_weight():
    pred = torch.zeros(1, 2, 2, 2, requires_grad=True)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    weights = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    loss = flow_loss(pred, target, weights)
    # sum(L w) / (C sum w) = (1*1 + 4*0.5 + 1*1 + 1*0.5) / (2 * 1.5)
    assert loss.item() == pytest.approx(4.5 / 3.0)
    loss.backward()
    assert torch.all(pred.grad[..., 1, :] == 0)  # zero-weight row: zero gradient
    assert torch.all(pred.grad[..., 0, :] != 0)


def test_euler_is_exact_for_the_ideal_velocity_of_a_point_mass():
    """For data x0 fixed, v = (x_t - x0) / sigma is the ideal flow; Euler on it lands on x0."""
    x0 = torch.randn(2, 3, 4, 4)
    oracle = lambda x, sigma, context, context_lens: (x - x0) / sigma.view(-1, 1, 1, 1)  # noqa: E731
    noise = torch.randn(2, 3, 4, 4)
    out = sample_euler(oracle, noise, Conditioning(torch.zeros(2, 1, 1), torch.ones(2, dtype=torch.long)), steps=7, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-5)
    sig = sigma_schedule(4, 3.0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and sig[2] == pytest.approx(0.75)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    cfg = ZImageConfig(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=8, t_mid_dim=32, axes_dims=[4, 6, 6])
    model = ZImageDiT(cfg)
    g = torch.Generator().manual_seed(seed)
    data = LatentDataset(torch.randn(4, 4, 4, 4, generator=g), Conditioning(torch.randn(4, 3, 8, generator=g), torch.full((4,), 3)))
    return model, data


def test_full_training_overfits_a_tiny_batch():
    model, data = tiny_setup()
    result = train(model, model.requires_grad_(True), data, TrainConfig(steps=80, batch_size=4, lr=3e-3, seed=1))
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_adapter_training_learns_and_leaves_the_base_untouched():
    model, data = tiny_setup()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    network = LoRANetwork(model, "zimage", NetworkConfig(algo="dora", rank=4, alpha=4)).attach()
    result = train(model, network, data, TrainConfig(steps=60, batch_size=4, lr=1e-2, seed=1, grad_accum=2))
    assert sum(result.losses[-6:]) / 6 < 0.9 * sum(result.losses[:6]) / 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(a.lora_B.abs().sum() > 0 for a in network.adapters)


def test_same_seed_gives_the_same_run():
    runs = []
    for _ in range(2):
        model, data = tiny_setup()
        network = LoRANetwork(model.requires_grad_(False), "zimage", NetworkConfig(rank=2)).attach()
        runs.append(train(model, network, data, TrainConfig(steps=5, batch_size=2, lr=1e-3, seed=3)).losses)
    assert runs[0] == runs[1]


def test_nonfinite_losses_are_skipped_then_stop_with_advice():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x, sigma, context, context_lens):
            return x * (self.p + float("nan"))

    _, data = tiny_setup()
    model = Broken()
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train(model, model, data, TrainConfig(steps=20, batch_size=2, max_nonfinite_steps=3))


def test_stop_request_ends_after_the_current_step():
    model, data = tiny_setup()
    network = LoRANetwork(model.requires_grad_(False), "zimage", NetworkConfig(rank=2)).attach()
    steps_seen = []
    result = train(model, network, data, TrainConfig(steps=50, batch_size=2), on_progress=lambda e: steps_seen.append(e.step), should_stop=lambda: len(steps_seen) >= 3)
    assert result.steps_done == 3 and result.stopped_early


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients():
    model, data = tiny_setup()
    network = LoRANetwork(model.requires_grad_(False), "zimage", NetworkConfig(rank=2)).attach()
    with torch.no_grad():
        for adapter in network.adapters:
            adapter.lora_B.normal_()  # non-zero B, so A gets a gradient too
    calls = []
    block_forward = model.layers[0].forward

    def counted_forward(*args):
        calls.append(1)
        return block_forward(*args)

    model.layers[0].forward = counted_forward
    x, ctx, lens = data.latents[:2], data.cond.context[:2], data.cond.context_lens[:2]
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing = enabled
        network.zero_grad()
        calls.clear()
        model(x, torch.tensor([0.3, 0.7]), ctx, lens).square().mean().backward()
        grads.append([p.grad.clone() for p in network.parameters()])
        assert len(calls) == (2 if enabled else 1)  # the block ran again in backward
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_one_process_trains_in_fp32_then_bf16_then_fp32_again():
    """A host (ComfyUI) trains many times in one process, each run with its own mixed precision."""
    runs = []
    for precision in ("no", "bf16", "no"):
        model, data = tiny_setup()
        network = LoRANetwork(model.requires_grad_(False), "zimage", NetworkConfig(rank=2)).attach()
        cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, seed=3, mixed_precision=precision)
        runs.append(train(model, network, data, cfg).losses)
    assert runs[0] == runs[2] and runs[1] != runs[0]  # fp32 again is exact: bf16 left nothing behind
