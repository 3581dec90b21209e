"""When a fused backward pass (fused_backward.py) is the unfused update exactly; no heavy imports,
so TrainConfig can check it."""

from __future__ import annotations

# Optimizers whose state and update are per parameter, so a per-parameter step in the
# backward pass is the same update. Prodigy's d is shared by all parameters.
PER_PARAMETER = ("adamw", "adamw_foreach", "adamw_fused", "sgd", "adafactor", "lion", "came")


def fused_backward_refusal(optimizer: str, grad_accum: int, max_grad_norm: float, mixed_precision: str) -> str | None:
    """Why fused_backward_pass cannot be exact with these train options, or None."""
    if optimizer not in PER_PARAMETER:
        return (f"optimizer {optimizer!r} couples parameters in its step; fused_backward_pass supports "
                f"{', '.join(PER_PARAMETER)}")
    if grad_accum > 1:
        return "grad_accum > 1 would step on a partial gradient; set grad_accum to 1 (or raise batch_size)"
    if max_grad_norm > 0:
        return "gradient clipping needs the norm of all gradients before any step; set max_grad_norm to 0"
    if mixed_precision == "fp16":
        return "fp16 loss scaling unscales and checks all gradients before the step; use mixed_precision bf16 or no"
    return None
