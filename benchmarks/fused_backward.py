"""Memory of a training step with and without the fused backward pass (AdamW, Adafactor).

    python -m dit_trainer.benchmarks.fused_backward [--quick] [--dtype bfloat16]

The model slices of train_step.py (Z-Image, Flux.1-dev) with a rank-32 LoRA on the
default targets (quick mode: their tiny configs, rank 8). One step is forward, backward
and the optimizer update, through training/fused_backward.py when fused. Columns:
peak bytes of adapter gradients alive at once (counted in every parameter's
post-accumulate-grad hook, so on any device), its ratio to the unfused step, peak CUDA
memory of the step (n/a on CPU) and median step time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..training.fused_backward import FusedBackwardOptimizer
from ..training.network.network import LoRANetwork, NetworkConfig
from ..training.optimizers import make_optimizer
from .common import Setup, parse_setup, peak_mib, ratio, table, time_ms
from .train_step import FULL, QUICK, ModelShape, model_and_sample, run_tables


class GradientPeak:
    """The largest total size of `.grad` tensors alive at once, seen after each gradient is accumulated."""

    def __init__(self, params: list[torch.Tensor]):
        self.params, self.peak = params, 0
        # Registered before the fused optimizer's hooks, so each count runs before its step frees the gradient.
        self.handles = [p.register_post_accumulate_grad_hook(self._count) for p in params]

    def _count(self, _param: torch.Tensor) -> None:
        live = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_model(shape: ModelShape, setup: Setup) -> None:
    rank = shape.rank
    print(f"Fused backward pass, {shape.title} ({shape.blocks()}, width {shape.width()}, LoRA rank {rank})  "
          f"[{setup.describe()}]")
    model, x, sigma, inputs = model_and_sample(shape, setup)
    rows, baseline = [], {}
    for name in ("adamw", "adafactor"):
        for fused in (False, True):
            network = LoRANetwork(model, model.architecture, NetworkConfig(rank=rank, alpha=rank)).attach()
            groups = network.param_groups(1e-4)
            counter = GradientPeak([p for group in groups for p in group["params"]])
            build = FusedBackwardOptimizer if fused else make_optimizer
            optimizer = build(name, groups, 1e-4, 0.0, (0.9, 0.999), {})

            def step() -> None:
                model(x, sigma, **inputs).float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # optimizer state exists from here on, as in training
            peak = peak_mib(step, setup.device)
            ms = time_ms(step, setup)
            grads = counter.peak / 2**20
            baseline.setdefault(name, grads)
            rows.append((f"{name} {'fused' if fused else 'unfused'}", grads, ratio(grads, baseline[name]), peak, ms))
            counter.remove()
            if fused:
                optimizer.remove_hooks()
            network.detach_from_model()
    print(table(("optimizer", "peak grad MiB", "vs unfused", "peak MiB", "ms / step"), rows))


def run(setup: Setup) -> None:
    run_tables(QUICK[:2] if setup.quick else FULL[:2], run_model, setup)  # Z-Image and Flux.1-dev


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
