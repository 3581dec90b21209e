"""Load and save DiT base models from safetensors, in ComfyUI's module layout.

A base checkpoint arrives as a ComfyUI single file (DiT keys under
`model.diffusion_model.`, next to VAE / text-encoder keys), a bare diffusion-model
file, or the official / diffusers split layout. All are normalised to ComfyUI's
layout, which our model classes use, so adapters trained here load in ComfyUI
without renaming.

Only safetensors are read: pickled checkpoints (.ckpt / .pt / .bin) run code when
unpickled, and a node must never do that with a file someone downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from ..storage import atomic_save_safetensors, open_safetensors
from .zimage import ZImageConfig, ZImageDiT, default_axes_dims

T = TypeVar("T")

# Only the first match counts, and none is a prefix of another.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
COMFY_PREFIX = "model.diffusion_model."
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KEY_SAMPLE = 20  # keys quoted in error messages
RESERVED_METADATA = ("architecture", "config")


# --- prefixes ---------------------------------------------------------------


def _model_prefix(keys: Iterable[str]) -> str:
    """The known prefix carried by the most keys; '' when bare keys are the majority."""
    counts = dict.fromkeys(("", *MODEL_PREFIXES), 0)
    for key in keys:
        counts[next((p for p in MODEL_PREFIXES if key.startswith(p)), "")] += 1
    return max(counts, key=counts.__getitem__)  # a tie keeps the earlier entry: bare keys


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


def _put(out: dict[str, T], key: str, value: T, source: str) -> None:
    if key in out:
        raise ValueError(
            f"'{source}' maps to '{key}', which is already present: the checkpoint mixes fused and split "
            "layouts; keep one copy of each weight"
        )
    out[key] = value


def to_comfy_layout_zimage(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / diffusers split keys -> ComfyUI fused keys; fused keys pass through unchanged."""
    _split_patch_size(state_dict)  # rejects several patch embedders before they collide
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := _SPLIT_ATTENTION.match(key):
            base, name = match.groups()
            if name in _QKV:
                qkv_parts.setdefault(base, {})[name] = value
                continue
            _put(out, f"{base}.{_SPLIT_TO_FUSED[name]}.weight", value, key)
        elif match := _SPLIT_PATCH.match(key):
            module, _, _, rest = match.groups()
            _put(out, f"{module}.{rest}", value, key)
        else:
            _put(out, key, value, key)
    for base, parts in qkv_parts.items():
        missing = [f"{base}.{name}.weight" for name in _QKV if name not in parts]
        if missing:
            raise ValueError(f"split attention weights {missing} are missing; the checkpoint is incomplete")
        _put(out, f"{base}.qkv.weight", torch.cat([parts[name] for name in _QKV], dim=0), f"{base}.to_q.weight")
    return out


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


def _metadata_hints(metadata: Mapping[str, Any] | None, names: Iterable[str], architecture: str) -> dict[str, Any]:
    """Values for `names` from metadata: top-level keys over save_dit's JSON `config`.

    `config` is only trusted next to a matching `architecture` entry (save_dit writes
    both): other tools use the key for unrelated data. safetensors metadata values
    are strings, so strings are JSON-decoded.
    """
    metadata = metadata or {}
    own_config = metadata.get("architecture") == architecture
    hints: dict[str, Any] = {}
    for key in ("config", *names) if own_config else names:
        if key not in metadata:
            continue
        value = metadata[key]
        if isinstance(value, str):
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


# --- architecture table -----------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How to recognise, normalise and build one DiT family."""

    signature: str  # human-readable, quoted when nothing matches
    matches: Callable[[set[str]], bool]
    to_comfy_layout: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    infer_config: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any] | None], Any]
    model_class: Callable[[Any], nn.Module]


ARCHITECTURES: dict[str, Architecture] = {
    "zimage": Architecture(
        signature="cap_embedder.1.weight, x_pad_token, cap_pad_token, layers.0.attention.qkv.weight (or .to_q.weight)",
        matches=_is_zimage,
        to_comfy_layout=to_comfy_layout_zimage,
        infer_config=infer_zimage_config,
        model_class=ZImageDiT,
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


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 over sorted key names, dtypes, shapes and bytes.

    Computed on the ComfyUI-layout state dict before any dtype cast, so the same
    weights hash alike whatever their file layout, prefix or load dtype.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The DiT tensors (prefix stripped) and `__metadata__` of a .safetensors file."""
    with open_safetensors(path, "checkpoint") as handle:
        keys = list(handle.keys())
        prefix = _model_prefix(keys)
        # Read only the DiT's tensors: a single file also holds the VAE and text encoder.
        tensors = {key[len(prefix) :]: handle.get_tensor(key) for key in keys if key.startswith(prefix)}
        return tensors, dict(handle.metadata() or {})


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


def load_dit(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a frozen, eval-mode DiT from a .safetensors file or an in-memory state dict.

    `metadata` adds hyper-parameter hints (e.g. `axes_dims`) over the file's own
    `__metadata__`. The model gets `source_metadata` (the merged metadata) and
    `base_hash` (see `weights_hash`), which ties adapters to these base weights.
    A state-dict source's tensors may be shared with the model, not copied.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {list(LOAD_DTYPES)}")
    if isinstance(source, Mapping):
        origin, raw, file_metadata = "state dict", strip_prefix(source), {}
    else:
        origin = f"'{source}'"
        raw, file_metadata = _read_safetensors(Path(source))
    merged_metadata = {**file_metadata, **(metadata or {})}

    arch = ARCHITECTURES[detect_architecture(raw)]
    config = arch.infer_config(raw, merged_metadata)  # before conversion: split keys name the patch size
    state_dict = arch.to_comfy_layout(raw)
    with torch.device("meta"):  # no memory for weights about to be replaced
        model = arch.model_class(config)
    _check_keys(model, state_dict, origin)
    model.load_state_dict(state_dict, strict=True, assign=True)
    base_hash = weights_hash(state_dict)  # of the stored weights, before any cast
    # Drop the last outside references, so each stored tensor is freed as soon as
    # `.to` replaces it: a cast then needs one tensor of headroom, not a model's worth.
    del raw, state_dict
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    model.source_metadata = merged_metadata
    model.base_hash = base_hash
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
