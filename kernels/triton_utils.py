"""Helpers shared by the Triton kernel files (imports triton: load it only on the Triton path)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# The smallest tile side tl.dot accepts on NVIDIA tensor cores; also the rank padding.
MIN_DOT = 16


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (runs on CPU tensors, in numpy)."""
    return isinstance(kernel, InterpretedFunction)


def runs_on_cpu(kernel: object) -> bool:
    """True when `kernel` can run in the interpreter: it and triton's own library (tl.zeros,
    tl.sum, decorated when triton is imported) were both decorated under TRITON_INTERPRET=1.
    The interpreter cannot call library functions that were compiled for GPU."""
    return is_interpreted(kernel) and is_interpreted(tl.zeros)


def rank_block(rank: int) -> int:
    """Power-of-two tile for the LoRA rank axis, at least MIN_DOT (masked loads pad with zeros)."""
    return max(MIN_DOT, triton.next_power_of_2(rank))


def token_feature_blocks(rank_tile: int, kernel: object) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_F) for the compose kernels: tokens x one feature axis (in or out).

    The grid is one program per BLOCK_T tokens, so 32 keeps 4096-token batches at 128+
    programs; the [BLOCK_F, BLOCK_R] tile of A or B stays at 4096 values so large ranks fit
    in registers and shared memory. Untuned (no GPU when written); the interpreter's cost
    grows with tile area, so it gets the smallest legal tiles.
    """
    if is_interpreted(kernel):
        return MIN_DOT, MIN_DOT
    return 32, max(MIN_DOT, min(64, 4096 // rank_tile))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands that came from tensors of `dtype`.

    Every kernel upcasts loads to fp32 (the interpreter mishandles bf16 arithmetic), so
    tl.dot sees fp32 operands. Values that were fp16/bf16 fit in tf32's 10-bit mantissa
    exactly and their products are exact in fp32, so single-pass "tf32" loses nothing.
    Genuine fp32 operands would lose 13 mantissa bits to tf32: "tf32x3" splits them into
    a high and a low tf32 part and recovers ~fp32 accuracy (torch's fp32 matmul does not
    use tf32 by default, so the reference is exact fp32). ROCm has no tf32x3: use "ieee".
    """
    if torch.version.hip is not None:
        return "ieee"
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "tf32x3"


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device; make it the tensor's device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """m / (N + eps) in fp32, then rounded to the activation dtype like the reference's
    factor.to(dtype): k == 1 exactly when m equals the norm in that dtype."""
    return (magnitude.float() / (norm + eps)).to(dtype)
