"""Negative learning rates: refused unless allow_negative_lr, then gradient ascent at |lr| with a warning."""

import logging

import pytest
import torch

from dit_trainer.training.config import TrainConfig
from dit_trainer.training.fused_backward import FusedBackwardOptimizer
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.optimizers import make_optimizer
from test_adapter_math import tiny_model


def param_and_grad(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    return p, torch.randn(6, 5, generator=g)


def test_train_config_needs_the_explicit_option():
    with pytest.raises(ValueError, match="allow_negative_lr"):
        TrainConfig(lr=-1e-4)
    assert TrainConfig(lr=-1e-4, allow_negative_lr=True).lr == -1e-4
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(lr=0.0, allow_negative_lr=True)


def test_negative_sgd_step_is_ascent_and_warns(caplog):
    p, grad = param_and_grad()
    start = p.detach().clone()
    with pytest.raises(ValueError, match="allow_negative_lr"):
        make_optimizer("sgd", [{"params": [p]}], -0.1, weight_decay=0.0)
    with caplog.at_level(logging.WARNING):
        optimizer = make_optimizer("sgd", [{"params": [p]}], -0.1, weight_decay=0.0, allow_negative_lr=True)
    assert "negative learning rate" in caplog.text
    p.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(p.detach(), start + 0.1 * grad, rtol=1e-6, atol=1e-7)  # p - lr * g, lr = -0.1


def test_negative_group_in_adamw_equals_torch_maximize_at_the_absolute_lr():
    mine, grad = param_and_grad()
    theirs, _ = param_and_grad()
    optimizer = make_optimizer("adamw", [{"params": [mine], "lr": -1e-2, "name": "unlearn"}], 1e-3,
                               allow_negative_lr=True)
    reference = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.01, maximize=True, foreach=True)
    for scale in (1.0, -0.5, 2.0):
        mine.grad, theirs.grad = grad * scale, grad * scale
        optimizer.step()
        reference.step()
    assert torch.equal(mine, theirs)
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["maximize"] is True


def test_negative_lr_pattern_groups_need_the_option_and_an_ascent_optimizer():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, lr_pattern={r"layers\.0\..*": -1.0}))
    groups = network.param_groups(1e-3)
    assert {g["name"]: g["lr"] for g in groups}["lora_A x-1"] == -1e-3
    with pytest.raises(ValueError, match=r"groups \['lora_A x-1', 'lora_B x-1'\] is negative"):
        make_optimizer("adamw", groups, 1e-3)
    with pytest.raises(ValueError, match="no per-group ascent"):
        make_optimizer("lion", groups, 1e-3, allow_negative_lr=True)
    fused = FusedBackwardOptimizer("adamw", network.param_groups(1e-3), 1e-3, 0.0, (0.9, 0.999),
                                   allow_negative_lr=True)
    assert all(g["lr"] > 0 for g in fused.param_groups)
    assert [g.get("maximize", False) for g in fused.param_groups] == [True, False, True, False]
    fused.remove_hooks()
