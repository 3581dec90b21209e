"""Flux.1 / Flux.2 checkpoints: diffusers -> BFL key layout, config from shapes, variant names.

Checkpoints come in BFL's layout (the official release; ComfyUI's is the same keys
under `model.diffusion_model.`) or diffusers' (`FluxTransformer2DModel`,
`Flux2Transformer2DModel`). Our `FluxDiT` uses BFL's module names, so BFL keys pass
through and diffusers keys are renamed, their split projections fused:

  diffusers                                         BFL / ComfyUI
  transformer_blocks.N.attn.to_q | to_k | to_v      double_blocks.N.img_attn.qkv (rows q | k | v)
  transformer_blocks.N.attn.add_{q,k,v}_proj        double_blocks.N.txt_attn.qkv
  single_transformer_blocks.N.attn.to_{q,k,v}       single_blocks.N.linear1 (rows q | k | v | mlp)
    + proj_mlp (Flux.1; Flux.2 stores it fused as attn.to_qkv_mlp_proj)
  norm_out.linear (rows scale | shift)              final_layer.adaLN_modulation.1 (rows shift | scale)

The conversion is a plan, target key -> (source keys, how to combine them), built from
key names alone, so the loader can run it one tensor at a time and on meta-device
stand-ins (shapes without data) to check a checkpoint before reading it. It inverts
diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and
`convert_flux2_transformer_checkpoint_to_diffusers` exactly (the tests use them as
the oracle).

Config inference reads the BFL-layout shapes; RoPE's `axes_dim` and `theta` and the
patch size are not visible in shapes and come from metadata hints or the family's
released values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .flux import FluxConfig
from .shape_reader import ShapeReader

Combine = Callable[[list[torch.Tensor]], torch.Tensor]
LayoutPlan = dict[str, tuple[tuple[str, ...], Combine]]  # target key -> (source keys, combine)

FLUX2_MARKER = "double_stream_modulation_img.lin.weight"  # Flux.2's shared modulation (BFL name)
FLUX2_MARKER_DIFFUSERS = "double_stream_modulation_img.linear.weight"
FLUX1_MARKERS = ("double_blocks.0.img_mod.lin.weight", "img_in.weight")
FLUX1_MARKERS_DIFFUSERS = (
    "transformer_blocks.0.norm1.linear.weight",
    "x_embedder.weight",
    "single_transformer_blocks.0.norm.linear.weight",  # SD3 shares the first two names, not this one
)
ARCHITECTURE_OF_FAMILY = {"flux1": "flux", "flux2": "flux2"}

# Released checkpoints by their shape signature, checked against diffusers' configs of
# FLUX.1-dev / -schnell (transformer/config.json), Flux2Transformer2DModel's defaults
# (FLUX.2-dev) and FLUX.2-klein-4B / -9B (5 + 20 blocks, 24 heads; 8 + 24, 32 heads; 128-wide heads).
VARIANTS: dict[str, dict[str, Any]] = {
    "flux1-dev": dict(family="flux1", in_channels=16, hidden_size=3072, num_heads=24, depth=19,
                      depth_single_blocks=38, mlp_ratio=4.0, context_in_dim=4096, vec_in_dim=768, guidance_embed=True),
    "flux1-schnell": dict(family="flux1", in_channels=16, hidden_size=3072, num_heads=24, depth=19,
                          depth_single_blocks=38, mlp_ratio=4.0, context_in_dim=4096, vec_in_dim=768,
                          guidance_embed=False),
    "flux2-dev": dict(family="flux2", in_channels=128, hidden_size=6144, num_heads=48, depth=8,
                      depth_single_blocks=48, mlp_ratio=3.0, context_in_dim=15360, guidance_embed=True),
    "flux2-klein-4b": dict(family="flux2", in_channels=128, hidden_size=3072, num_heads=24, depth=5,
                           depth_single_blocks=20, mlp_ratio=3.0, context_in_dim=7680, guidance_embed=False),
    "flux2-klein-9b": dict(family="flux2", in_channels=128, hidden_size=4096, num_heads=32, depth=8,
                           depth_single_blocks=24, mlp_ratio=3.0, context_in_dim=12288, guidance_embed=False),
}
# What shapes cannot show: the released values (a hint in the metadata overrides them).
FAMILY_DEFAULTS = {"flux1": dict(patch_size=2, theta=10000), "flux2": dict(patch_size=1, theta=2000)}
EXPECTED_SIGNATURE = (
    "img_in.weight [hidden, in_channels * patch^2], txt_in.weight [hidden, context_in_dim], "
    "double_blocks.0..depth-1 and single_blocks.0..n-1 without gaps, img_attn.qkv.weight [3 * hidden, hidden], "
    "norm.query_norm.scale [head_dim] with hidden divisible by head_dim, img_mlp.0.weight [mlp_in, hidden], "
    "linear1.weight [3 * hidden + mlp_in, hidden], linear2.weight [hidden, hidden + mlp_hidden] "
    "(mlp_in = mlp_hidden, Flux.2: 2 * mlp_hidden), final_layer.linear.weight [in_channels * patch^2, hidden], "
    "axes_dim even sizes summing to head_dim; Flux.1 also vector_in and per-block img_mod / txt_mod / modulation, "
    "Flux.2 the shared double_stream_modulation_img / _txt and single_stream_modulation"
)


# --- layout plans (the loader's Z-Image plan uses the same pieces) -----------


def as_stored(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _shift_scale(parts: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous stores (scale, shift); BFL's final layer (shift, scale)."""
    scale, shift = parts[0].chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def apply_plan(plan: LayoutPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a layout plan over in-memory (or meta-device) tensors."""
    out = {}
    for target, (sources, combine) in plan.items():
        try:
            out[target] = combine([tensors[source] for source in sources])
        except RuntimeError as error:  # parts whose shapes do not stack
            shapes = [tuple(tensors[source].shape) for source in sources]
            raise ValueError(f"cannot fuse {list(sources)} (shapes {shapes}) into '{target}': {error}") from None
    return out


# --- diffusers -> BFL names ---------------------------------------------------

_TOP_LEVEL = {  # diffusers module -> BFL module (both families; their names do not collide)
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DOUBLE = {  # inside transformer_blocks.N -> inside double_blocks.N
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",  # Flux.1 feed-forward
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "ff.linear_in": "img_mlp.0",  # Flux.2 feed-forward
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {  # inside single_transformer_blocks.N -> inside single_blocks.N
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",  # Flux.1
    "attn.to_out": "linear2",  # Flux.2
    "attn.to_qkv_mlp_proj": "linear1",  # Flux.2: already fused
}
# Fused BFL modules and their split diffusers parts, in row order.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_PARTS = {"double_blocks": _DOUBLE_FUSED, "single_blocks": _SINGLE_FUSED}
_PART_OF = {stack: {part: fused for fused, parts in table.items() for part in parts} for stack, table in _PARTS.items()}
_BLOCK_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_STACKS = {"transformer_blocks": ("double_blocks", _DOUBLE), "single_transformer_blocks": ("single_blocks", _SINGLE)}


def _param_name(module: str, param: str) -> str:
    """BFL's RMSNorm gains are `scale`, diffusers' `weight`."""
    return "scale" if module.endswith(("query_norm", "key_norm")) else param


def _bfl_name(key: str) -> tuple[str, tuple[str, ...] | None, Combine] | None:
    """Where a diffusers key goes: (BFL key, all split parts of that BFL key in row order, combine).

    The parts are None for a 1:1 rename; the whole result is None for keys that are not
    diffusers Flux names (BFL keys, or keys the strict load check will name).
    """
    if match := _BLOCK_KEY.match(key):
        stack, index, module, param = match.groups()
        bfl_stack, renames = _STACKS[stack]
        if module in renames:
            target = renames[module]
            return f"{bfl_stack}.{index}.{target}.{_param_name(target, param)}", None, as_stored
        if module in _PART_OF[bfl_stack]:
            fused = _PART_OF[bfl_stack][module]
            parts = tuple(f"{stack}.{index}.{part}.{param}" for part in _PARTS[bfl_stack][fused])
            return f"{bfl_stack}.{index}.{fused}.{param}", parts, concat_rows
        return None
    module, _, param = key.rpartition(".")
    if module in _TOP_LEVEL:
        combine = _shift_scale if module == "norm_out.linear" else as_stored
        return f"{_TOP_LEVEL[module]}.{param}", None, combine
    return None


def _mixed_layout(target: str, first: Iterable[str], second: Iterable[str]) -> ValueError:
    return ValueError(
        f"{sorted(first)} and {sorted(second)} both give '{target}': the checkpoint holds this weight in two "
        "layouts (BFL / ComfyUI fused and diffusers split); keep one copy of each weight"
    )


def plan_comfy_layout_flux(keys: Iterable[str]) -> LayoutPlan:
    """Layout plan for Flux.1 / Flux.2 keys (prefix stripped): diffusers -> BFL, BFL unchanged.

    Raises ValueError when a weight is present both fused and split (naming both keys),
    or when a split projection is incomplete (naming the missing parts).
    """
    plan: LayoutPlan = {}
    split: dict[str, tuple[str, ...]] = {}  # fused target key -> its split source keys in row order
    present: set[str] = set()
    for key in keys:
        target, parts, combine = _bfl_name(key) or (key, None, as_stored)
        if parts is not None:
            split[target] = parts
            present.add(key)
        elif target in plan:
            raise _mixed_layout(target, plan[target][0], [key])
        else:
            plan[target] = ((key,), combine)
    for target, parts in split.items():
        found = [part for part in parts if part in present]
        if target in plan:
            raise _mixed_layout(target, plan[target][0], found)
        if missing := [part for part in parts if part not in present]:
            raise ValueError(
                f"'{target}' is split into {found} but {missing} are missing; the checkpoint is incomplete"
            )
        plan[target] = (parts, concat_rows)
    return plan


def to_comfy_layout_flux(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> BFL / ComfyUI keys (fused projections); BFL keys pass through unchanged."""
    return apply_plan(plan_comfy_layout_flux(state_dict), state_dict)


# --- detection --------------------------------------------------------------


def is_flux2(keys: set[str]) -> bool:
    return FLUX2_MARKER in keys or FLUX2_MARKER_DIFFUSERS in keys


def is_flux1(keys: set[str]) -> bool:
    # Chroma, HunyuanVideo and SD3 share some of these names but not all of them.
    flux1 = set(FLUX1_MARKERS) <= keys or set(FLUX1_MARKERS_DIFFUSERS) <= keys
    return flux1 and not is_flux2(keys)


def flux_family(keys: Iterable[str]) -> str:
    return "flux2" if is_flux2(set(keys)) else "flux1"


# --- config from shapes -------------------------------------------------------


def default_axes_dim(family: str, head_dim: int) -> list[int] | None:
    """The released RoPE split scaled to head_dim (even sizes); None when no even split exists."""
    if family == "flux2":  # four equal axes: [32, 32, 32, 32] at 128
        return [head_dim // 4] * 4 if head_dim % 8 == 0 else None
    spatial = (head_dim * 7 // 16) // 2 * 2  # [16, 56, 56] at 128
    first = head_dim - 2 * spatial
    return [first, spatial, spatial] if first > 0 and first % 2 == 0 else None


def hinted_axes_dim(shape: ShapeReader, hints: Mapping[str, Any], family: str, head_dim: int) -> list[int]:
    """The RoPE split from the metadata hints, else the released one scaled to head_dim; checked."""
    axes_dim = hints.get("axes_dim", default_axes_dim(family, head_dim))
    if axes_dim is None:
        raise shape.error(f"no default RoPE split for head_dim {head_dim}; give 'axes_dim' in the metadata")
    if not isinstance(axes_dim, list) or not all(isinstance(size, int) for size in axes_dim):
        raise shape.error(f"metadata 'axes_dim' = {axes_dim!r} is not a list of integers")
    return axes_dim


def _block_indices(keys: Iterable[str], stack: str) -> set[int]:
    return {int(match.group(1)) for key in keys if (match := re.match(rf"^{stack}\.(\d+)\.", key))}


def _depths(shape: ShapeReader) -> tuple[int, int]:
    """(double_blocks, single_blocks) counts; blocks must be numbered without gaps."""
    counts = []
    for stack in ("double_blocks", "single_blocks"):
        indices = _block_indices(shape.state_dict, stack)
        counts.append(max(indices) + 1 if indices else 0)
        shape.seen[stack] = counts[-1]
        if gaps := sorted(set(range(counts[-1])) - indices):
            raise shape.error(f"{stack} {gaps} are missing (blocks must be numbered 0..{counts[-1] - 1})")
    if not any(counts):
        raise shape.error("there are no double_blocks or single_blocks")
    return counts[0], counts[1]


def _mlp_width(shape: ShapeReader, family: str, hidden: int, depth: int, depth_single: int) -> int:
    """The MLP hidden width, checked across the double- and single-stream blocks."""
    per_width = 2 if family == "flux2" else 1  # SwiGLU's first projection holds value and gate
    if depth:
        qkv = shape("double_blocks.0.img_attn.qkv.weight", 2)
        if qkv != (3 * hidden, hidden):
            raise shape.error(
                f"'double_blocks.0.img_attn.qkv.weight' is {list(qkv)}, not [3 x hidden, hidden] = "
                f"[{3 * hidden}, {hidden}]"
            )
        mlp_in = shape("double_blocks.0.img_mlp.0.weight", 2)[0]
    else:
        mlp_in = shape("single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
    mlp_hidden = mlp_in // per_width
    shape.seen["mlp_hidden"] = mlp_hidden
    if mlp_hidden < 1 or mlp_in % per_width or int(hidden * (mlp_hidden / hidden)) != mlp_hidden:
        raise shape.error(f"the MLP input width {mlp_in} is not {per_width} x int(hidden x mlp_ratio)")
    if depth_single:
        linear1, linear2 = shape("single_blocks.0.linear1.weight", 2), shape("single_blocks.0.linear2.weight", 2)
        if linear1 != (3 * hidden + mlp_in, hidden) or linear2 != (hidden, hidden + mlp_hidden):
            raise shape.error(
                f"single_blocks.0.linear1 / linear2 are {list(linear1)} / {list(linear2)}, expected "
                f"[{3 * hidden + mlp_in}, {hidden}] / [{hidden}, {hidden + mlp_hidden}] for hidden {hidden} "
                f"and MLP width {mlp_hidden}"
            )
    return mlp_hidden


def flux_config_from_shapes(
    state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None
) -> FluxConfig:
    """Flux.1 / Flux.2 hyper-parameters from the shapes of BFL-layout tensors (prefix stripped).

    Meta-device tensors are enough: nothing is read but shapes. `hints` (decoded
    metadata) may give `axes_dim`, `theta` and `patch_size`, which shapes cannot show.
    Raises ValueError listing what was seen and the expected signature when the shapes
    cannot form a FluxDiT.
    """
    hints = dict(hints or {})
    shape = ShapeReader(state_dict, "Flux", EXPECTED_SIGNATURE)
    family = flux_family(state_dict)
    shape.seen["family"] = family
    depth, depth_single = _depths(shape)
    hidden, patch_features = shape("img_in.weight", 2)
    shape.seen["hidden_size"] = hidden
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    (head_dim,) = shape(norm_key, 1)
    shape.seen["head_dim"] = head_dim
    if hidden % head_dim:
        raise shape.error(f"hidden size {hidden} is not a multiple of head_dim {head_dim} ('{norm_key}')")
    mlp_hidden = _mlp_width(shape, family, hidden, depth, depth_single)

    patch_size = int(hints.get("patch_size", FAMILY_DEFAULTS[family]["patch_size"]))
    out_features = shape("final_layer.linear.weight", 2)[0]
    if patch_features % patch_size**2 or out_features != patch_features:
        raise shape.error(
            f"img_in takes {patch_features} features per token and final_layer.linear gives {out_features}: they "
            f"must be equal (in_channels x patch_size^2, patch_size {patch_size}); a Fill / inpainting model with "
            "extra input channels is not supported"
        )
    vec_in_dim = shape("vector_in.in_layer.weight", 2)[1] if "vector_in.in_layer.weight" in state_dict else 0
    if family == "flux1" and not vec_in_dim:
        raise shape.error("a Flux.1 checkpoint without vector_in.in_layer.weight (the CLIP-L pooled-vector input)")
    axes_dim = hinted_axes_dim(shape, hints, family, head_dim)
    # Flux.1's qkv_bias switches the double blocks' qkv bias only (ComfyUI's FluxParams).
    qkv_bias = family == "flux1" and (not depth or "double_blocks.0.img_attn.qkv.bias" in state_dict)
    try:
        return FluxConfig(
            family=family,
            in_channels=patch_features // patch_size**2,
            patch_size=patch_size,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            mlp_ratio=mlp_hidden / hidden,
            context_in_dim=shape("txt_in.weight", 2)[1],
            vec_in_dim=vec_in_dim,
            guidance_embed="guidance_in.in_layer.weight" in state_dict,
            axes_dim=list(axes_dim),
            theta=int(hints.get("theta", FAMILY_DEFAULTS[family]["theta"])),
            qkv_bias=qkv_bias,
        )
    except ValueError as error:  # FluxConfig's own checks, e.g. axes_dim against head_dim
        raise shape.error(str(error)) from None


def flux_variant(cfg: FluxConfig) -> str:
    """Name of the released model these hyper-parameters match, else '<family>-custom'."""
    for name, fields in VARIANTS.items():
        if all(getattr(cfg, field) == value for field, value in fields.items()):
            return name
    return f"{cfg.family}-custom"
