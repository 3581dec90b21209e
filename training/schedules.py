"""Learning-rate schedules with warmup, as multipliers of each group's base lr (torch LambdaLR).

The multiplier at optimizer step s (0-based; LambdaLR's last_epoch) with W warmup steps,
T total steps and floor r = min_ratio:
  s < W   (s + 1) / W                                  linear warmup, full lr at s = W - 1
  after   p = min(1, (s - W) / (T - W)) runs 0 -> 1, z = 1 - p is the remaining fraction:
  constant            1
  linear              r + (1 - r) z
  cosine              r + (1 - r) (1 + cos(pi p)) / 2
  cosine_with_min_lr  the same curve; the name users of transformers / kohya know, where plain
                      cosine ends at 0. Here both honour r, and this name refuses r = 0.
  polynomial          r + (1 - r) z^power              (transformers' polynomial decay, lr_end = r lr)
  rex                 r + (1 - r) z / (0.1 + 0.9 z)

REX (Chen, Wolfe, Kyrillidis 2022, arXiv:2107.04197) writes its profile with the remaining
fraction z = 1 - t/T: (z) / (1/2 + z/2). The 0.1 / 0.9 constants are those of the reference
implementation github.com/IvanVassi/REX_LR and of the REX schedulers derived from it (axolotl,
kohya-style trainers: rex_alpha = 0.1, rex_beta = 0.9), which compute
z = (remaining steps) / (decay steps); so z = 1 at the end of warmup (lr = base) and z = 0 at
the last step (lr = r * base). REX stays near the base lr longer than linear and drops late.

Schedule-free optimizers need no schedule: use "constant" and give the optimizer its own
`warmup_steps` kwarg; nothing here special-cases them.
"""

from __future__ import annotations

import math

import torch

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "cosine_with_min_lr", "polynomial", "rex")


def _validate(total: int, schedule: str, warmup: int, min_ratio: float, power: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"lr scheduler {schedule!r} is not one of {SCHEDULES}")
    if total < 1:
        raise ValueError(f"lr scheduler: total steps {total} must be >= 1")
    if not 0 <= warmup <= total:
        raise ValueError(f"lr scheduler: warmup {warmup} must be between 0 and the total steps {total}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr scheduler: min_ratio {min_ratio} must be in [0, 1] (a fraction of the base lr)")
    if schedule == "cosine_with_min_lr" and min_ratio == 0.0:
        raise ValueError("lr scheduler 'cosine_with_min_lr' needs min_ratio > 0 (e.g. 0.1); use 'cosine' to decay to 0")
    if power <= 0:
        raise ValueError(f"lr scheduler: polynomial power {power} must be > 0")


def lr_multiplier(
    step: int, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0, power: float = 1.0
) -> float:
    """Multiplier of the base lr for 0-based optimizer step `step` (see the module docstring)."""
    _validate(total, schedule, warmup, min_ratio, power)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    remaining = 1.0 - progress
    if schedule == "linear":
        shape = remaining
    elif schedule in ("cosine", "cosine_with_min_lr"):
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "polynomial":
        shape = remaining**power
    else:  # rex
        shape = remaining / (0.1 + 0.9 * remaining)
    return min_ratio + (1.0 - min_ratio) * shape


def resolve_warmup(total: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup in steps from either a step count or a fraction of `total` (rounded up), not both."""
    if warmup_steps < 0 or not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_steps {warmup_steps} must be >= 0 and warmup_ratio {warmup_ratio} in [0, 1)")
    if warmup_steps and warmup_ratio:
        raise ValueError(
            f"set warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both; set the other to 0"
        )
    warmup = warmup_steps or math.ceil(total * warmup_ratio)
    if warmup > total:
        raise ValueError(f"warmup_steps {warmup} exceeds the {total} training steps")
    return warmup


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    schedule: str,
    warmup: int = 0,
    min_ratio: float = 0.0,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group (LoRA+ groups keep their lr ratio).

    The multiplier is a plain closure, so `state_dict()` holds only numbers (LambdaLR
    stores None for non-object lambdas) and can be saved as JSON.
    """
    _validate(total, schedule, warmup, min_ratio, power)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total, schedule, warmup, min_ratio, power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
