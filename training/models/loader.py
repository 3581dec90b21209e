"""Load and save DiT base models from safetensors, in ComfyUI's module layout.

A base checkpoint arrives as a ComfyUI single file (DiT keys under
`model.diffusion_model.`, next to VAE / text-encoder keys), a bare diffusion-model
file, or the official / diffusers split layout. All are normalised to ComfyUI's
layout, which our model classes use, so adapters trained here load in ComfyUI
without renaming.

Only safetensors are read: pickled checkpoints (.ckpt / .pt / .bin) run code when
unpickled, and a node must never do that with a file someone downloaded.

Loading streams, so a 12B model never needs two copies in host RAM: the checkpoint
is first seen as meta-device stand-ins (names, shapes, dtypes from the header; no
data), which give the architecture, the config and the strict key / shape check;
the model is built on the meta device; then each ComfyUI-layout tensor is read
(safetensors maps the file lazily), fused where the layout needs it, hashed, cast
and assigned before the next one is touched. A tensor that needs neither fusing
nor a cast stays a view of the mapped file (page cache the OS can reclaim), so
only fused and cast tensors take new memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from ..storage import atomic_save_safetensors, open_safetensors
from .blocks import block_linear_names
from .flux import FluxConfig, FluxDiT
from .flux_layouts import (
    ARCHITECTURE_OF_FAMILY,
    FLUX1_MARKERS,
    FLUX1_MARKERS_DIFFUSERS,
    FLUX2_MARKER,
    FLUX2_MARKER_DIFFUSERS,
    LayoutPlan,
    apply_plan,
    as_stored,
    concat_rows,
    flux_config_from_shapes,
    flux_family,
    flux_variant,
    is_flux1,
    is_flux2,
    plan_comfy_layout_flux,
)
from .quantization import FP8_FORMATS, Float8Linear, dequantize, quantize_fp8
from .qwen_image import QwenImageConfig, QwenImageDiT
from .qwen_layouts import (
    QWEN_IMAGE_MARKERS,
    is_qwen_image,
    plan_comfy_layout_qwen,
    qwen_config_from_shapes,
    qwen_variant,
)
from .stored_quantization import StoredQuantization, read_stored_quantization
from .zimage import ZImageConfig, ZImageDiT, default_axes_dims

T = TypeVar("T")

# Only the first match counts, and none is a prefix of another.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
COMFY_PREFIX = "model.diffusion_model."
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# safetensors header dtype names -> torch dtypes, for the meta-device stand-ins.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
KEY_SAMPLE = 20  # keys quoted in error messages
RESERVED_METADATA = ("architecture", "config")


# --- prefixes ---------------------------------------------------------------


def _model_prefix(keys: Iterable[str]) -> str:
    """The known prefix carried by the most keys; '' when no key carries one.

    A known prefix wins even over a majority of other keys: a ComfyUI single file of a
    small DiT (Flux.2 klein: ~150 keys) next to an LLM text encoder (~400) and a VAE
    still holds its DiT under `model.diffusion_model.`.
    """
    counts = dict.fromkeys(MODEL_PREFIXES, 0)
    for key in keys:
        if prefix := next((p for p in MODEL_PREFIXES if key.startswith(p)), None):
            counts[prefix] += 1
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else ""


def strip_prefix(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Remove the diffusion-model prefix that most keys carry.

    Keys without it (a ComfyUI single file's `first_stage_model.` VAE or
    `text_encoders.` weights) are dropped: they are not part of the DiT.
    """
    prefix = _model_prefix(state_dict)
    if not prefix:
        return dict(state_dict)
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


# --- Z-Image key layouts ----------------------------------------------------

_SPLIT_ATTENTION = re.compile(r"^(.+\.attention)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.weight$")
_FUSED_ATTENTION = re.compile(r"^(.+\.attention)\.(qkv|out|q_norm|k_norm)\.weight$")
_SPLIT_PATCH = re.compile(r"^all_(x_embedder|final_layer)\.(\d+)-(\d+)\.(.+)$")
_SPLIT_TO_FUSED = {"to_out.0": "out", "norm_q": "q_norm", "norm_k": "k_norm"}
_FUSED_TO_SPLIT = {fused: split for split, fused in _SPLIT_TO_FUSED.items()}
_QKV = ("to_q", "to_k", "to_v")


def _split_patch_size(keys: Iterable[str]) -> int | None:
    """Patch size named by split-layout keys (`all_x_embedder.2-1.*`); None for fused keys."""
    found = {match.group(2, 3) for key in keys if (match := _SPLIT_PATCH.match(key))}
    if not found:
        return None
    names = sorted("-".join(pair) for pair in found)
    if len(found) > 1 or names[0].split("-")[1] != "1":
        raise ValueError(
            f"split checkpoint has patch embedders {names}; only one '<patch>-1' "
            "(image, frame patch 1) embedder is supported - keep that one and drop the others"
        )
    return int(names[0].split("-")[0])


def _claim(plan: LayoutPlan, key: str, sources: tuple[str, ...], combine: Callable, source: str) -> None:
    if key in plan:
        raise ValueError(
            f"'{source}' maps to '{key}', which is already present: the checkpoint mixes fused and split "
            "layouts; keep one copy of each weight"
        )
    plan[key] = (sources, combine)


def plan_comfy_layout_zimage(keys: Iterable[str]) -> LayoutPlan:
    """Layout plan: official / diffusers split keys -> ComfyUI fused keys; fused keys unchanged."""
    keys = list(keys)
    _split_patch_size(keys)  # rejects several patch embedders before they collide
    plan: LayoutPlan = {}
    qkv_parts: dict[str, set[str]] = {}
    for key in keys:
        if match := _SPLIT_ATTENTION.match(key):
            base, name = match.groups()
            if name in _QKV:
                qkv_parts.setdefault(base, set()).add(name)
                continue
            _claim(plan, f"{base}.{_SPLIT_TO_FUSED[name]}.weight", (key,), as_stored, key)
        elif match := _SPLIT_PATCH.match(key):
            module, _, _, rest = match.groups()
            _claim(plan, f"{module}.{rest}", (key,), as_stored, key)
        else:
            _claim(plan, key, (key,), as_stored, key)
    for base, names in qkv_parts.items():
        missing = [f"{base}.{name}.weight" for name in _QKV if name not in names]
        if missing:
            raise ValueError(f"split attention weights {missing} are missing; the checkpoint is incomplete")
        sources = tuple(f"{base}.{name}.weight" for name in _QKV)
        _claim(plan, f"{base}.qkv.weight", sources, concat_rows, sources[0])
    return plan


def to_comfy_layout_zimage(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / diffusers split keys -> ComfyUI fused keys; fused keys pass through unchanged."""
    return apply_plan(plan_comfy_layout_zimage(state_dict), state_dict)


def to_split_layout_zimage(state_dict: Mapping[str, torch.Tensor], patch_size: int = 2) -> dict[str, torch.Tensor]:
    """ComfyUI fused keys -> official / diffusers split keys (inverse of `to_comfy_layout_zimage`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if match := _FUSED_ATTENTION.match(key):
            base, name = match.groups()
            if name == "qkv":
                # Clones, not views: safetensors refuses to save tensors sharing storage.
                for part, chunk in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"{base}.{part}.weight"] = chunk.clone()
                continue
            key = f"{base}.{_FUSED_TO_SPLIT[name]}.weight"
        elif key.startswith(("x_embedder.", "final_layer.")):
            module, rest = key.split(".", 1)
            key = f"all_{module}.{patch_size}-1.{rest}"
        out[key] = value
    return out


# --- Z-Image config inference -----------------------------------------------

# Hyper-parameters that tensor shapes cannot reveal; read from checkpoint metadata.
_ZIMAGE_HINTS = ("axes_dims", "rope_theta", "t_scale", "patch_size", "norm_eps")


def _metadata_hints(
    metadata: Mapping[str, Any] | None, names: Iterable[str], architecture: str, text: Iterable[str] = ()
) -> dict[str, Any]:
    """Values for `names` from metadata: top-level keys over save_dit's JSON `config`.

    `config` is only trusted next to a matching `architecture` entry (save_dit writes
    both): other tools use the key for unrelated data. safetensors metadata values
    are strings, so strings are JSON-decoded, except those of the `text` names, which
    are plain words (a release name).
    """
    metadata = metadata or {}
    own_config = metadata.get("architecture") == architecture
    text = set(text)
    hints: dict[str, Any] = {}
    for key in ("config", *names) if own_config else names:
        if key not in metadata:
            continue
        value = metadata[key]
        if isinstance(value, str) and key not in text:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"metadata '{key}' = {value!r} is not valid JSON ({error}); fix or remove it"
                ) from None
        if key != "config":
            hints[key] = value
        elif isinstance(value, Mapping):
            hints.update({name: value[name] for name in names if name in value})
        else:
            raise ValueError(f"metadata 'config' should be a JSON object, got {value!r}; re-save the checkpoint")
    return hints


def _layer_count(keys: Iterable[str], stack: str) -> int:
    indices = {int(match.group(1)) for key in keys if (match := re.match(rf"^{stack}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _shape(state_dict: Mapping[str, torch.Tensor], *candidates: str) -> torch.Size:
    """Shape of the first candidate key present (fused and split layouts name things differently)."""
    for key in candidates:
        if key in state_dict:
            return state_dict[key].shape
    raise ValueError(f"Z-Image checkpoint has none of {list(candidates)}; the file is incomplete or not Z-Image")


def infer_zimage_config(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> ZImageConfig:
    """Z-Image hyper-parameters from tensor shapes (either layout, prefix stripped) plus metadata.

    Shapes give the widths and depths; `axes_dims`, `rope_theta`, `t_scale`,
    `patch_size` and `norm_eps` come from metadata when present, else defaults.
    """
    hints = _metadata_hints(metadata, _ZIMAGE_HINTS, architecture="zimage")
    split_patch = _split_patch_size(state_dict)
    patch_size = int(hints.get("patch_size", split_patch or 2))
    embed_key = f"all_x_embedder.{split_patch}-1.weight" if split_patch else "x_embedder.weight"
    dim, patch_features = _shape(state_dict, embed_key)
    if patch_features % (patch_size * patch_size):
        raise ValueError(
            f"'{embed_key}' has {patch_features} input features, not a multiple of patch_size {patch_size}^2; "
            "set the 'patch_size' metadata to the checkpoint's real patch size"
        )
    n_refiner_layers = _layer_count(state_dict, "noise_refiner")
    if _layer_count(state_dict, "context_refiner") != n_refiner_layers:
        raise ValueError(
            f"noise_refiner has {n_refiner_layers} blocks but context_refiner has "
            f"{_layer_count(state_dict, 'context_refiner')}; Z-Image needs equal counts"
        )
    head_dim = _shape(state_dict, "layers.0.attention.q_norm.weight", "layers.0.attention.norm_q.weight")[0]
    t_mid_dim, t_freq_dim = _shape(state_dict, "t_embedder.mlp.0.weight")
    defaults = ZImageConfig()
    return ZImageConfig(
        in_channels=patch_features // (patch_size * patch_size),
        patch_size=patch_size,
        dim=dim,
        n_layers=_layer_count(state_dict, "layers"),
        n_refiner_layers=n_refiner_layers,
        n_heads=dim // head_dim,
        ffn_dim=_shape(state_dict, "layers.0.feed_forward.w1.weight")[0],
        cap_feat_dim=_shape(state_dict, "cap_embedder.0.weight")[0],
        t_freq_dim=t_freq_dim,
        t_mid_dim=t_mid_dim,
        norm_eps=float(hints.get("norm_eps", defaults.norm_eps)),
        rope_theta=float(hints.get("rope_theta", defaults.rope_theta)),
        t_scale=float(hints.get("t_scale", defaults.t_scale)),
        axes_dims=[int(d) for d in hints.get("axes_dims", default_axes_dims(head_dim))],
    )


def _is_zimage(keys: set[str]) -> bool:
    # Lumina 2 shares these module names but has no pad tokens.
    attention = {"layers.0.attention.qkv.weight", "layers.0.attention.to_q.weight"}
    return {"cap_embedder.1.weight", "x_pad_token", "cap_pad_token"} <= keys and bool(attention & keys)


# --- Flux config inference ----------------------------------------------------

# Hyper-parameters that tensor shapes cannot reveal; read from checkpoint metadata.
_FLUX_HINTS = ("axes_dim", "theta", "patch_size")


def infer_flux_config(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> FluxConfig:
    """Flux.1 / Flux.2 hyper-parameters from tensor shapes (either layout, prefix stripped) plus metadata.

    Shapes give family, widths, depths and the optional embedders; `axes_dim`, `theta`
    and `patch_size` come from metadata when present, else the family's released values.
    """
    stand_ins = {key: tensor.to("meta") for key, tensor in state_dict.items()}  # shapes only, nothing copied
    comfy = apply_plan(plan_comfy_layout_flux(stand_ins), stand_ins)
    architecture = ARCHITECTURE_OF_FAMILY[flux_family(comfy)]
    return flux_config_from_shapes(comfy, _metadata_hints(metadata, _FLUX_HINTS, architecture))


# --- Qwen-Image config inference ---------------------------------------------

# Hyper-parameters that tensor shapes cannot reveal; read from checkpoint metadata.
_QWEN_HINTS = ("axes_dim", "theta", "patch_size", "zero_cond_t", "variant")


def infer_qwen_config(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> QwenImageConfig:
    """Qwen-Image / Qwen-Image-Edit hyper-parameters from tensor shapes (prefix stripped) plus metadata.

    Shapes give widths and depth; `axes_dim`, `theta`, `patch_size` and `zero_cond_t`
    come from metadata when present, else the released values. An Edit-2511 checkpoint
    has Qwen-Image's shapes: its `zero_cond_t` comes from ComfyUI's
    `__index_timestep_zero__` marker tensor, a `zero_cond_t` entry or a `variant` entry
    naming the release (e.g. "qwen-image-edit-2511").
    """
    hints = _metadata_hints(metadata, _QWEN_HINTS, architecture="qwen_image", text=("variant",))
    return qwen_config_from_shapes(state_dict, hints)


# --- architecture table -----------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How to recognise, normalise and build one DiT family."""

    signature: str  # human-readable, quoted when nothing matches
    matches: Callable[[set[str]], bool]
    plan_layout: Callable[[Iterable[str]], LayoutPlan]  # checkpoint keys -> how to build ComfyUI-layout tensors
    infer_config: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any] | None], Any]
    model_class: Callable[[Any], nn.Module]
    variant: Callable[[Any], str]  # the released model a config matches, for messages and metadata


ARCHITECTURES: dict[str, Architecture] = {
    "zimage": Architecture(
        signature="cap_embedder.1.weight, x_pad_token, cap_pad_token, layers.0.attention.qkv.weight (or .to_q.weight)",
        matches=_is_zimage,
        plan_layout=plan_comfy_layout_zimage,
        infer_config=infer_zimage_config,
        model_class=ZImageDiT,
        variant=lambda cfg: "zimage",
    ),
    "flux": Architecture(
        signature=f"{', '.join(FLUX1_MARKERS)} (diffusers: {', '.join(FLUX1_MARKERS_DIFFUSERS)}) "
        f"and no {FLUX2_MARKER}",
        matches=is_flux1,
        plan_layout=plan_comfy_layout_flux,
        infer_config=infer_flux_config,
        model_class=FluxDiT,
        variant=flux_variant,
    ),
    "flux2": Architecture(
        signature=f"{FLUX2_MARKER} (diffusers: {FLUX2_MARKER_DIFFUSERS})",
        matches=is_flux2,
        plan_layout=plan_comfy_layout_flux,
        infer_config=infer_flux_config,
        model_class=FluxDiT,
        variant=flux_variant,
    ),
    "qwen_image": Architecture(
        signature=", ".join(QWEN_IMAGE_MARKERS),
        matches=is_qwen_image,
        plan_layout=plan_comfy_layout_qwen,
        infer_config=infer_qwen_config,
        model_class=QwenImageDiT,
        variant=qwen_variant,
    ),
}


def detect_architecture(keys: Iterable[str]) -> str:
    """Name of the architecture whose signature keys are present (prefix already stripped)."""
    keys = list(keys)
    key_set = set(keys)
    for name, arch in ARCHITECTURES.items():
        if arch.matches(key_set):
            return name
    supported = "; ".join(f"{name}: {arch.signature}" for name, arch in ARCHITECTURES.items())
    raise ValueError(
        f"unrecognised DiT checkpoint ({len(keys)} keys, first {min(len(keys), KEY_SAMPLE)}: "
        f"{keys[:KEY_SAMPLE]}). Supported architectures and their signature keys - {supported}. "
        "Pass the diffusion model itself, not a VAE, text encoder or LoRA file."
    )


# --- hashing, reading, loading ----------------------------------------------


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 over sorted key names, dtypes, shapes and bytes.

    Computed on the ComfyUI-layout state dict before any dtype cast, so the same
    weights hash alike whatever their file layout, prefix or load dtype. `load_dit`
    computes the same digest tensor by tensor while it streams.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        _hash_tensor(digest, key, state_dict[key])
    return digest.hexdigest()[:16]


def _stand_in(shape: list[int], dtype_name: str, key: str) -> torch.Tensor:
    if dtype_name not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor '{key}' has dtype {dtype_name}, which the loader cannot hold; convert the file")
    return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype_name], device="meta")


@contextlib.contextmanager
def _open_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
) -> Iterator[tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor], dict[str, str], str]]:
    """(meta-device stand-ins of the DiT tensors, a reader of one tensor, file metadata, origin for messages).

    Keys are prefix-stripped. A file is read only through the reader, one tensor at a
    time, and only the DiT's tensors: a single file also holds the VAE and text encoder.
    """
    if isinstance(source, Mapping):
        tensors = strip_prefix(source)
        yield {key: tensor.to("meta") for key, tensor in tensors.items()}, tensors.__getitem__, {}, "state dict"
        return
    if Path(source).suffix.lower() == ".gguf":
        raise ValueError(f"'{source}' is a GGUF (llama.cpp-quantised) file; only safetensors files are read: use "
                         "the bf16 / fp16 safetensors release, or ComfyUI's fp8 one, and pick fp8 storage to save memory")
    with open_safetensors(Path(source), "checkpoint") as handle:
        prefix = _model_prefix(handle.keys())
        stand_ins = {}
        for key in handle.keys():
            if key.startswith(prefix):
                header = handle.get_slice(key)
                stand_ins[key[len(prefix) :]] = _stand_in(header.get_shape(), header.get_dtype(), key)
        yield stand_ins, lambda key: handle.get_tensor(prefix + key), dict(handle.metadata() or {}), f"'{source}'"


def _check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    """Strict-load check with errors that name the offending keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{origin} does not fit {type(model).__name__}: missing keys {missing[:KEY_SAMPLE]} "
            f"({len(missing)} total), unexpected keys {unexpected[:KEY_SAMPLE]} ({len(unexpected)} total). "
            "The file is truncated, belongs to another model variant, or carries extra weights (e.g. a merged LoRA)."
        )
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise ValueError(
                f"{origin}: '{key}' has shape {tuple(state_dict[key].shape)} but the inferred config "
                f"needs {tuple(tensor.shape)}; check the metadata (axes_dims, patch_size) against the weights"
            )


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the meta-device parameter or buffer `key` (a view, no copy)."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, name, tensor)


def _float8_layers(model: nn.Module, plan: LayoutPlan, stored: StoredQuantization, quantize: str | None) -> set[str]:
    """Linear layers to hold in float8: those a file stores so (kept as stored), plus, with
    `quantize`, every Linear of the transformer blocks."""
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    as_is = {key.removesuffix(".weight") for key, (sources, combine) in plan.items()
             if key.endswith(".weight") and combine is as_stored and sources[0] in stored.scales}
    chosen = as_is & linears
    if quantize:
        chosen |= set(block_linear_names(model))
    return chosen


def _use_float8_linears(model: nn.Module, names: set[str]) -> None:
    """Replace the (meta-device) nn.Linear modules `names` by empty Float8Linear ones."""
    for name in names:
        model.set_submodule(name, Float8Linear.like(model.get_submodule(name)))


def _read_weights(key: str, sources: tuple[str, ...], combine: Callable, read: Callable, stored: StoredQuantization,
                  digest: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, scale) of ComfyUI-layout `key`, hashed as stored: float8 data with its scale when
    the file stores it so as is, else the (dequantised, fused) floats and None."""
    parts = [read(source) for source in sources]
    scales = [stored.scale(source, read) for source in sources]
    if all(scale is None for scale in scales):
        tensor = combine(parts)  # split parts are dropped right after fusing
        _hash_tensor(digest, key, tensor)  # of the stored weights, before any cast
        return tensor, None
    for source, part, scale in zip(sources, parts, scales):
        _hash_tensor(digest, source, part)
        if scale is not None:
            _hash_tensor(digest, f"{source}.weight_scale", scale)
    if combine is as_stored:
        return parts[0], scales[0]
    # Fusing float8 parts with different scales: fuse their fp32 values instead.
    return combine([part if scale is None else dequantize(part, scale, torch.float32)
                    for part, scale in zip(parts, scales)]), None


def load_dit(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    quantize: str | None = None,
) -> nn.Module:
    """Build a frozen, eval-mode DiT from a .safetensors file or an in-memory state dict.

    `metadata` adds hyper-parameter hints (e.g. `axes_dims`) over the file's own
    `__metadata__`. The model gets `source_metadata` (the merged metadata), `variant`
    (the released model its shapes match, e.g. "flux1-dev") and `base_hash` (see
    `weights_hash`), which ties adapters to these base weights. Tensors that need no
    fusing or cast are shared with the source (a state dict's tensors, or the mapped
    file), not copied.

    `quantize` ("fp8_e4m3fn": per-tensor scale, "fp8_scaled": per-row scales) stores the
    Linear weights of the transformer blocks in float8, quantised tensor by tensor as they
    are read, so no full-precision copy of the model ever exists; everything else is held
    in `dtype`, which is also the compute dtype of the float8 layers. Weights a file stores
    in float8 (ComfyUI fp8 / scaled_fp8 / comfy_quant files) stay float8 as stored, with or
    without `quantize`. The base hash is of the stored tensors (and scales), whatever the
    storage chosen here.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {list(LOAD_DTYPES)}")
    if quantize not in (None, *FP8_FORMATS):
        raise ValueError(f"quantize {quantize!r} is not one of {list(FP8_FORMATS)} (or None for {dtype} storage)")
    with _open_checkpoint(source) as (stand_ins, read, file_metadata, origin):
        merged_metadata = {**file_metadata, **(metadata or {})}
        stored = read_stored_quantization(stand_ins, read, origin)
        stand_ins = {key: tensor for key, tensor in stand_ins.items() if key not in stored.side_keys}
        arch = ARCHITECTURES[detect_architecture(stand_ins)]
        config = arch.infer_config(stand_ins, merged_metadata)  # before conversion: split keys name the patch size
        variant = arch.variant(config)
        plan = arch.plan_layout(stand_ins)
        with torch.device("meta"):  # no memory for weights about to be replaced
            model = arch.model_class(config)
        _check_keys(model, apply_plan(plan, stand_ins), f"{origin} ({variant})")  # shapes only, nothing read yet
        float8_layers = _float8_layers(model, plan, stored, quantize)
        _use_float8_linears(model, float8_layers)

        digest = hashlib.sha256()
        per_row = quantize != "fp8_e4m3fn"
        for key in sorted(plan):  # weights_hash's order
            tensor, scale = _read_weights(key, *plan[key], read, stored, digest)
            layer = key.removesuffix(".weight")
            if key.endswith(".weight") and layer in float8_layers:
                # Kept as stored, or quantised now on the target device: no full-precision model ever exists.
                data, scale = (tensor, scale) if scale is not None else quantize_fp8(tensor.to(device), per_row)
                _assign(model, key, data.to(device))
                _assign(model, f"{layer}.weight_scale", scale.to(device))
            else:
                if scale is not None:
                    tensor = dequantize(tensor, scale, torch.float32)
                cast = dtype if tensor.is_floating_point() else None  # as nn.Module.to casts
                _assign(model, key, tensor.to(device=device, dtype=cast))
            del tensor  # the next tensor needs this one's memory, not a second copy

    left_on_meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left_on_meta:
        raise ValueError(
            f"{type(model).__name__} holds tensors that are not in its state dict and so were never loaded: "
            f"{left_on_meta[:KEY_SAMPLE]}; the model class must create them in forward or register them as "
            "persistent buffers"
        )
    model.requires_grad_(False)
    model.eval()
    model.source_metadata = merged_metadata
    model.variant = variant
    model.base_hash = digest.hexdigest()[:16]
    model.stored_quantization = sorted(stored.formats)
    return model


def save_dit(model: nn.Module, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> None:
    """Write `model` as a ComfyUI single-file diffusion model (keys under `model.diffusion_model.`).

    Metadata records the architecture and the JSON config, so `load_dit` rebuilds
    hyper-parameters shapes cannot show (axes_dims, rope_theta, ...). The write is
    atomic: a crash never leaves a half-written checkpoint under `path`.
    """
    extra = dict(extra_metadata or {})
    reserved = [key for key in RESERVED_METADATA if key in extra]
    if reserved:
        raise ValueError(f"extra_metadata keys {reserved} are written by save_dit itself; rename them")
    file_metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()}
    file_metadata["architecture"] = model.architecture
    file_metadata["config"] = json.dumps(model.cfg.to_dict())
    tensors = {COMFY_PREFIX + key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}

    atomic_save_safetensors(tensors, path, file_metadata)
