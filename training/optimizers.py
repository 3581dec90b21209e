"""Optimizers by allow-listed name, with their extra arguments validated.

Names (no class is ever imported from a user-given string):
  adamw               torch AdamW: the fused kernel when every parameter is on CUDA, foreach otherwise
  adamw_fused         torch AdamW(fused=True); refused where the device has no fused kernel
  adamw_foreach       torch AdamW(foreach=True)
  adamw_schedulefree  schedulefree.AdamWScheduleFree (Defazio et al. 2024, "The Road Less Scheduled")
  sgd                 torch SGD (betas are ignored)
  prodigy, adafactor, lion, came, adamw8bit, lion8bit, paged_adamw8bit, paged_lion8bit,
  sgd_schedulefree, radam_schedulefree: library optimizers, see optimizer_library.py

Schedule-free optimizers (AdamW, SGD, RAdam) keep two points per parameter: the training point y, where gradients
are taken, and the averaged point x, which is the model to sample with, average and save
(z, the base sequence, lives in the optimizer state). The parameters hold y in train mode
and x in eval mode. So: call `train_mode` before the first step and after loading a
checkpoint, and wrap previews, EMA updates and every save in `eval_weights`, as the
schedulefree README asks ("the optimizer should also be placed in eval mode when saving
checkpoints"). It replaces the lr schedule: use the "constant" scheduler and its own
`warmup_steps` kwarg.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import logging

import torch

from . import optimizer_library
from .negative_lr import ascent_groups
from .optimizer_library import SCHEDULE_FREE

log = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_fused", "adamw_foreach", "sgd", *optimizer_library.BUILDERS)


def _non_negative_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _positive_float(value: Any) -> bool:
    return _non_negative_float(value) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unit_interval(value: Any) -> bool:
    return _non_negative_float(value) and value < 1


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


# Per optimizer: extra kwarg -> (check, what a valid value is). Only these keys pass through.
_KwargRule = tuple[Callable[[Any], bool], str]
_ADAMW_KWARGS: dict[str, _KwargRule] = {
    "eps": (_positive_float, "a float > 0"),
    "amsgrad": (lambda v: isinstance(v, bool), "true or false"),
}
ALLOWED_KWARGS: dict[str, dict[str, _KwargRule]] = {
    "adamw": _ADAMW_KWARGS,
    "adamw_fused": _ADAMW_KWARGS,
    "adamw_foreach": _ADAMW_KWARGS,
    "adamw_schedulefree": {
        "eps": (_positive_float, "a float > 0"),
        "warmup_steps": (_non_negative_int, "an int >= 0"),
        "r": (_non_negative_float, "a float >= 0"),
        "weight_lr_power": (_non_negative_float, "a float >= 0"),
    },
    "sgd": {
        "momentum": (_unit_interval, "a float in [0, 1)"),
        "dampening": (_unit_interval, "a float in [0, 1)"),
        "nesterov": (lambda v: isinstance(v, bool), "true or false"),
    },
    "prodigy": {
        "eps": (_positive_float, "a float > 0"),
        "d_coef": (_positive_float, "a float > 0 (scales the learned step size d)"),
        "d0": (_positive_float, "a float > 0 (initial d estimate)"),
        "growth_rate": (_positive_float, "a float > 0 (cap on d's growth per step)"),
        "safeguard_warmup": (_boolean, "true or false (true with lr warmup)"),
        "use_bias_correction": (_boolean, "true or false"),
        "decouple": (_boolean, "true or false (AdamW-style weight decay)"),
        "beta3": (_unit_interval, "a float in [0, 1)"),
    },
    "adafactor": {
        "beta1": (_unit_interval, "a float in [0, 1) (first moment; absent: none, as transformers' default)"),
        "decay_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0, "a float < 0"),
        "clip_threshold": (_positive_float, "a float > 0"),
        "eps1": (_positive_float, "a float > 0"),
        "eps2": (_positive_float, "a float > 0"),
    },
    "lion": {},
    "came": {
        "beta3": (_unit_interval, "a float in [0, 1)"),
        "clip_threshold": (_positive_float, "a float > 0"),
        "eps1": (_positive_float, "a float > 0"),
        "eps2": (_positive_float, "a float > 0"),
    },
    **{name: {"eps": (_positive_float, "a float > 0")} for name in optimizer_library.BNB_OPTIMIZERS},
    "sgd_schedulefree": {
        "warmup_steps": (_non_negative_int, "an int >= 0"),
        "r": (_non_negative_float, "a float >= 0"),
        "weight_lr_power": (_non_negative_float, "a float >= 0"),
    },
    "radam_schedulefree": {
        "eps": (_positive_float, "a float > 0"),
        "r": (_non_negative_float, "a float >= 0"),
        "weight_lr_power": (_non_negative_float, "a float >= 0"),
    },
}


def _validated_kwargs(name: str, kwargs: dict | None) -> dict:
    allowed = ALLOWED_KWARGS[name]
    kwargs = dict(kwargs or {})
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(
                f"optimizer {name!r} does not take the argument {key!r}; allowed: {sorted(allowed) or 'none'}"
            )
        check, expected = allowed[key]
        if not check(value):
            raise ValueError(f"optimizer {name!r}: {key}={value!r} is invalid, expected {expected}")
    if name == "sgd" and kwargs.get("nesterov") and (kwargs.get("momentum", 0) == 0 or kwargs.get("dampening", 0) != 0):
        raise ValueError("optimizer 'sgd': nesterov=true needs momentum > 0 and dampening 0")
    return kwargs


def _fused_devices() -> tuple[str, ...]:
    # torch keeps the list private; CUDA has had fused AdamW since 2.0.
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


def _param_devices(param_groups: list[dict]) -> set[str]:
    return {p.device.type for group in param_groups for p in group["params"]}


def make_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    kwargs: dict | None = None,
    allow_negative_lr: bool = False,
) -> torch.optim.Optimizer:
    """Build the named optimizer over `param_groups` (dicts with "params", "lr", maybe "name").

    `lr` is the default for groups without their own; `kwargs` are extra optimizer
    arguments, checked against ALLOWED_KWARGS[name]. A schedule-free optimizer comes back
    in train mode. Negative lrs need `allow_negative_lr` (negative_lr.py).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
    param_groups, lr = ascent_groups(name, param_groups, lr, allow_negative_lr)
    if not _non_negative_float(weight_decay):
        raise ValueError(f"weight_decay {weight_decay!r} must be >= 0")
    if len(betas) != 2 or not all(_unit_interval(b) for b in betas):
        raise ValueError(f"betas {betas!r} must be two floats in [0, 1)")
    for index, group in enumerate(param_groups):
        if "params" not in group:
            raise ValueError(f"parameter group {index} ({group.get('name', 'unnamed')}) has no 'params'")
    # Lists, so the device check below does not consume a generator torch still has to read.
    param_groups = [
        {**group, "params": [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])}
        for group in param_groups
    ]
    extra = _validated_kwargs(name, kwargs)
    betas = (float(betas[0]), float(betas[1]))

    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, **extra)
    if name in optimizer_library.BUILDERS:
        lrs = {group.get("lr", lr) for group in param_groups} - {0.0}
        if name == "prodigy" and len(lrs) > 1:
            raise ValueError(
                f"optimizer 'prodigy' learns one step size for all parameters, so its parameter groups need one lr "
                f"(got {sorted(lrs)}); set loraplus_lr_ratio to 0 and leave lr_pattern empty (0 freezes a module), "
                "or use another optimizer"
            )
        if name == "prodigy" and lr != 1.0:
            log.warning("prodigy learns its step size d and multiplies it by lr: lr=1 is the recommended value "
                        "(this run has lr=%g); tune d_coef instead", lr)
        optimizer = optimizer_library.build(name, param_groups, lr, weight_decay, betas, extra)
        train_mode(optimizer)
        return optimizer

    devices = _param_devices(param_groups)
    if name == "adamw_fused":
        unsupported = sorted(devices - set(_fused_devices()))
        if unsupported:
            raise ValueError(
                f"optimizer 'adamw_fused': this torch has no fused AdamW kernel for device {unsupported}; "
                "use 'adamw' (fused on CUDA, foreach elsewhere) or 'adamw_foreach'"
            )
        mode = {"fused": True}
    elif name == "adamw_foreach" or devices != {"cuda"}:
        mode = {"foreach": True}
    else:
        mode = {"fused": True}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, **mode, **extra)


def _unwrapped(optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper)."""
    # AcceleratedOptimizer is itself a torch Optimizer subclass, so look for the inner one.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer) -> bool:
    return isinstance(_unwrapped(optimizer), SCHEDULE_FREE)


@contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """Parameters hold the schedule-free eval point x inside, and the mode from before after.

    A no-op for every other optimizer.
    """
    inner = _unwrapped(optimizer)
    if not is_schedule_free(inner):
        yield
        return
    was_training = inner.param_groups[0]["train_mode"]
    inner.eval()
    try:
        yield
    finally:
        if was_training:
            inner.train()


def train_mode(optimizer) -> None:
    """Put a schedule-free optimizer in train mode (parameters hold y); no-op otherwise."""
    inner = _unwrapped(optimizer)
    if is_schedule_free(inner):
        inner.train()
