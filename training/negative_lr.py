"""Negative learning rates ("unlearn a concept": train away from the data), only when asked for.

A group with lr < 0 is stepped as gradient ascent at |lr|: the optimizer's own
`maximize` flag, per parameter group, which torch's AdamW and SGD read. That is the
negative-lr update with one difference worth having: weight decay still pulls the weights
toward zero instead of pushing them away. Very unstable (the loss is unbounded above), so
it needs `allow_negative_lr` and is logged as a warning.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Optimizers that read `maximize` per parameter group.
ASCENT_OPTIMIZERS = ("adamw", "adamw_fused", "adamw_foreach", "sgd")


def ascent_groups(name: str, param_groups: list[dict], lr: float, allow_negative_lr: bool) -> tuple[list[dict], float]:
    """(groups, default lr) with every negative lr turned into maximize at |lr|; refuses what is not allowed."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr == 0:
        raise ValueError(f"learning rate {lr!r} must be > 0 (or < 0 with allow_negative_lr)")
    groups = [{**group, "lr": group.get("lr", lr)} for group in param_groups]
    negative = [group for group in groups if group["lr"] < 0]
    if not negative and lr > 0:
        return groups, lr
    if not allow_negative_lr:
        where = "lr" if lr < 0 else f"the lr of groups {[g.get('name', '?') for g in negative]}"
        raise ValueError(
            f"{where} is negative (unlearning: gradient ascent, very unstable); set the train option "
            "allow_negative_lr to true if that is what you want, otherwise use a positive lr / lr_pattern multiplier"
        )
    if name not in ASCENT_OPTIMIZERS:
        raise ValueError(f"negative lr: optimizer {name!r} has no per-group ascent; use one of {ASCENT_OPTIMIZERS}")
    for group in negative:
        group["lr"], group["maximize"] = -group["lr"], True
    log.warning("negative learning rate on %d of %d parameter groups (%s): training away from the data, which "
                "diverges easily; watch the previews", len(negative), len(groups),
                ", ".join(str(g.get("name", "?")) for g in negative))
    return groups, abs(lr)
