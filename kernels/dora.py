"""DoRA entry points the engine calls; picks the Triton kernels or the PyTorch reference.

backend:
  "torch"   the reference (`dora_reference`), always.
  "triton"  the Triton kernels (`dora_norm`, `dora_input`, `dora_output`); raises naming
            what is missing when they cannot run here.
  "auto"    the kernels when they can run (CUDA tensors, triton installed, fp16 / bf16 /
            fp32, rank <= MAX_TRITON_RANK, frozen base weight), the reference otherwise,
            without a word.

The kernels are imported on first use, so CPU-only installs never load triton. On CPU
they run only in Triton's interpreter, with backend="triton" ("auto" keeps CPU on the
reference) and TRITON_INTERPRET=1 set before triton is first imported; slow, for tests.
The compose kernels are `torch.library` custom ops with fake and
autograd registrations, so torch.compile(fullgraph=True) traces through them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import dora_reference
from .dora_reference import AXES

BACKENDS = ("auto", "torch", "triton")

# The kernels hold a rank-wide tile of B or A in registers next to the data tile.
MAX_TRITON_RANK = 256

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Checked once without importing triton (importing it costs about a second).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

__all__ = [
    "BACKENDS",
    "MAX_TRITON_RANK",
    "base_sq_norm",
    "dora_linear",
    "dora_weight_norm",
    "resolve_backend",
]


def _check_choice(backend: str, axis: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"DoRA backend {backend!r} is not one of {BACKENDS}")
    if axis not in AXES:
        raise ValueError(f"DoRA axis {axis!r} is not one of {AXES}")


def _check_shapes(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    # The kernels index with these shapes; a mismatch would read out of bounds, not raise.
    if weight.dim() != 2:
        raise ValueError(f"DoRA weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    rank = lora_A.shape[0]
    if lora_A.shape != (rank, n_in) or lora_B.shape != (n_out, rank):
        raise ValueError(
            f"LoRA factors do not match weight [out={n_out}, in={n_in}]: lora_A is "
            f"{tuple(lora_A.shape)} (want [rank, {n_in}]), lora_B is {tuple(lora_B.shape)} "
            f"(want [{n_out}, rank])"
        )


def _check_base_sq(base_sq: torch.Tensor | None, weight: torch.Tensor, axis: str) -> None:
    expected = weight.shape[1] if axis == "input" else weight.shape[0]
    if base_sq is not None and base_sq.shape != (expected,):
        raise ValueError(
            f"base_sq has shape {tuple(base_sq.shape)}, the {axis} axis needs ({expected},); "
            "compute it with base_sq_norm(weight, axis)"
        )


def _device_reason(device: torch.device) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install comfyui-dit-trainer[cuda], or pip install triton)"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"tensors are on {device}; the Triton kernels need CUDA (on CPU they run only in "
        "Triton's interpreter, TRITON_INTERPRET=1, for tests). Use backend='auto' or 'torch'"
    )


def _placement_reason(anchor: str, device: torch.device, tensors: dict[str, torch.Tensor | None]) -> str | None:
    # A kernel handed a pointer from another device reads garbage or faults; torch would raise.
    for name, t in tensors.items():
        if t is not None and t.device != device:
            return f"{name} is on {t.device} but {anchor} is on {device}; move them to one device"
    return None


def _rank_reason(rank: int) -> str | None:
    if rank > MAX_TRITON_RANK:
        return f"LoRA rank {rank} exceeds {MAX_TRITON_RANK}, the largest the Triton kernels tile; use backend='torch'"
    return None


def _norm_reason(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_sq: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
) -> str | None:
    others = {"lora_A": lora_A, "lora_B": lora_B, "base_sq": base_sq, "weight_scale": weight_scale}
    reason = (
        _device_reason(weight.device)
        or _placement_reason("weight", weight.device, others)
        or _rank_reason(lora_A.shape[0])
    )
    if reason:
        return reason
    if weight.dtype == torch.float8_e4m3fn:
        if weight.is_cuda and torch.cuda.get_device_capability(weight.device) < (8, 9):
            return "float8_e4m3fn weights need a GPU of compute capability 8.9+ (Ada, Hopper) in Triton"
    elif weight.dtype not in _KERNEL_DTYPES:
        return f"weight dtype {weight.dtype} is not one of {_KERNEL_DTYPES} or torch.float8_e4m3fn"
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} is not one of {_KERNEL_DTYPES}"
    return None


def linear_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear runs in for `x`: the autocast dtype inside autocast, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _linear_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    base_sq: torch.Tensor | None,
    axis: str,
) -> str | None:
    others = {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    reason = (
        _device_reason(x.device)
        or _placement_reason("x", x.device, {**others, "base_sq": base_sq})
        or _rank_reason(lora_A.shape[0])
    )
    if reason:
        return reason
    if weight.requires_grad:
        return (
            "the base weight requires grad and the Triton kernels treat it as frozen (no dW0); "
            "call weight.requires_grad_(False) or use backend='torch'"
        )
    expected = weight.shape[1] if axis == "input" else weight.shape[0]
    if magnitude.numel() != expected:
        return f"magnitude has {magnitude.numel()} values, the {axis} axis needs {expected}"
    dtype = linear_compute_dtype(x)
    if dtype not in _KERNEL_DTYPES:
        return f"activation dtype {dtype} is not one of {_KERNEL_DTYPES}"
    if weight.dtype not in _KERNEL_DTYPES:
        return f"weight dtype {weight.dtype} is not one of {_KERNEL_DTYPES}; dequantize W0 before the layer"
    if not torch.is_autocast_enabled(x.device.type):
        named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
        for name, t in named.items():
            if t is not None and t.dtype != dtype:
                return f"{name} is {t.dtype} but x is {dtype}; cast them to one dtype or run under torch.autocast"
    return None


def _kernels(device: torch.device):
    """Import the Triton ops (registers them with torch.library) and check they can run here."""
    from . import dora_input, dora_norm, dora_output
    from .triton_utils import runs_on_cpu

    if device.type != "cuda" and not runs_on_cpu(dora_norm._dora_norm_kernel):
        raise RuntimeError(
            f"the Triton DoRA kernels cannot run on {device}: triton or these kernels were imported "
            "before TRITON_INTERPRET=1 was set, so they are compiled for GPU. Start the process "
            "with TRITON_INTERPRET=1 in its environment"
        )
    return dora_norm.dora_norm, dora_input.dora_linear_input, dora_output.dora_linear_output


def resolve_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    axis: str,
    backend: str = "auto",
    base_sq: torch.Tensor | None = None,
) -> str:
    """"torch" or "triton": what `dora_linear` runs for these tensors. Raises when
    backend="triton" cannot run, with the reason and the fix."""
    _check_choice(backend, axis)
    # "auto" keeps CPU on the reference even when the interpreter is on: it is for tests.
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda"):
        return "torch"
    reason = _linear_reason(x, weight, bias, lora_A, lora_B, magnitude, base_sq, axis)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"DoRA backend 'triton' cannot run: {reason}")
    return "torch"


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    axis: str,
    eps: float,
    base_sq: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA layer forward y = W_dora x + bias (math in dora_reference); `backend` in BACKENDS.

    x [..., in]; weight W0 [out, in] (frozen); lora_A [rank, in]; lora_B [out, rank];
    magnitude [in] (axis="input") or [out] (axis="output"); base_sq from `base_sq_norm`,
    computed once per base weight (None: the Triton norm kernel folds it into its pass,
    the reference recomputes it).
    """
    _check_shapes(weight, lora_A, lora_B)
    _check_base_sq(base_sq, weight, axis)
    if resolve_backend(x, weight, bias, lora_A, lora_B, magnitude, axis, backend, base_sq) == "torch":
        return dora_reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale, axis, eps, base_sq)
    norm_op, input_op, output_op = _kernels(x.device)
    # The norm reads the tensors as given (fp32 LoRA masters stay fp32), detached: DoRA
    # treats it as a constant, and the op has no autograd formula.
    norm = norm_op(weight.detach(), lora_A.detach(), lora_B.detach(), base_sq, None, float(scale), axis)
    dtype = linear_compute_dtype(x)
    # Autocast does not cast a custom op's inputs: cast them as it would for F.linear.
    x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
    bias = None if bias is None else bias.to(dtype)
    args = (x, weight, bias, lora_A, lora_B, magnitude.reshape(-1), norm, float(scale), float(eps))
    if axis == "input":
        return input_op(*args)[0]
    return output_op(*args)[0]


def _dequantized(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """W0 in fp32 from float8 data and its scale (one value, or one per output row)."""
    return weight.float() * weight_scale.float().reshape(-1, 1)


def base_sq_norm(weight: torch.Tensor, axis: str, *, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """||W0||^2 per input column ([in]) or output row ([out]), fp32; compute once per base weight.

    weight_scale: scale of a float8 weight, per tensor or [out, 1] per row (W0 = weight * weight_scale)."""
    if weight_scale is not None:
        weight = _dequantized(weight, weight_scale)
    return dora_reference.base_sq_norm(weight, axis)


def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    axis: str,
    base_sq: torch.Tensor | None = None,
    *,
    weight_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """||W0 + s B A|| per input column ([in]) or output row ([out]), fp32, never forming B A.

    weight may be float8_e4m3fn with `weight_scale`, one value or one per output row (W0 = weight * scale);
    the Triton kernel reads it as stored, the reference dequantizes it first. The result
    carries no gradient (DoRA detaches the norm).
    """
    _check_choice(backend, axis)
    _check_shapes(weight, lora_A, lora_B)
    _check_base_sq(base_sq, weight, axis)
    if weight_scale is not None and weight_scale.numel() not in (1, weight.shape[0]):
        raise ValueError(
            f"weight_scale has {weight_scale.numel()} values; a float8 weight needs one scale per tensor or one "
            f"per output row ({weight.shape[0]})"
        )
    if backend == "auto" and weight.device.type != "cuda":
        backend = "torch"
    reason = None if backend == "torch" else _norm_reason(weight, lora_A, lora_B, base_sq, weight_scale)
    if backend == "triton" and reason:
        raise RuntimeError(f"DoRA backend 'triton' cannot run: {reason}")
    if backend == "torch" or reason:
        if weight_scale is not None:
            weight = _dequantized(weight, weight_scale)
        with torch.no_grad():
            return dora_reference.dora_weight_norm(weight, lora_A, lora_B, scale, axis, base_sq)
    norm_op = _kernels(weight.device)[0]
    scale_t = None if weight_scale is None else weight_scale.detach().float().reshape(-1)
    return norm_op(weight.detach(), lora_A.detach(), lora_B.detach(), base_sq, scale_t, float(scale), axis)
