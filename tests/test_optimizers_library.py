"""Library optimizers (Prodigy, Adafactor, Lion, CAME, bitsandbytes 8-bit, schedule-free SGD / RAdam)
and the fused backward pass: each equals the library's own optimizer, resumes exactly, and fused == unfused."""

import bitsandbytes
import prodigyopt
import pytest
import pytorch_optimizer
import schedulefree
import torch
import torch.nn as nn

from dit_trainer.training.checkpoint import TrainState, load_state, save_state
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.fused_backward import FusedBackwardOptimizer
from dit_trainer.training.optimizers import is_schedule_free, make_optimizer
from test_resume import assert_same_state, fresh, interrupted_then_resumed, run_config

LR, WD, BETAS = 3e-3, 0.01, (0.9, 0.99)

# What each name must be: the library class with the settings the README promises, built here by hand.
REFERENCES = {
    "prodigy": lambda p: prodigyopt.Prodigy(p, lr=1.0, betas=BETAS, weight_decay=WD),
    "adafactor": lambda p: pytorch_optimizer.AdaFactor(
        p, lr=LR, betas=(None, BETAS[1]), weight_decay=WD, relative_step=False, scale_parameter=False,
        warmup_init=False, momentum_dtype=torch.float32),
    "lion": lambda p: pytorch_optimizer.Lion(p, lr=LR, betas=BETAS, weight_decay=WD),
    "came": lambda p: pytorch_optimizer.CAME(p, lr=LR, betas=(*BETAS, 0.9999), weight_decay=WD),
    "adamw8bit": lambda p: bitsandbytes.optim.AdamW8bit(p, lr=LR, betas=BETAS, weight_decay=WD),
    "lion8bit": lambda p: bitsandbytes.optim.Lion8bit(p, lr=LR, betas=BETAS, weight_decay=WD),
    "paged_adamw8bit": lambda p: bitsandbytes.optim.PagedAdamW8bit(p, lr=LR, betas=BETAS, weight_decay=WD),
    "paged_lion8bit": lambda p: bitsandbytes.optim.PagedLion8bit(p, lr=LR, betas=BETAS, weight_decay=WD),
    "sgd_schedulefree": lambda p: schedulefree.SGDScheduleFree(p, lr=LR, momentum=BETAS[0], weight_decay=WD),
    "radam_schedulefree": lambda p: schedulefree.RAdamScheduleFree(p, lr=LR, betas=BETAS, weight_decay=WD),
}


def ours(name: str, params, **kwargs):
    return make_optimizer(name, [{"params": params}], 1.0 if name == "prodigy" else LR, WD, BETAS, kwargs)


def make_params(seed: int = 0):
    # 300 x 260: big enough for bitsandbytes' 8-bit state (it keeps tensors under 4096 elements in 32 bit).
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(300, 260, generator=g)), nn.Parameter(torch.randn(40, 6, generator=g)),
            nn.Parameter(torch.randn(7, generator=g))]


def run_steps(optimizer, params, seeds):
    for seed in seeds:
        g = torch.Generator().manual_seed(100 + seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", REFERENCES)
def test_steps_equal_the_library_optimizer(name):
    mine, theirs = make_params(), make_params()
    optimizer, reference = ours(name, mine), REFERENCES[name](theirs)
    if is_schedule_free(optimizer):
        reference.train()
    run_steps(optimizer, mine, range(6))
    run_steps(reference, theirs, range(6))
    for a, b, start in zip(mine, theirs, make_params()):
        assert not torch.equal(a, start)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", REFERENCES)
def test_state_round_trip_through_a_checkpoint_resumes_exactly(tmp_path, name):
    straight = make_params()
    optimizer = ours(name, straight)
    run_steps(optimizer, straight, range(6))

    first = make_params()
    optimizer = ours(name, first)
    run_steps(optimizer, first, range(3))
    state = TrainState(step=3, micro_batches=3, losses=[], skipped_nonfinite=0,
                       trainable={str(i): p.detach().clone() for i, p in enumerate(first)},
                       optimizer=optimizer.state_dict(), scheduler={}, rng={}, config={})
    saved = load_state(save_state(tmp_path / "ckpt", state))
    resumed = [nn.Parameter(saved.trainable[str(i)].clone()) for i in range(len(first))]
    optimizer = ours(name, resumed)
    optimizer.load_state_dict(saved.optimizer)
    run_steps(optimizer, resumed, range(3, 6))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_adafactor_kwargs_reach_the_library():
    p = make_params()
    optimizer = ours("adafactor", p, beta1=0.9, clip_threshold=2.0, decay_rate=-0.5)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, BETAS[1]) and optimizer.clip_threshold == 2.0 and optimizer.decay_rate == -0.5
    assert group["relative_step"] is False and group["scale_parameter"] is False and group["warmup_init"] is False


def test_prodigy_refuses_groups_with_different_lrs_and_bad_kwargs():
    a, b, _ = make_params()
    with pytest.raises(ValueError, match="one lr"):
        make_optimizer("prodigy", [{"params": [a], "lr": 1.0}, {"params": [b], "lr": 16.0}], 1.0)
    with pytest.raises(ValueError, match="d_coef"):
        make_optimizer("prodigy", [{"params": [a]}], 1.0, kwargs={"d_coef": -1})
    prodigy = make_optimizer("prodigy", [{"params": [a]}], 1.0, kwargs={"d_coef": 0.5, "safeguard_warmup": True})
    assert prodigy.param_groups[0]["d_coef"] == 0.5 and prodigy.param_groups[0]["safeguard_warmup"] is True


# --- fused backward pass -----------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))

    def loss(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        return nn.functional.mse_loss(self.layers(x), y)


FUSED = ["adamw", "adamw_foreach", "sgd", "adafactor", "lion", "came"]


@pytest.mark.parametrize("name", FUSED)
def test_fused_backward_equals_the_unfused_step(name):
    unfused, fused = Net(), Net()
    groups = lambda net: [{"params": list(net.layers[0].parameters()), "lr": LR, "name": "first"},  # noqa: E731
                          {"params": [p for layer in net.layers[1:] for p in layer.parameters()], "lr": LR / 2}]
    plain = make_optimizer(name, groups(unfused), LR, WD, BETAS)
    hooked = FusedBackwardOptimizer(name, groups(fused), LR, WD, BETAS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(hooked, lambda step: 1.0 / (1 + step))
    plain_scheduler = torch.optim.lr_scheduler.LambdaLR(plain, lambda step: 1.0 / (1 + step))
    for seed in range(5):
        unfused.loss(seed).backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        plain_scheduler.step()
        fused.loss(seed).backward()
        assert all(p.grad is None for p in fused.parameters())  # freed inside the backward pass
        hooked.step()
        scheduler.step()
    for a, b in zip(fused.parameters(), unfused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hooked.remove_hooks()
    before = [p.detach().clone() for p in fused.parameters()]
    fused.loss(9).backward()
    assert all(torch.equal(p, q) for p, q in zip(fused.parameters(), before))  # no steps after remove_hooks


FUSED_RUN = dict(fused_backward_pass=True, grad_accum=1, max_grad_norm=0.0, ema_decay=0.0)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_training_with_fused_backward_equals_unfused_and_resumes_bit_for_bit(tmp_path, name):
    from dit_trainer.training.loop import train
    from dit_trainer.training.network.network import NetworkConfig

    network_cfg = NetworkConfig(rank=4, alpha=2)
    cfg = run_config(optimizer=name, **FUSED_RUN)
    model, fused_network, data = fresh(network_cfg)
    fused = train(model, fused_network, data, cfg, run_dir=tmp_path / "fused")
    model, network, data = fresh(network_cfg)
    unfused = train(model, network, data, run_config(optimizer=name, **{**FUSED_RUN, "fused_backward_pass": False}))
    assert fused.losses == unfused.losses
    assert_same_state(fused_network.state_dict(), network.state_dict(), exact=True)
    resumed_network, resumed = interrupted_then_resumed(tmp_path / "split", network_cfg, cfg)
    assert resumed.losses == fused.losses
    assert_same_state(resumed_network.state_dict(), fused_network.state_dict(), exact=True)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(grad_accum=2, max_grad_norm=0.0), "grad_accum"),
        (dict(max_grad_norm=1.0), "max_grad_norm"),
        (dict(max_grad_norm=0.0, optimizer="prodigy"), "couples parameters"),
        (dict(max_grad_norm=0.0, optimizer="adamw_schedulefree"), "couples parameters"),
        (dict(max_grad_norm=0.0, mixed_precision="fp16"), "fp16"),
    ],
)
def test_fused_backward_is_refused_where_it_cannot_be_exact(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(fused_backward_pass=True, **options)
