"""Pre-quantised checkpoints: which weights a file stores in float8, their scales, and the side keys.

Read formats (W0 = weight * scale, scale 1 where a file has none):
* ComfyUI fp8 e4m3fn / e5m2 files: float8 `.weight` tensors and no scales;
* ComfyUI `scaled_fp8` files: a `scaled_fp8` marker tensor, a per-tensor `<layer>.scale_weight`
  beside each float8 weight, optionally `<layer>.scale_input` (used only by fp8 matmuls of
  the input, so ignored here, as ComfyUI ignores it without fp8 matrix multiplication);
* `comfy_quant` files: `<layer>.comfy_quant` (JSON bytes naming the format) with
  `<layer>.weight_scale` and optionally `<layer>.input_scale`; only the per-tensor
  `float8_e4m3fn` format is read;
* float8 weights with a `<layer>.weight_scale` of one value or one per output row (the
  layout `save_dit` writes for fp8 storage, and other tools').

Anything else quantised (int8, nf4 / fp4 of bitsandbytes, nvfp4 / mxfp8, block-scaled fp8,
GPTQ / AWQ) is named in an error that says what to convert the file to; without this a
quantised file fails later with a misleading missing / unexpected-keys message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .quantization import FLOAT8_DTYPES

SCALED_FP8_MARKER = "scaled_fp8"
READABLE_COMFY_QUANT = ("float8_e4m3fn",)
CONVERT_HINT = ("convert it to bf16 / fp16 (or to ComfyUI's per-tensor float8_e4m3fn / scaled_fp8) and pick fp8 "
                "storage in LoadDiT (weight_dtype) or [model] dtype to quantise while loading")
# Key fragments of quantised layouts this trainer cannot read, and the format they belong to.
FOREIGN_FORMATS = {
    ".absmax": "bitsandbytes nf4 / fp4",
    ".quant_map": "bitsandbytes nf4 / fp4",
    ".quant_state.": "bitsandbytes nf4 / fp4",
    ".qweight": "GPTQ / AWQ int4",
    ".qzeros": "GPTQ / AWQ int4",
    ".weight_scale_2": "nvfp4",
    ".weight_scale_inv": "block-scaled fp8 (DeepSeek style)",
}


@dataclass
class StoredQuantization:
    """The float8 weights of a checkpoint (key -> scale key, '' for unscaled) and the keys that are not weights."""

    scales: dict[str, str] = field(default_factory=dict)
    side_keys: set[str] = field(default_factory=set)  # scales, markers, input scales: not model tensors
    formats: set[str] = field(default_factory=set)  # for the load log line

    def scale(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
        """The fp32 scale of float8 weight `key` ([] or [out, 1]); None for a weight stored as floats."""
        if key not in self.scales:
            return None
        if not self.scales[key]:
            return torch.ones((), dtype=torch.float32)
        scale = read(self.scales[key]).float()
        return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)


def _layer(key: str, suffix: str) -> str:
    return key[: -len(suffix)]


def _comfy_quant_format(key: str, raw: torch.Tensor) -> str:
    try:
        config = json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        return str(config["format"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"'{key}' should hold comfy_quant JSON with a 'format' entry ({error}); the file is "
                         "damaged or written by an incompatible tool") from None


def _check_scale(key: str, scale_key: str, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if scale.numel() in (1, weight.shape[0]):
        return
    raise ValueError(
        f"'{scale_key}' has shape {tuple(scale.shape)} for weight '{key}' {tuple(weight.shape)}: block-scaled "
        f"fp8 is not read here (one scale per tensor or per output row is); {CONVERT_HINT}"
    )


def read_stored_quantization(stand_ins: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                             origin: str) -> StoredQuantization:
    """Classify the float8 weights and quantisation side keys of a checkpoint (meta stand-ins, prefix stripped).

    `read` loads one tensor; only the tiny comfy_quant JSON tensors are read here.
    """
    found = StoredQuantization()
    for key in stand_ins:
        for fragment, name in FOREIGN_FORMATS.items():
            if fragment in key:
                raise ValueError(f"{origin} is quantised as {name} ('{key}'), which cannot be trained on here; "
                                 f"{CONVERT_HINT}")
    for key, tensor in stand_ins.items():
        if key == SCALED_FP8_MARKER:
            found.side_keys.add(key)
            found.formats.add("ComfyUI scaled_fp8")
        elif key.endswith((".scale_input", ".input_scale")):
            found.side_keys.add(key)  # activation scales: only fp8 matmuls of the input use them
        elif key.endswith(".comfy_quant"):
            found.side_keys.add(key)
            layer = _layer(key, ".comfy_quant")
            fmt = _comfy_quant_format(key, read(key))
            if fmt not in READABLE_COMFY_QUANT:
                raise ValueError(f"{origin}: layer '{layer}' is stored in the comfy_quant format '{fmt}'; only "
                                 f"{list(READABLE_COMFY_QUANT)} (per-tensor scale) is read; {CONVERT_HINT}")
            found.formats.add(f"comfy_quant {fmt}")
        elif key.endswith(".weight") and tensor.dtype in (torch.int8, torch.uint8):
            raise ValueError(f"{origin}: '{key}' is stored as {tensor.dtype} (an int8 / 4-bit quantised file), "
                             f"which cannot be trained on here; {CONVERT_HINT}")
    for key, tensor in stand_ins.items():
        if not (key.endswith(".weight") and tensor.dtype in FLOAT8_DTYPES):
            continue
        layer = _layer(key, ".weight")
        scale_key = next((f"{layer}{suffix}" for suffix in (".scale_weight", ".weight_scale")
                          if f"{layer}{suffix}" in stand_ins), "")
        if scale_key:
            _check_scale(key, scale_key, tensor, stand_ins[scale_key])
            found.side_keys.add(scale_key)
        if tensor.ndim != 2:
            raise ValueError(f"{origin}: '{key}' is a float8 tensor of shape {tuple(tensor.shape)}; only Linear "
                             f"weights ([out, in]) are read as float8; {CONVERT_HINT}")
        found.scales[key] = scale_key
        if not found.formats:
            found.formats.add(f"ComfyUI fp8 {str(tensor.dtype).removeprefix('torch.float8_')}")
    orphans = sorted(key for key in stand_ins if key.endswith((".scale_weight", ".weight_scale"))
                     and key not in found.side_keys)
    if orphans:
        raise ValueError(f"{origin}: scales {orphans[:5]} have no float8 weight beside them (a scaled file whose "
                         f"weights were cast back to floats?); {CONVERT_HINT}")
    return found
