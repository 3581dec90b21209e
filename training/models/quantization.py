"""fp8 storage of frozen base weights: quantise, dequantise, and a Linear that computes in bf16 / fp32.

Two storage formats, both float8_e4m3fn data with float32 scales (W0 = data * scale):
* `fp8_e4m3fn`: one scale per tensor (ComfyUI's scaled_fp8 and comfy_quant layouts);
* `fp8_scaled`: one scale per output row, [out, 1] (musubi-tuner's --fp8_scaled quality:
  a row with small weights is not crushed into the subnormals by another row's outlier).

Scales are absmax / 448, so the largest magnitude maps to e4m3fn's largest finite value and
nothing saturates. Rounding is to nearest; e4m3fn keeps 3 mantissa bits, so every value is
within 2^-4 of itself relatively, or within 2^-10 * scale where it falls into the subnormals
(`FP8_RELATIVE_ERROR`, `FP8_SUBNORMAL_ERROR`).

`Float8Linear` dequantises its weight per call, in the compute dtype, and its autograd
function saves only the fp8 data and the scale: saving the dequantised weight for the
backward (what F.linear would do) would keep a bf16 copy of every layer alive between
forward and backward and give back the memory fp8 saved.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.dora import linear_compute_dtype

FP8_FORMATS = ("fp8_e4m3fn", "fp8_scaled")  # per-tensor scale | per-output-row scale
FP8_DTYPE = torch.float8_e4m3fn
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_RELATIVE_ERROR = 2.0**-4  # half an ulp of a 3-bit mantissa
FP8_SUBNORMAL_ERROR = 2.0**-10  # half the subnormal spacing 2^-9, in units of the scale


QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # fp32 temporaries of 16 MiB, whatever the layer's size


def _row_chunks(weight: torch.Tensor) -> list[slice]:
    rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def quantize_fp8(weight: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn data, float32 scale) of a 2-D weight, weight ~ data * scale; scale [] or [out, 1] (per_row).

    Works through row chunks, so a layer's fp32 temporaries stay small: loading a 12B model
    never holds a float copy of more than one chunk beside the fp8 data it keeps.
    """
    weight = weight.detach()
    chunks = _row_chunks(weight)
    amax = torch.cat([weight[rows].float().abs().amax(dim=1, keepdim=True) for rows in chunks])
    if not per_row:
        amax = amax.amax()
    # An all-zero row or tensor keeps scale 1: its data is exactly 0 either way.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for rows in chunks:
        part_scale = scale[rows] if per_row else scale
        data[rows] = weight[rows].to(torch.float32, copy=True).div_(part_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """data * scale in `dtype`, as ComfyUI computes it (cast first, then scale in the compute dtype)."""
    weight = data.to(dtype)
    return weight if scale is None else weight * scale.to(device=weight.device, dtype=dtype)


def weight_scale_of(module: nn.Module) -> torch.Tensor | None:
    """The scale of a quantised Linear's weight (W0 = weight * scale), or None for a float weight."""
    for attr in ("weight_scale", "scale_weight"):  # ours / ComfyUI's scaled-fp8 name
        scale = getattr(module, attr, None)
        if isinstance(scale, torch.Tensor):
            return scale
    return None


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The live base weight W0 in `dtype` (no copy when it already is that dtype and unscaled)."""
    return dequantize(module.weight, weight_scale_of(module), dtype)


class _Float8LinearFunction(torch.autograd.Function):
    """y = x W0^T + b with W0 dequantised on the fly; saves the fp8 data, not the dequantised weight."""

    @staticmethod
    def forward(ctx, x, data, scale, bias):
        dtype = linear_compute_dtype(x)
        ctx.save_for_backward(data, scale)
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x.to(dtype), dequantize(data, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        data, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(data, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8 data with a float32 `weight_scale` buffer.

    A subclass of nn.Linear, so adapter targeting, hooks and `in_features` / `out_features`
    see an ordinary Linear; the adapters read W0 through `dequantized_weight`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 storage_dtype: torch.dtype = FP8_DTYPE):
        nn.Module.__init__(self)  # nn.Linear's init would allocate and initialise a float weight
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def like(cls, linear: nn.Linear) -> "Float8Linear":
        """An empty Float8Linear of `linear`'s shape, on its device (the meta device while loading)."""
        bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, bias, device=linear.weight.device,
                   dtype=linear.bias.dtype if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        per = "tensor" if self.weight_scale.numel() == 1 else "row"
        return f"{super().extra_repr()}, storage={self.weight.dtype}, scale per {per}"


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the float8 weights and their scales in `model` (logged when a base loads)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Float8Linear):
            total += module.weight.numel() * module.weight.element_size()
            total += module.weight_scale.numel() * module.weight_scale.element_size()
    return total


def quantize_linears(root: nn.Module, names: list[str], fmt: str) -> None:
    """Replace the (materialised) nn.Linear submodules `names` of `root` by Float8Linear holding their
    weights quantised as `fmt`, one layer at a time, so only one layer's float copy is ever extra."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format {fmt!r} is not one of {list(FP8_FORMATS)}")
    for name in names:
        linear = root.get_submodule(name)
        layer = Float8Linear.like(linear)
        data, scale = quantize_fp8(linear.weight, per_row=fmt == "fp8_scaled")
        layer.weight = nn.Parameter(data, requires_grad=False)
        layer.weight_scale = scale
        layer.bias = linear.bias
        root.set_submodule(name, layer)
