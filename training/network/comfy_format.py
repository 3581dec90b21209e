"""Adapter files in the format stock ComfyUI `LoraLoader` applies exactly.

Keys per adapted Linear at ComfyUI module path P:
    diffusion_model.P.lora_A.weight  [r, in]
    diffusion_model.P.lora_B.weight  [out, r]
    diffusion_model.P.alpha          0-dim; ComfyUI's scale is alpha / r
    diffusion_model.P.dora_scale     DoRA only: [1, in] (input axis) or [out, 1] (output axis)

RS-LoRA (scale alpha / sqrt(r)) is stored as alpha * sqrt(r), so every plain alpha / r
reader applies the same scale; the file's `use_rslora_flag` says so.

ComfyUI normalises an [out, 1] dora_scale by the base row norm ||W0_i|| instead of
||W0_i + dW_i|| (comfy/weight_adapter/base.py, weight_decompose). The output axis is
therefore exported as m_i * (||W0_i|| + eps) / (||V_i|| + eps), which reproduces the
engine's layer in stock ComfyUI; it is tied to the base checkpoint it was trained on,
recorded as `dora_output_axis_folded` and `ss_base_model_hash`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import DORA_EPS, LoRAModule
from .network import LoRANetwork

PREFIX = "diffusion_model."


def _stored_alpha(adapter: LoRAModule) -> float:
    """The alpha that makes ComfyUI's alpha / r equal the engine's scale."""
    return adapter.scale * adapter.rank


def adapter_state_dict(network: LoRANetwork, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ComfyUI-format tensors for every adapter of the network (multiplier 1)."""
    tensors: dict[str, torch.Tensor] = {}
    for adapter in network.adapters:
        key = PREFIX + adapter.name
        tensors[f"{key}.lora_A.weight"] = adapter.lora_A.detach().to(dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = adapter.lora_B.detach().to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(_stored_alpha(adapter), dtype=torch.float32)
        if adapter.algo == "dora":
            magnitude = adapter.magnitude.detach().float()
            if adapter.dora_axis == "input":
                tensors[f"{key}.dora_scale"] = magnitude[None, :].contiguous()
            else:
                folded = magnitude * (adapter.base_norm() + DORA_EPS) / (adapter.dora_norm() + DORA_EPS)
                tensors[f"{key}.dora_scale"] = folded[:, None].contiguous()
    return tensors


def adapter_metadata(network: LoRANetwork, base_hash: str = "", extra: dict | None = None) -> dict[str, str]:
    cfg = network.cfg
    meta = {
        "ss_network_module": "dit_trainer.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps({"algo": cfg.algo, "dora_wd": cfg.algo == "dora", "dora_axis": cfg.dora_axis}),
        "ss_base_model_hash": base_hash,
        "use_rslora_flag": "true" if cfg.use_rslora else "false",
        "dit_trainer_architecture": network.architecture,
        "dit_trainer_algo": cfg.algo,
        "dit_trainer_dora_axis": cfg.dora_axis if cfg.algo == "dora" else "",
        "dora_output_axis_folded": "true" if cfg.algo == "dora" and cfg.dora_axis == "output" else "false",
        "dit_trainer_network": json.dumps(cfg.to_dict()),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write to a temp file beside the target, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_adapter(
    network: LoRANetwork,
    path: str | os.PathLike,
    base_hash: str = "",
    extra_metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    return atomic_save_safetensors(
        adapter_state_dict(network, dtype), path, adapter_metadata(network, base_hash, extra_metadata)
    )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are loaded (no pickles); convert the file first")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@torch.no_grad()
def load_adapter(network: LoRANetwork, path: str | os.PathLike) -> dict[str, str]:
    """Load a file written by `save_adapter` into a network of the same shape; returns its metadata."""
    tensors, meta = read_safetensors(path)
    file_rslora = meta.get("use_rslora_flag", "false") == "true"
    if file_rslora != network.cfg.use_rslora:
        raise ValueError(
            f"{path}: trained with use_rslora={file_rslora} but the network has use_rslora={network.cfg.use_rslora}; "
            f"set use_rslora={file_rslora} on the network, or train a new adapter instead of continuing this one"
        )
    for adapter in network.adapters:
        key = PREFIX + adapter.name
        missing = [s for s in (".lora_A.weight", ".lora_B.weight", ".alpha") if key + s not in tensors]
        if missing:
            raise ValueError(f"{path}: no {', '.join(key + s for s in missing)}; the file does not match this network")
        lora_A, lora_B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        if lora_A.shape != adapter.lora_A.shape or lora_B.shape != adapter.lora_B.shape:
            raise ValueError(
                f"{path}: {key} has rank {lora_A.shape[0]} (A {tuple(lora_A.shape)}) but the network expects "
                f"A {tuple(adapter.lora_A.shape)}; set rank={lora_A.shape[0]}"
            )
        stored_alpha = float(tensors[f"{key}.alpha"])
        if not math.isclose(stored_alpha, _stored_alpha(adapter), rel_tol=1e-6):
            raise ValueError(
                f"{path}: {key} has scale {stored_alpha / adapter.rank:g} but the network's is {adapter.scale:g}; "
                "set alpha to the file's (ss_network_alpha in its metadata)"
            )
        adapter.lora_A.copy_(lora_A)
        adapter.lora_B.copy_(lora_B)
        has_dora = f"{key}.dora_scale" in tensors
        if adapter.algo == "dora":
            if not has_dora:
                raise ValueError(f"{path}: the network is DoRA but {key}.dora_scale is missing; build it with algo=lora")
            stored = tensors[f"{key}.dora_scale"].float().flatten()
            if adapter.dora_axis == "output":
                stored = stored * (adapter.dora_norm() + DORA_EPS) / (adapter.base_norm() + DORA_EPS)
            adapter.magnitude.copy_(stored)
    return meta
