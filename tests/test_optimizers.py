"""Optimizer allow-list, kwarg validation, AdamW modes and schedule-free eval / train weights."""

import pytest
import schedulefree
import torch
from accelerate import Accelerator

from dit_trainer.training.optimizers import (
    OPTIMIZERS,
    eval_weights,
    is_schedule_free,
    make_optimizer,
    train_mode,
)


def params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g).to(device)), torch.nn.Parameter(torch.randn(5, generator=g).to(device))]


def set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_name_steps_and_keeps_group_lr_and_name(name):
    up, down = params()
    lrs = [1.0, 1.0] if name == "prodigy" else [2e-3, 1e-3]  # Prodigy: one lr for all groups (checked below)
    optimizer = make_optimizer(name, [{"params": [up], "lr": lrs[0], "name": "up"}, {"params": [down], "lr": lrs[1]}],
                               lr=5e-4)
    before = up.detach().clone()
    for seed in range(6):  # RAdam (schedule-free) leaves the weights alone until its variance estimate is usable
        set_grads([up, down], seed)
        optimizer.step()
    assert not torch.equal(up, before)
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert optimizer.param_groups[0]["name"] == "up"


def assert_same_steps(optimizer, ours, torch_adamw, reference, rtol, atol):
    """Three steps with the same gradients leave both optimizers' parameters equal."""
    for step in range(3):
        set_grads(ours, step)
        set_grads(reference, step)
        optimizer.step()
        torch_adamw.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adamw_foreach"])
def test_adamw_modes_match_torch_adamw(name):
    ours, reference = params(), params()
    optimizer = make_optimizer(name, [{"params": ours, "lr": 1e-2}], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), kwargs={"eps": 1e-6})
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    assert_same_steps(optimizer, ours, torch_adamw, reference, rtol=1e-6, atol=1e-7)


def test_adamw_picks_foreach_off_cuda_and_fused_when_asked():
    auto = make_optimizer("adamw", [{"params": iter(params()), "lr": 1e-3}], lr=1e-3)
    assert len(auto.param_groups[0]["params"]) == 2  # a generator of params is read once, by torch
    assert auto.param_groups[0]["foreach"] is True and not auto.param_groups[0]["fused"]
    fused = make_optimizer("adamw_fused", [{"params": params(), "lr": 1e-3}], lr=1e-3)
    assert fused.param_groups[0]["fused"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_picks_fused_on_cuda_and_matches_torch():
    ours, reference = params(device="cuda"), params(device="cuda")
    optimizer = make_optimizer("adamw", [{"params": ours, "lr": 1e-2}], lr=1e-2)
    assert optimizer.param_groups[0]["fused"] is True
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01, foreach=False)
    assert_same_steps(optimizer, ours, torch_adamw, reference, rtol=1e-5, atol=1e-6)


def test_fused_on_a_device_without_the_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no fused AdamW kernel for device \['meta'\].*adamw_foreach"):
        make_optimizer("adamw_fused", [{"params": params(device="meta"), "lr": 1e-3}], lr=1e-3)


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="not one of .*adamw_schedulefree"):
        make_optimizer("torch.optim.LBFGS", [{"params": params(), "lr": 1e-3}], lr=1e-3)


def test_unknown_kwarg_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'adamw' does not take the argument 'momentum'; allowed: \['amsgrad', 'eps'\]"):
        make_optimizer("adamw", [{"params": params(), "lr": 1e-3}], lr=1e-3, kwargs={"momentum": 0.9})


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("adamw", {"eps": -1.0}, "eps=-1.0 is invalid, expected a float > 0"),
        ("adamw_schedulefree", {"warmup_steps": 1.5}, "warmup_steps=1.5 is invalid, expected an int >= 0"),
        ("sgd", {"momentum": 1.0}, r"momentum=1.0 is invalid, expected a float in \[0, 1\)"),
        ("sgd", {"nesterov": True}, "nesterov=true needs momentum > 0"),
    ],
)
def test_bad_kwarg_values_are_refused_with_the_expected_range(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, [{"params": params(), "lr": 1e-3}], lr=1e-3, kwargs=kwargs)


def test_sgd_kwargs_reach_torch_sgd():
    optimizer = make_optimizer("sgd", [{"params": params(), "lr": 1e-3}], lr=1e-3, kwargs={"momentum": 0.9, "nesterov": True})
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True


def test_schedule_free_weights_are_x_inside_eval_weights_and_y_outside():
    """Against schedulefree's reference implementation, which stores x, y and z explicitly."""
    ours, reference_params = params(), params()
    optimizer = make_optimizer(
        "adamw_schedulefree", [{"params": ours, "lr": 0.05}], lr=0.05, weight_decay=0.01, kwargs={"warmup_steps": 2}
    )
    reference = schedulefree.AdamWScheduleFreeReference(reference_params, lr=0.05, weight_decay=0.01, warmup_steps=2)
    reference.train()
    assert is_schedule_free(optimizer) and not is_schedule_free(torch.optim.SGD(params(), lr=1.0))
    for step in range(4):
        set_grads(ours, step)
        set_grads(reference_params, step)
        optimizer.step()
        reference.step()
    x = [reference.state[p]["x"] for p in reference_params]
    y = [reference.state[p]["y"] for p in reference_params]
    assert not torch.allclose(x[0], y[0], atol=1e-4)  # the two points differ, so the check below means something
    with eval_weights(optimizer):
        for p, expected in zip(ours, x):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    for p, expected in zip(ours, y):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    set_grads(ours, 9)
    optimizer.step()  # back in train mode: a step is allowed again


def test_eval_weights_keeps_eval_mode_it_found_and_train_mode_switches_back():
    ps = params()
    optimizer = make_optimizer("adamw_schedulefree", [{"params": ps, "lr": 0.05}], lr=0.05)
    for step in range(3):  # x = y after one step; they part from the second on
        set_grads(ps, step)
        optimizer.step()
    optimizer.eval()
    x = [p.detach().clone() for p in ps]
    with eval_weights(optimizer):
        pass
    assert optimizer.param_groups[0]["train_mode"] is False  # left as found
    assert all(torch.equal(p, v) for p, v in zip(ps, x))
    train_mode(optimizer)
    assert optimizer.param_groups[0]["train_mode"] is True
    assert not torch.allclose(ps[0], x[0])


def test_eval_weights_is_a_no_op_for_adamw():
    ps = params()
    optimizer = make_optimizer("adamw", [{"params": ps, "lr": 0.05}], lr=0.05)
    set_grads(ps, 0)
    optimizer.step()
    before = [p.detach().clone() for p in ps]
    with eval_weights(optimizer):
        assert all(torch.equal(p, v) for p, v in zip(ps, before))
    train_mode(optimizer)
    assert all(torch.equal(p, v) for p, v in zip(ps, before))


def test_schedule_free_is_seen_through_accelerates_wrapper():
    ps = params()
    optimizer = Accelerator(cpu=True).prepare(make_optimizer("adamw_schedulefree", [{"params": ps, "lr": 0.05}], lr=0.05))
    assert not isinstance(optimizer, schedulefree.AdamWScheduleFree) and is_schedule_free(optimizer)
    for step in range(3):
        set_grads(ps, step)
        optimizer.step()
    y = ps[0].detach().clone()
    with eval_weights(optimizer):
        assert not torch.allclose(ps[0], y)
    torch.testing.assert_close(ps[0].detach(), y)
