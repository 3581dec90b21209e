"""LR schedules: known values at known steps, warmup resolution, the LambdaLR wiring and its state."""

import json

import pytest
import torch

from dit_trainer.training.schedules import SCHEDULES, lr_multiplier, make_scheduler, resolve_warmup


@pytest.mark.parametrize(
    "schedule,kw,step,expected",
    [
        ("linear", {}, 0, 1.0),
        ("linear", {}, 50, 0.5),
        ("linear", {}, 100, 0.0),
        ("linear", {"min_ratio": 0.2}, 50, 0.6),  # 0.2 + 0.8 * 0.5
        ("linear", {"warmup": 10}, 55, 0.5),  # halfway through the 90 decay steps
        ("cosine", {}, 25, 0.8535533905932737),  # (1 + cos(pi/4)) / 2
        ("cosine_with_min_lr", {"min_ratio": 0.1}, 50, 0.55),  # 0.1 + 0.9 * 0.5
        ("cosine_with_min_lr", {"min_ratio": 0.1}, 100, 0.1),
        ("polynomial", {"power": 2.0}, 50, 0.25),  # (1 - 0.5)^2
        ("polynomial", {"power": 2.0, "min_ratio": 0.1}, 50, 0.325),  # 0.1 + 0.9 * 0.25
        ("polynomial", {"power": 1.0}, 30, 0.7),  # power 1 is linear
        ("rex", {}, 0, 1.0),  # z = 1: base lr at the start of the decay
        ("rex", {}, 50, 0.5 / (0.1 + 0.45)),  # z = 0.5
        ("rex", {}, 90, 0.1 / (0.1 + 0.09)),  # z = 0.1: still above half the lr, REX drops late
        ("rex", {"min_ratio": 0.05}, 100, 0.05),  # z = 0: the floor
        ("rex", {"warmup": 20}, 60, 0.5 / (0.1 + 0.45)),  # z = 1 - 40/80
        ("constant", {"min_ratio": 0.3}, 100, 1.0),  # constant ignores the floor
    ],
)
def test_known_values_at_known_steps(schedule, kw, step, expected):
    assert lr_multiplier(step, 100, schedule, **kw) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_ramps_linearly_to_the_base_lr(schedule):
    kw = {"min_ratio": 0.1} if schedule == "cosine_with_min_lr" else {}
    values = [lr_multiplier(s, 100, schedule, warmup=4, **kw) for s in range(5)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_rex_stays_above_linear_and_drops_after_cosine():
    for step in range(1, 100):
        rex = lr_multiplier(step, 100, "rex")
        assert rex > lr_multiplier(step, 100, "linear")
        if step >= 10:  # cosine's flat start is higher for the first few percent
            assert rex > lr_multiplier(step, 100, "cosine")


def test_resolve_warmup_from_steps_or_ratio():
    assert resolve_warmup(100, warmup_steps=7) == 7
    assert resolve_warmup(95, warmup_ratio=0.1) == 10  # 9.5 rounded up
    assert resolve_warmup(100) == 0
    with pytest.raises(ValueError, match="not both"):
        resolve_warmup(100, warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="exceeds the 100 training steps"):
        resolve_warmup(100, warmup_steps=101)
    with pytest.raises(ValueError, match=r"warmup_ratio 1.0 in \[0, 1\)"):
        resolve_warmup(100, warmup_ratio=1.0)


@pytest.mark.parametrize(
    "schedule,kw,match",
    [
        ("bogus", {}, "not one of"),
        ("cosine_with_min_lr", {}, "needs min_ratio > 0"),
        ("cosine", {"min_ratio": 1.5}, r"min_ratio 1.5 must be in \[0, 1\]"),
        ("polynomial", {"power": 0.0}, "power 0.0 must be > 0"),
        ("linear", {"warmup": 200}, "warmup 200 must be between 0 and the total steps 100"),
    ],
)
def test_bad_settings_are_refused_by_name(schedule, kw, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, 100, schedule, **kw)
    with pytest.raises(ValueError, match=match):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 100, schedule, **kw)


def make(schedule="rex", **kw):
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 4e-3},
    ]
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    return optimizer, make_scheduler(optimizer, 20, schedule, warmup=3, min_ratio=0.1, **kw)


def test_scheduler_sets_every_groups_lr_from_its_own_base():
    optimizer, scheduler = make()
    for step in range(20):
        multiplier = lr_multiplier(step, 20, "rex", warmup=3, min_ratio=0.1)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * multiplier, 4e-3 * multiplier])
        optimizer.step()
        scheduler.step()


def test_scheduler_state_is_json_and_resumes_where_it_stopped():
    optimizer, scheduler = make("polynomial", power=2.0)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))  # numbers only: no pickle needed
    resumed_optimizer, resumed = make("polynomial", power=2.0)
    resumed.load_state_dict(state)
    for _ in range(5):
        for a, b in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            a.step()
            b.step()
        assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_multiplier(12, 20, "polynomial", 3, 0.1, 2.0))
