"""Online EMA of the trainable (adapter) weights, kept in fp32 beside the module.

After optimizer step `step` (1-based):
  step <= start_step                          ema = w           (the EMA starts from the weights at start_step)
  (step - start_step) % update_every != 0     unchanged
  otherwise, the k-th update (k = 0, 1, ...)  ema = d ema + (1 - d) w
with d = decay, or with warmup d = min(decay, (1 + k) / (10 + k)): the ramp of diffusers'
EMAModel (its `use_ema_warmup=False` branch, which kohya / ai-toolkit style trainers use), so
early updates follow the fast-moving weights; diffusers also copies outright on its first
update, which the copy at start_step does here. k is derived from the step, so the
state is only the averaged tensors. `decay` is per update: with update_every = n the EMA
spans about n / (1 - decay) steps.

Use `applied(module)` to sample previews or export with the EMA weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


class AdapterEMA:
    def __init__(
        self,
        module: nn.Module,
        decay: float = 0.999,
        start_step: int = 0,
        update_every: int = 1,
        warmup: bool = False,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        if start_step < 0 or update_every < 1:
            raise ValueError(f"EMA start_step {start_step} must be >= 0 and update_every {update_every} >= 1")
        self.decay = decay
        self.start_step = start_step
        self.update_every = update_every
        self.warmup = warmup
        self._params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if not self._params:
            raise ValueError("EMA: the module has no parameters with requires_grad to average")
        self.shadow = {name: p.detach().float().clone() for name, p in self._params.items()}

    def decay_at(self, update_index: int) -> float:
        """d for the k-th averaging update (k = 0 for the first)."""
        if self.warmup:
            return min(self.decay, (1.0 + update_index) / (10.0 + update_index))
        return self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each optimizer step with the 1-based count of steps done."""
        if step <= self.start_step:
            for name, param in self._params.items():
                self.shadow[name].copy_(param.detach())
            return
        since_start = step - self.start_step
        if since_start % self.update_every:
            return
        weight = 1.0 - self.decay_at(since_start // self.update_every - 1)
        for name, param in self._params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Swap the EMA weights into `module`'s parameters of the same names; restore them after."""
        params = dict(module.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(
                f"EMA: the module has no parameter {missing[0]!r} ({len(missing)} missing); is it the trained one?"
            )
        saved = {}
        with torch.no_grad():
            for name, averaged in self.shadow.items():
                saved[name] = params[name].detach().clone()
                params[name].copy_(averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged fp32 tensors by parameter name (safetensors-ready copies)."""
        return {name: tensor.detach().clone().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the trained parameters: missing {missing[:3]}, unexpected {unexpected[:3]} "
                f"({len(missing)} missing, {len(unexpected)} unexpected); was it saved from a different network?"
            )
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state {name!r} has shape {tuple(tensor.shape)}, the parameter {tuple(self.shadow[name].shape)}"
                )
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
