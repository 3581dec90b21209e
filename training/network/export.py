"""Writing a trained network as a LoRA file in one of three key styles.

comfy  diffusion_model.<path>.lora_A.weight [r, in], .lora_B.weight [out, r], .alpha,
       .dora_scale: what stock ComfyUI `LoraLoader` applies exactly (the default).
kohya  lora_unet_<path_>.lora_down.weight / .lora_up.weight / .alpha / .dora_scale:
       the same tensors under kohya sd-scripts / musubi-tuner names (ComfyUI reads them).
peft   transformer.<diffusers path>.lora_A.weight / .lora_B.weight
       (+ .lora_magnitude_vector for DoRA): for diffusers / PEFT users. The scale is
       folded into B and no alpha is written, so PEFT's default alpha = r (scale 1)
       is exact; fused projections are written as their diffusers q / k / v slices
       (A shared, B row slices; split adapters write their own A_p, B_p). Only names
       ComfyUI also maps are written (key_names.peft_aliases): a Flux layer without
       one (final_layer.adaLN_modulation.1, Flux.2's shared modulation and time /
       guidance embedders) is refused, naming the styles that do load.

LoHa / LoKr (comfy and kohya styles): <key>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b,
or <key>.lokr_w1 with lokr_w2 or lokr_w2_a / lokr_w2_b, and <key>.alpha, the tensors
ComfyUI's LoHaAdapter / LoKrAdapter read. PEFT has no such adapters: refused.

alpha: ComfyUI's scale is alpha / rank with rank = lora_A.shape[0], so the stored
alpha is scale * export rank. RS-LoRA (alpha / sqrt(r)) is thus stored as
alpha * sqrt(r), and every plain alpha / r reader applies the training scale; the
file's `use_rslora_flag` says so.

DoRA dora_scale: input axis [1, in] = m (ComfyUI normalises per column of W0 + dW,
exactly as the engine). Output axis [out, 1] = m * (||W0|| + eps) / (||V|| + eps):
ComfyUI normalises an [out, 1] scale by the base row norm ||W0|| instead of ||V||
(comfy/weight_adapter/base.py, weight_decompose), so the correction is folded in.
That ties the file to its base checkpoint: `dora_output_axis_folded` and
`ss_base_model_hash` record it. PEFT's magnitude is m itself (it normalises by ||V||).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .importer import shown
from .key_names import COMFY_PREFIX, KOHYA_PREFIX, PEFT_PREFIX, peft_aliases
from .lora import DORA_EPS
from .network import PRODUCT_ALGOS, LoRANetwork
from .product_base import ProductAdapter
from ..storage import atomic_save_safetensors, finite_or_raise

EXPORT_STYLES = ("comfy", "kohya", "peft")


def _dora_scale(adapter) -> torch.Tensor:
    magnitude = adapter.magnitude.detach().float()
    if adapter.dora_axis == "input":
        return magnitude[None, :].contiguous()
    folded = magnitude * (adapter.base_norm() + DORA_EPS) / (adapter.dora_norm() + DORA_EPS)
    return folded[:, None].contiguous()


def _comfy_or_kohya(network: LoRANetwork, style: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for adapter in network.adapters:
        if style == "comfy":
            key, down_suffix, up_suffix = COMFY_PREFIX + adapter.name, ".lora_A.weight", ".lora_B.weight"
        else:
            key, down_suffix, up_suffix = KOHYA_PREFIX + adapter.name.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        if isinstance(adapter, ProductAdapter):
            for suffix, tensor in adapter.file_tensors().items():
                tensors[f"{key}.{suffix}"] = tensor.to(dtype).contiguous()
            tensors[key + ".alpha"] = torch.tensor(adapter.export_alpha(), dtype=torch.float32)
            continue
        down, up = adapter.export_factors()
        tensors[key + down_suffix] = down.to(dtype).contiguous()
        tensors[key + up_suffix] = up.to(dtype).contiguous()
        tensors[key + ".alpha"] = torch.tensor(adapter.export_alpha(), dtype=torch.float32)
        if adapter.algo == "dora":
            tensors[key + ".dora_scale"] = _dora_scale(adapter)
    return tensors


def _peft_names(network: LoRANetwork) -> dict[str, list]:
    """Each adapter's peft-style aliases; raises for layers ComfyUI maps no diffusers name of."""
    names = {
        adapter.name: peft_aliases(network.architecture, adapter.name, *adapter.base.weight.shape[:2])
        for adapter in network.adapters
    }
    unmapped = [name for name, aliases in names.items() if not aliases]
    if unmapped:
        raise ValueError(
            f"style 'peft': ComfyUI maps no diffusers name for {len(unmapped)} adapted {network.architecture} layers "
            f"({shown(unmapped)}), so it would not load them from a peft file; export with style='comfy' "
            "or 'kohya' (ComfyUI loads both), or leave these layers out of the network"
        )
    return names


def _peft(network: LoRANetwork, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    names = _peft_names(network)
    for adapter in network.adapters:
        if adapter.algo == "dora" and adapter.dora_axis == "input":
            raise ValueError(
                f"{adapter.name}: PEFT / diffusers DoRA is output-axis only, this adapter is input-axis; "
                "export with style='comfy' or 'kohya', or train with dora_axis='output'"
            )
        out_features = adapter.base.weight.shape[0]
        down, up = adapter.export_factors()
        up = up * adapter.scale
        aliases = names[adapter.name]
        own_slices = adapter.split_dims is not None and adapter.split_dims == [a.rows[1] for a in aliases if a.rows]
        for part, alias in enumerate(aliases):
            start, count = alias.rows or (0, out_features)
            part_down, part_up = down, up[start : start + count]
            if own_slices:
                # A split adapter's slice p only uses A_p: write it at rank r, not the fused rank.
                columns = slice(part * adapter.rank, (part + 1) * adapter.rank)
                part_down, part_up = down[columns], part_up[:, columns]
            key = PEFT_PREFIX + alias.name
            # Clones: slices share A, and safetensors refuses tensors that share storage.
            tensors[key + ".lora_A.weight"] = part_down.to(dtype).clone()
            tensors[key + ".lora_B.weight"] = part_up.to(dtype).clone()
            if adapter.algo == "dora":
                tensors[key + ".lora_magnitude_vector"] = adapter.magnitude.detach().float()[start : start + count].clone()
    return tensors


def adapter_state_dict(
    network: LoRANetwork, dtype: torch.dtype = torch.float32, style: str = "comfy"
) -> dict[str, torch.Tensor]:
    """Tensors of every adapter of the network at multiplier 1, in key style `style`."""
    if style not in EXPORT_STYLES:
        raise ValueError(f"export style {style!r} is not one of {EXPORT_STYLES}")
    if style == "peft":
        if network.cfg.algo in PRODUCT_ALGOS:
            raise ValueError(
                f"style 'peft': PEFT / diffusers have no {network.cfg.algo} adapter that ComfyUI reads from a peft "
                "file; export with style='comfy' or 'kohya' (ComfyUI loads both)"
            )
        return _peft(network, dtype)
    return _comfy_or_kohya(network, style, dtype)


def adapter_metadata(
    network: LoRANetwork, base_hash: str = "", extra: dict | None = None, style: str = "comfy"
) -> dict[str, str]:
    """safetensors metadata: kohya-style ss_* keys plus ours (architecture, algo, axis, RS-LoRA, config)."""
    cfg = network.cfg
    dora = any(a.algo == "dora" for a in network.adapters)
    meta = {
        "ss_network_module": "dit_trainer.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps(
            {
                "algo": cfg.algo,
                "dora_wd": dora,
                "dora_axis": cfg.dora_axis,
                "conv_dim": cfg.conv_dim,
                "conv_alpha": cfg.conv_alpha,
                "split_qkv": cfg.split_qkv,
                "init": cfg.init,
                **({"factor": cfg.lokr_factor, "full_matrix": cfg.lokr_full_matrix} if cfg.algo == "lokr" else {}),
            }
        ),
        "ss_base_model_hash": base_hash,
        "use_rslora_flag": "true" if cfg.use_rslora else "false",
        "dit_trainer_architecture": network.architecture,
        "dit_trainer_algo": cfg.algo,
        "dit_trainer_dora_axis": cfg.dora_axis if dora else "",
        "dora_output_axis_folded": "true" if dora and cfg.dora_axis == "output" and style != "peft" else "false",
        "dit_trainer_key_style": style,
        "dit_trainer_scale_folded": "true" if style == "peft" else "false",
        "dit_trainer_network": json.dumps(cfg.to_dict()),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def export_adapter(
    network: LoRANetwork,
    path: str | os.PathLike,
    style: str = "comfy",
    base_hash: str = "",
    extra_metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the network's adapter file (atomically) in key style `style` (see EXPORT_STYLES)."""
    tensors = adapter_state_dict(network, dtype, style)
    finite_or_raise(tensors, f"the adapter for {path}")  # never write a file ComfyUI would turn into noise
    return atomic_save_safetensors(tensors, path, adapter_metadata(network, base_hash, extra_metadata, style))
