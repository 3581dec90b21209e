"""Fused backward pass (kohya's `fused_backward_pass`): each parameter is updated as soon as its
gradient is complete, inside its post-accumulate-grad hook, and its gradient freed at once.

The full set of gradients never exists at one time, so the peak memory of a step drops by
up to the size of all trainable gradients (benchmarks: `python -m dit_trainer.benchmarks
fused_backward`). The update is the unfused one exactly where the optimizer's update and
state are per parameter (PER_PARAMETER): every parameter gets its own optimizer of the
named kind, with its group's options, and the group lr the schedule sets. Refused where it
cannot be exact: gradient accumulation (the update would run on a partial gradient),
gradient clipping (the global norm needs every gradient first), fp16 loss scaling, and
optimizers whose step couples parameters (Prodigy's shared d, schedule-free averaging).

The outer optimizer holds the parameter groups for the lr schedule and checkpoints; its
`step` is a no-op because the steps have already happened in the backward pass.
"""

from __future__ import annotations

import torch

from .fused_refusal import PER_PARAMETER, fused_backward_refusal
from .negative_lr import ascent_groups
from .optimizers import make_optimizer


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One `name` optimizer per parameter, stepped from the parameter's post-accumulate-grad hook."""

    def __init__(self, name: str, param_groups: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float], kwargs: dict | None = None, allow_negative_lr: bool = False):
        if name not in PER_PARAMETER:
            raise ValueError(f"fused_backward_pass: {fused_backward_refusal(name, 1, 0.0, 'no')}")
        param_groups, lr = ascent_groups(name, param_groups, lr, allow_negative_lr)  # the schedule sees |lr|
        super().__init__(param_groups, {"lr": lr})
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._handles = []
        for index, group in enumerate(self.param_groups):
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                self._inner[param] = make_optimizer(name, [{**options, "params": [param]}], lr, weight_decay, betas,
                                                    kwargs)
                self._group_index[param] = index
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))

    @torch.no_grad()
    def _step_parameter(self, param: torch.Tensor) -> None:
        inner = self._inner[param]
        inner.param_groups[0]["lr"] = self.param_groups[self._group_index[param]]["lr"]  # as scheduled now
        inner.step()
        param.grad = None

    def step(self, closure=None):
        """Nothing to do: every parameter was stepped during the backward pass."""
        return None

    def state_dict(self) -> dict:
        return {"groups": super().state_dict(), "per_parameter": [o.state_dict() for o in self._inner.values()]}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"groups", "per_parameter"} or len(state_dict["per_parameter"]) != len(self._inner):
            raise ValueError("this optimizer state was not saved with fused_backward_pass on the same parameters; "
                             "resume with the fused_backward_pass setting it was trained with")
        super().load_state_dict(state_dict["groups"])
        for inner, state in zip(self._inner.values(), state_dict["per_parameter"]):
            inner.load_state_dict(state)

    def remove_hooks(self) -> None:
        """Detach from the parameters (after training), so a later run on them steps only its own optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
