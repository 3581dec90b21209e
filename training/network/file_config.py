"""A NetworkConfig shaped like an existing LoRA file, so any file can be loaded to sample with it.

Files this pack wrote carry their options (`dit_trainer_network`), but kohya, musubi,
ai-toolkit, diffusers and PEFT files do not. `config_for_file` reads the layers, ranks,
scales and DoRA keys of any supported file against the model's own layers and
returns the options of a network that `load_adapter_into` fills exactly:
  * the file's layers only: `include_patterns` name each one, `exclude_patterns` [".*"];
  * rank / alpha: the most common pair as `rank` / `alpha`, the others per layer in
    `rank_pattern` / `alpha_pattern`; alpha is the file's scale times rank (times
    sqrt(rank) with the file's RS-LoRA flag), so the scale is the file's;
  * DoRA when the file has magnitudes, on the axis they use;
  * q / k / v slices fused (rank = sum of the slices' ranks), never split.
A PiSSA file of this pack is a plain rank-2r LoRA against the original base, which is
what this builds (init stays kaiming).

LoHa / LoKr files (product_import.py) give algo loha / lokr with their ranks; LoKr's
`lokr_factor` is the one factor that reproduces every layer's w1 shape, and layers whose
w2 is full get a rank_pattern rank that makes it full.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import torch.nn as nn

from .importer import alias_table, assemble, group_file, shown
from .lokr import factorization
from .network import NetworkConfig
from .product_import import ProductFile, product_of
from ..storage import read_safetensors
from .targets import module_kind


def config_for_file(model: nn.Module, architecture: str, path: str | os.PathLike) -> NetworkConfig:
    """Options of a network on `model` with exactly the layers, ranks, scales and DoRA of the file at `path`."""
    path = str(path)
    tensors, meta = read_safetensors(path, "adapter file")
    layers = {name: m for name, m in model.named_modules() if module_kind(m) in ("linear", "conv")}
    pieces, _, _, unknown = group_file(path, tensors, alias_table(architecture, layers))
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} keys match no Linear / Conv layer of this {architecture} model ({shown(unknown)}); "
            "the file is for another architecture, or not a LoRA / LoHa / LoKr (full diffs)"
        )
    if not pieces:
        raise ValueError(f"{path}: no LoRA keys for a {architecture} model (keys seen: {shown(sorted(tensors))})")
    order = {name: i for i, name in enumerate(layers)}
    products = {name: product_of(path, name, pieces[name]) for name in sorted(pieces, key=order.__getitem__)}
    if any(item is not None for item in products.values()):
        return _product_config(path, layers, products)
    use_rslora = meta.get("use_rslora_flag") == "true"
    ranks, alphas, dora_axes = {}, {}, set()
    for name in sorted(pieces, key=order.__getitem__):
        item = assemble(path, name, pieces[name], layers[name].weight.shape[0])
        rank = item.down.shape[0]
        ranks[name] = rank
        alphas[name] = item.scale * (math.sqrt(rank) if use_rslora else rank)
        if item.dora_axis is not None:
            dora_axes.add(item.dora_axis)
    if len(dora_axes) > 1:
        raise ValueError(f"{path}: DoRA magnitudes on both axes; one network uses one dora_axis")
    (rank, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    convs = {name for name in ranks if module_kind(layers[name]) == "conv"}
    return NetworkConfig(
        algo="dora" if dora_axes else "lora",
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        dora_axis=dora_axes.pop() if dora_axes else "input",
        include_patterns=[re.escape(name) for name in ranks],
        exclude_patterns=[".*"],
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank or n in convs},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha or n in convs},
    )


def _lokr_factor(path: str, layers: dict[str, nn.Module], products: dict[str, ProductFile]) -> int:
    """The lokr_factor whose factorization gives every layer the file's w1 shape."""
    shapes = {name: (tuple(layers[name].weight.shape[:2]), tuple(item.tensors["lokr_w1"].shape))
              for name, item in products.items()}
    candidates = [-1, *sorted({size for _, w1 in shapes.values() for size in w1})]
    for factor in candidates:
        if all((factorization(out, factor)[0], factorization(inp, factor)[0]) == w1
               for (out, inp), w1 in shapes.values()):
            return factor
    raise ValueError(
        f"{path}: the LoKr w1 shapes of its layers come from no single factor (LyCORIS factorization); "
        "this pack trains one lokr_factor per network"
    )


def _product_config(path: str, layers: dict[str, nn.Module], products: dict[str, ProductFile | None]) -> NetworkConfig:
    plain = [name for name, item in products.items() if item is None]
    if plain:
        raise ValueError(f"{path}: LoRA keys ({shown(plain)}) beside LoHa / LoKr ones; one network uses one algo")
    algos = {item.algo for item in products.values()}
    if len(algos) > 1:
        raise ValueError(f"{path}: both LoHa and LoKr layers; one network uses one algo")
    algo = algos.pop()
    factor = _lokr_factor(path, layers, products) if algo == "lokr" else -1
    ranks, alphas = {}, {}
    for name, item in products.items():
        if item.rank is None:  # LoKr with a full w2: a rank of max(b, d) makes the network's w2 full too
            w2_rows = item.tensors["lokr_w2"].shape[0]
            ranks[name] = max(w2_rows, layers[name].weight.shape[1] // item.tensors["lokr_w1"].shape[1])
        else:
            ranks[name] = item.rank
        alphas[name] = item.scale * ranks[name]
    (rank, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    convs = {name for name in ranks if module_kind(layers[name]) == "conv"}
    return NetworkConfig(
        algo=algo,
        rank=rank,
        alpha=alpha,
        lokr_factor=factor,
        include_patterns=[re.escape(name) for name in ranks],
        exclude_patterns=[".*"],
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank or n in convs},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha or n in convs},
    )
