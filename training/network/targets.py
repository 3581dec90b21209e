"""Which layers of a model get an adapter, with which rank and alpha.

Selection works on (dotted module name, kind) pairs, kind in MODULE_KINDS, so the
rules can be checked on the module-name layouts of real models (Flux.1: 19 double +
38 single blocks; Flux.2 dev 8 + 48, klein 4B 5 + 20, klein 9B 8 + 24; Qwen-Image: 60
blocks; Z-Image: 30 layers + refiners) without instantiating them. Names are
ComfyUI's module paths.

Rules, in order (kohya sd-scripts / musubi-tuner semantics; regexes use fullmatch):
1. candidates: the architecture's default targets and modulation layers (+ Z-Image
   refiners when `train_refiners=True`);
2. minus the architecture's default excludes, the modulation layers unless
   `exclude_mod=False` (both reported in `Selection.skipped`), and `exclude_patterns`;
3. plus `include_patterns`, which override every exclude;
4. rank / alpha: the first `rank_pattern` / `alpha_pattern` entry (insertion order)
   that fullmatches the name, else `rank` / `alpha` for Linear layers and
   `conv_dim` / `conv_alpha` for Conv layers; rank 0 skips the layer (kohya), so
   Conv layers are skipped unless `conv_dim` (or a rank pattern) is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch.nn as nn

MODULE_KINDS = ("linear", "conv", "other")


@dataclass(frozen=True)
class ArchitectureTargets:
    """Default adapter targets of one architecture (patterns fullmatch dotted names)."""

    targets: tuple[str, ...]
    modulation: tuple[str, ...]  # adaLN layers: excluded by default (`exclude_mod`)
    excludes: tuple[str, ...] = ()
    refiners: tuple[str, ...] = ()  # Z-Image only: noise_refiner / context_refiner blocks
    refiner_modulation: tuple[str, ...] = ()
    # Fused projections that `split_qkv` trains as separate slices (kohya's split_dims):
    # pattern -> number of equal q/k/v slices; Flux's linear1 also holds the MLP input.
    fused_qkv: tuple[str, ...] = ()


_ZIMAGE_BLOCK = r"(attention\.(qkv|out)|feed_forward\.w[123])"
# Flux.1 and Flux.2 blocks share BFL's module names; Flux.2's MLP input is SwiGLU
# (2 * mlp_hidden rows) and its linear1 holds q | k | v | 2 * mlp_hidden.
_FLUX_BLOCKS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
    r"single_blocks\.\d+\.linear[12]",
)
_FLUX_FUSED = (r"double_blocks\.\d+\.(img|txt)_attn\.qkv", r"single_blocks\.\d+\.linear1")
ARCHITECTURES: dict[str, ArchitectureTargets] = {
    "zimage": ArchitectureTargets(
        targets=(rf"layers\.\d+\.{_ZIMAGE_BLOCK}",),
        modulation=(r"layers\.\d+\.adaLN_modulation\.0",),
        refiners=(rf"(noise|context)_refiner\.\d+\.{_ZIMAGE_BLOCK}",),
        refiner_modulation=(r"noise_refiner\.\d+\.adaLN_modulation\.0",),
        fused_qkv=(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv",),
    ),
    "flux": ArchitectureTargets(
        targets=_FLUX_BLOCKS,
        modulation=(r"double_blocks\.\d+\.(img|txt)_mod\.lin", r"single_blocks\.\d+\.modulation\.lin"),
        fused_qkv=_FLUX_FUSED,
    ),
    # Flux.2 has no per-block modulation: three model-wide layers produce the shift /
    # scale / gate of every double (img, txt) and every single block. A LoRA on them
    # changes all blocks at once, which makes them the main source of interference when
    # several LoRAs are stacked, so they stay out unless exclude_mod=False.
    "flux2": ArchitectureTargets(
        targets=_FLUX_BLOCKS,
        modulation=(r"double_stream_modulation_(img|txt)\.lin", r"single_stream_modulation\.lin"),
        fused_qkv=_FLUX_FUSED,
    ),
    # Modulation (each block's img_mod.1 / txt_mod.1 adaLN) stays out by default, as musubi-tuner
    # means it to: its `.*(_mod_).*` exclude never matches the dotted `transformer_blocks.0.img_mod.1`,
    # so musubi's (and ai-toolkit's) files do carry these layers; config_for_file or
    # exclude_mod=False builds a network that loads them.
    "qwen_image": ArchitectureTargets(
        targets=(
            r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
            r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)",
        ),
        modulation=(r"transformer_blocks\.\d+\.(img|txt)_mod\.1",),
    ),
}


@dataclass(frozen=True)
class TargetChoice:
    """One adapted layer: its name, kind, rank and alpha."""

    name: str
    kind: str
    rank: int
    alpha: float


@dataclass
class Selection:
    chosen: list[TargetChoice] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.chosen]


def module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return "other"


def module_kinds(model: nn.Module) -> list[tuple[str, str]]:
    """(dotted name, kind) of every submodule, in model order."""
    return [(name, module_kind(module)) for name, module in model.named_modules() if name]


def _compile(patterns: Iterable[str], option: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"{option}: invalid regex {pattern!r} ({err}); patterns fullmatch dotted names like 'layers.0.attention.qkv'"
            ) from err
    return compiled


def _matches(patterns: list[re.Pattern], name: str) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def value_patterns(mapping: Mapping[str, float], option: str, cast: type = float) -> list[tuple[re.Pattern, float]]:
    """`{regex: value}` compiled in insertion order (invalid regexes named with `option`)."""
    return [(p, cast(v)) for p, v in zip(_compile(mapping, option), mapping.values())]


def first_match(patterns: list[tuple[re.Pattern, float]], name: str) -> float | None:
    """The value of the first pattern that fullmatches `name`, or None."""
    for pattern, value in patterns:
        if pattern.fullmatch(name):
            return value
    return None


def architecture_targets(architecture: str) -> ArchitectureTargets:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"no adapter targets defined for architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


def split_dims(architecture: str, name: str, out_features: int, in_features: int) -> list[int] | None:
    """Row sizes of the q / k / v (/ MLP) slices of a fused projection, or None if not fused.

    Z-Image `attention.qkv` and Flux `*_attn.qkv`: three equal slices. Flux.1 / Flux.2
    `single_blocks.N.linear1`: q, k, v of the hidden size (= in_features), then the MLP
    input (Flux.1: mlp_hidden rows; Flux.2: 2 * mlp_hidden, SwiGLU's gate and value).
    """
    if not _matches(_compile(architecture_targets(architecture).fused_qkv, "fused_qkv"), name):
        return None
    if architecture in ("flux", "flux2") and name.endswith(".linear1"):
        return [in_features] * 3 + [out_features - 3 * in_features]
    if out_features % 3:
        raise ValueError(f"{name}: fused qkv has {out_features} output rows, not a multiple of 3")
    return [out_features // 3] * 3


def select_modules(
    modules: Iterable[tuple[str, str]],
    architecture: str,
    *,
    rank: int,
    alpha: float,
    conv_dim: int = 0,
    conv_alpha: float = 1.0,
    exclude_mod: bool = True,
    train_refiners: bool = False,
    include_patterns: Iterable[str] = (),
    exclude_patterns: Iterable[str] = (),
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> Selection:
    """Apply the rules in the module docstring to (name, kind) pairs; keeps model order."""
    arch = architecture_targets(architecture)
    modulation = list(arch.modulation) + (list(arch.refiner_modulation) if train_refiners else [])
    # Modulation layers are always candidates, so that `exclude_mod` reports them as skipped.
    targets = list(arch.targets) + (list(arch.refiners) if train_refiners else []) + modulation
    excludes = list(arch.excludes) + (modulation if exclude_mod else [])
    modulation_res = _compile(modulation, "modulation")
    target_res = _compile(targets, "default targets")
    exclude_res = _compile(excludes, "default excludes")
    user_exclude_res = _compile(exclude_patterns, "exclude_patterns")
    include_res = _compile(include_patterns, "include_patterns")
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    rank_res = value_patterns(rank_pattern, "rank_pattern", int)
    alpha_res = value_patterns(alpha_pattern, "alpha_pattern")

    selection = Selection()
    for name, kind in modules:
        if kind not in ("linear", "conv"):
            continue
        included = _matches(include_res, name)
        if not included:
            if not _matches(target_res, name):
                continue
            if _matches(exclude_res, name):
                reason = "modulation layer (exclude_mod)" if _matches(modulation_res, name) else "default exclude"
                selection.skipped.append((name, reason))
                continue
            if _matches(user_exclude_res, name):
                selection.skipped.append((name, "exclude_patterns"))
                continue
        default_rank, default_alpha = (rank, alpha) if kind == "linear" else (conv_dim, conv_alpha)
        pattern_rank = first_match(rank_res, name)
        layer_rank = int(pattern_rank) if pattern_rank is not None else default_rank
        pattern_alpha = first_match(alpha_res, name)
        layer_alpha = pattern_alpha if pattern_alpha is not None else default_alpha
        if layer_rank <= 0:
            why = "rank 0 from rank_pattern" if pattern_rank is not None else "Conv layer and conv_dim is 0"
            selection.skipped.append((name, why))
            continue
        selection.chosen.append(TargetChoice(name, kind, layer_rank, float(layer_alpha)))
    return selection
