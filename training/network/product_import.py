"""Reading LoHa / LoKr files (ours, LyCORIS, musubi / blissful, any key prefix importer.py reads).

A layer's tensors are brought to this pack's layout, keeping ComfyUI's reading of them
(comfy/weight_adapter/loha.py, lokr.py), so the loaded adapter's layer equals what
ComfyUI applies:
  * Conv factors flattened to 2-D ([r, in * kernel], LoKr w2 [b, d * kernel]);
  * LoKr w1 given as w1_a @ w1_b (LyCORIS decompose_both) multiplied out; ComfyUI's scale
    is alpha over the rank of the last decomposed factor, so where w2 is full that
    scale is folded into w1 (the network's scale is 1 there);
  * a file without alpha (scale 1) loaded at the network's scale with the first factor
    rescaled; a file whose alpha gives another scale is refused, naming the fix.
Tucker Conv factors (hada_t1 / hada_t2, lokr_t2) and weight-decomposed LoHa / LoKr
(a dora_scale beside the factors) are not trained here: refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .key_names import COMFY_PREFIX

_SCALE_RTOL = 1e-5
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class ProductFile:
    """One layer's LoHa / LoKr from a file, in this pack's layout: scale * dW(tensors) is the change."""

    algo: str
    tensors: dict[str, torch.Tensor]
    scale: float
    has_alpha: bool
    rank: int | None  # None: LoKr with both factors full (no rank)
    keys: list[str]


def _refuse_tucker(path: str, name: str, tensors: dict) -> None:
    tucker = sorted(k for k in ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2") if k in tensors)
    if tucker:
        raise ValueError(
            f"{path}: {name} has Tucker-decomposed Conv factors ({', '.join(tucker)}, LyCORIS use_tucker), which this "
            "pack does not train; ComfyUI's LoraLoader applies the file as it is"
        )


def product_of(path: str, name: str, parts: dict) -> ProductFile | None:
    """The LoHa / LoKr of one layer's file pieces, or None when they are LoRA pieces."""
    products = [(alias, piece) for alias, piece in parts.items() if piece.product]
    if not products:
        return None
    alias, piece = products[0]
    if len(parts) > 1 or alias.rows is not None or piece.down is not None or piece.up is not None:
        raise ValueError(
            f"{path}: {name}: LoHa / LoKr tensors must name the whole layer once, without LoRA keys beside them or "
            "q / k / v slices (a product of slices is no product of the fused layer)"
        )
    got = piece.product
    _refuse_tucker(path, name, got)
    if piece.dora_scale is not None:
        raise ValueError(
            f"{path}: {name} is a weight-decomposed LoHa / LoKr (dora_scale beside its factors, LyCORIS dora_wd), which "
            "this pack does not train (its DoRA is LoRA-based); ComfyUI's LoraLoader applies the file as it is"
        )
    alpha = piece.alpha
    if any(key in got for key in _LOHA):
        missing = [key for key in _LOHA if key not in got]
        if missing:
            raise ValueError(f"{path}: {name} is LoHa but lacks {', '.join(missing)}")
        tensors = {key: got[key].flatten(1) for key in _LOHA}
        rank = tensors["hada_w1_b"].shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        return ProductFile("loha", tensors, scale, alpha is not None, rank, piece.keys)
    rank = None
    if "lokr_w1" in got:
        w1 = got["lokr_w1"]
    elif "lokr_w1_a" in got and "lokr_w1_b" in got:
        w1, rank = got["lokr_w1_a"] @ got["lokr_w1_b"], got["lokr_w1_b"].shape[0]
    else:
        raise ValueError(f"{path}: {name} is LoKr but has neither lokr_w1 nor lokr_w1_a / lokr_w1_b")
    if "lokr_w2" in got:
        tensors = {"lokr_w1": w1, "lokr_w2": got["lokr_w2"].flatten(1)}
    elif "lokr_w2_a" in got and "lokr_w2_b" in got:
        tensors = {"lokr_w1": w1, "lokr_w2_a": got["lokr_w2_a"], "lokr_w2_b": got["lokr_w2_b"].flatten(1)}
        rank = got["lokr_w2_b"].shape[0]
    else:
        raise ValueError(f"{path}: {name} is LoKr but has neither lokr_w2 nor lokr_w2_a / lokr_w2_b")
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    if "lokr_w2" in tensors:
        # Both factors full here: the network's scale is 1, so ComfyUI's scale goes into w1.
        tensors["lokr_w1"] = tensors["lokr_w1"] * scale
        return ProductFile("lokr", tensors, 1.0, True, None, piece.keys)
    return ProductFile("lokr", tensors, scale, alpha is not None, rank, piece.keys)


def _fix_for(item: ProductFile) -> str:
    if item.algo == "loha":
        return f"set rank={item.rank} (or rank_pattern for this layer)"
    w1 = tuple(item.tensors["lokr_w1"].shape)
    how = "lokr_full_matrix=true" if item.rank is None else f"rank={item.rank}"
    return f"set lokr_factor so that w1 is {w1} (the file's) and {how}"


@torch.no_grad()
def load_products(path: str, adapters: dict, found: dict[str, ProductFile]) -> list[str]:
    """Copy the file's LoHa / LoKr tensors into the network's adapters (checked first); returns the rescaled ones."""
    updates, rescaled = [], []
    for name, item in found.items():
        adapter = adapters[name]
        if adapter.algo != item.algo:
            raise ValueError(
                f"{path}: {item.keys[0]} is {item.algo} but the network adapts {name} with {adapter.algo}; "
                f"build the network with algo={item.algo!r}"
            )
        tensors = dict(item.tensors)
        if not math.isclose(item.scale, adapter.scale, rel_tol=_SCALE_RTOL):
            if item.has_alpha:
                raise ValueError(
                    f"{path}: {COMFY_PREFIX}{name}.alpha: the file's scale is {item.scale:g} but the network's is "
                    f"{adapter.scale:g}; set alpha to {item.scale * (item.rank or 1):g} at rank {item.rank}"
                )
            first = adapter.FILE_KEYS[0]
            tensors[first] = tensors[first] * (item.scale / adapter.scale)
            rescaled.append(name)
        if set(tensors) != set(adapter.FILE_KEYS) or any(
            tensors[key].shape != getattr(adapter, key).shape for key in adapter.FILE_KEYS
        ):
            shapes = {key: tuple(t.shape) for key, t in tensors.items()}
            mine = {key: tuple(getattr(adapter, key).shape) for key in adapter.FILE_KEYS}
            raise ValueError(
                f"{path}: {name}: the file's {item.algo} tensors {shapes} do not fit the network's {mine}; "
                + _fix_for(item)
            )
        updates.append((adapter, tensors))
    for adapter, tensors in updates:
        for key, tensor in tensors.items():
            getattr(adapter, key).copy_(tensor)
    return rescaled
