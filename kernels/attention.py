"""Attention entry point used by every model in the engine.

Layout contract: q, k, v are [batch, tokens, heads, head_dim]; the result has the
same layout. `key_mask` is an optional [batch, tokens] bool tensor, True where a key
may be attended to.

Backends, in the order "auto" tries them:
  "cute"   FlashAttention-4 (package flash-attn-4, CuTe DSL kernels, `flash_attn.cute`):
           Hopper (sm90) and Blackwell (sm100), fp16 / bf16, head_dim in CUTE_HEAD_DIMS.
  "flash"  flash-attn 2 (`flash_attn.flash_attn_func`): Ampere / Ada / Hopper (sm8x, sm9x),
           fp16 / bf16, head_dim <= 256 and a multiple of 8.
  "sdpa"   torch.nn.functional.scaled_dot_product_attention: everything else.
The two flash packages are separate extras ([cuda] and [flash2]) because flash-attn 2.8
ships an early flash_attn/cute that collides with flash-attn-4's files.

"auto" falls back silently; an explicit "cute" / "flash" that cannot run raises with
what is missing and how to install it. The choice is logged once per backend and device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cute", "flash", "sdpa")

# FA4's forward and backward both cover these on sm90 and sm100 (the three target models
# use 128); other sizes go to flash-attn 2 or SDPA.
CUTE_HEAD_DIMS = (64, 96, 128)
FLASH_MAX_HEAD_DIM = 256

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_PACKAGES = {
    "cute": ("flash-attn-4", "pip install comfyui-dit-trainer[cuda]  (Hopper / Blackwell)"),
    "flash": ("flash-attn 2", "pip install comfyui-dit-trainer[flash2]  (Ampere / Ada / Hopper)"),
}
_logged: set[tuple[str, str]] = set()


@functools.cache
def _flash_fn(backend: str) -> Callable | None:
    """flash_attn_func of the package behind `backend`, or None when it does not import."""
    try:
        if backend == "cute":
            from flash_attn.cute import flash_attn_func
        else:
            from flash_attn import flash_attn_func
    # A wheel built for another CUDA or torch fails with OSError / RuntimeError, not only
    # ImportError; any failure means the backend is not usable here.
    except Exception:
        return None
    return flash_attn_func


@torch.compiler.assume_constant_result
def available_backends() -> tuple[str, ...]:
    """Backends whose package imports on this machine ("sdpa" always); imports on first call."""
    return tuple(name for name in ("cute", "flash") if _flash_fn(name) is not None) + ("sdpa",)


def _sm(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _unsupported(
    backend: str,
    device: torch.device,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    installed: Collection[str],
) -> str | None:
    """Why `backend` cannot run for these inputs (all reasons, '; '-joined), or None."""
    reasons = []
    package, install = _PACKAGES[backend]
    if backend not in installed:
        reasons.append(f"the {package} package is not importable; install it with `{install}`")
    if device.type != "cuda" or capability is None:
        reasons.append(f"it needs a CUDA device, the tensors are on {device}")
    elif backend == "cute" and capability[0] not in (9, 10):
        reasons.append(f"it needs compute capability 9.x or 10.x (Hopper / Blackwell), this GPU is {_sm(capability)}")
    elif backend == "flash" and capability[0] not in (8, 9):
        reasons.append(f"it needs compute capability 8.x or 9.x (Ampere / Ada / Hopper), this GPU is {_sm(capability)}")
    if dtype not in _FLASH_DTYPES:
        reasons.append(f"it needs float16 or bfloat16 inputs, got {dtype}")
    if backend == "cute" and head_dim not in CUTE_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} is not one of {CUTE_HEAD_DIMS}")
    if backend == "flash" and (head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8):
        reasons.append(f"head_dim {head_dim} is not a multiple of 8 up to {FLASH_MAX_HEAD_DIM}")
    return "; ".join(reasons) or None


@torch.compiler.assume_constant_result
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def select_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    requested: str = "auto",
    *,
    capability: tuple[int, int] | None = None,
    installed: Collection[str] | None = None,
    masked: bool = False,
) -> str:
    """The backend `attention` runs: "cute", "flash" or "sdpa".

    capability (the CUDA compute capability) and installed (as `available_backends()`)
    are looked up when None; pass them to decide for a machine you are not on. An
    explicit request that cannot run raises RuntimeError naming the reasons and the fix.
    masked: a key mask is given. The flash backends then defer to SDPA (with a boolean
    mask) because padded keys would need the varlen entry points, which this does not use.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    if requested == "sdpa":
        return "sdpa"
    device = torch.device(device)
    if capability is None:
        capability = _capability(device)
    if installed is None:
        installed = available_backends()
    for name in ("cute", "flash") if requested == "auto" else (requested,):
        reason = _unsupported(name, device, capability, dtype, head_dim, installed)
        if reason is not None and requested != "auto":
            raise RuntimeError(f"attention backend {name!r} cannot run: {reason}")
        if reason is None:
            return "sdpa" if masked else name
    return "sdpa"


def _log_choice(backend: str, device: torch.device) -> None:
    key = (backend, str(device))
    if key not in _logged:
        _logged.add(key)
        logger.info("attention backend: %s on %s", backend, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over [B, L, H, D] tensors; `backend` in BACKENDS."""
    chosen = select_backend(q.device, q.dtype, q.shape[-1], backend, masked=key_mask is not None)
    # Logging inside a traced region would break the graph; eager calls log.
    if not torch.compiler.is_compiling():
        _log_choice(chosen, q.device)
    if chosen != "sdpa":
        out = _flash_fn(chosen)(q, k, v)
        # flash-attn-4 returns (out, lse); flash-attn 2 returns out.
        return out[0] if isinstance(out, tuple) else out
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )  # (B, H, L, D)
    return out.transpose(1, 2)
