"""Learning-rate schedules with warmup, as multipliers of the base lr (torch LambdaLR).

After `warmup` steps of linear ramp (from 1/warmup), progress z runs 0 -> 1 over the rest:
  constant   1
  cosine     min_ratio + (1 - min_ratio) * (1 + cos(pi z)) / 2
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_multiplier(step: int, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"lr scheduler {schedule!r} is not one of {SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    z = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * z))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0):
    lr_multiplier(0, total, schedule, warmup, min_ratio)  # validate the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, schedule, warmup, min_ratio)
    )
