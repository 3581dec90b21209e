"""Qwen-Image / Qwen-Image-Edit checkpoints: detection, key layout, config from shapes, variant names.

One key layout serves every source. The official release (Qwen/Qwen-Image and the
Edit models, `transformer/` of the diffusers repo) is diffusers' layout, and ComfyUI's
QwenImageTransformer2DModel (`comfy/ldm/qwen_image/model.py`) uses diffusers' module
names: at the released config both state dicts hold the same 1933 keys with the same
shapes, the final layer's `norm_out.linear` rows are (scale | shift) in both (Flux's
BFL layout swaps them; Qwen-Image's does not), and diffusers' own single-file loader
maps this model with the identity. So a ComfyUI single file (`model.diffusion_model.`),
a bare diffusion-model file and a diffusers file (bare or under `transformer.`) differ
in their prefix only, which the loader strips.

The one non-weight key: Comfy-Org's repackaged Qwen-Image-Edit-2511 files carry an empty
`__index_timestep_zero__` tensor, the marker from which ComfyUI picks its
"index_timestep_zero" reference method. The plan drops it; config inference reads it
as `zero_cond_t`.

Config inference reads shapes only (meta-device tensors suffice): num_layers by
counting blocks, head_dim from `attn.norm_q`, the width from `img_in`, the text width
from `txt_in`, in_channels from `img_in`'s features / patch^2. What shapes cannot show
comes from hints (decoded metadata) or the released values: `axes_dim`, `theta`,
`patch_size`, and `zero_cond_t`. Qwen-Image-Edit-2511 has exactly Qwen-Image's shapes
(it only modulates reference tokens at t = 0), so without the marker its checkpoint
cannot be told apart: `zero_cond_t` then comes from a `zero_cond_t` hint or a `variant`
hint naming the release.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .flux_layouts import LayoutPlan, as_stored, hinted_axes_dim
from .qwen_image import MLP_RATIO, QwenImageConfig
from .shape_reader import ShapeReader

QWEN_IMAGE_MARKERS = (
    "txt_norm.weight",
    "img_in.weight",
    "transformer_blocks.0.img_mod.1.weight",
    # NucleusMoE-Image shares the three above; it has neither a text adaLN nor a text query projection.
    "transformer_blocks.0.txt_mod.1.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
)
EDIT_2511_MARKER = "__index_timestep_zero__"  # ComfyUI's flag tensor in Edit-2511 files: not a weight
LAYERED_MARKER = "time_text_embed.addition_t_embedding.weight"  # Qwen-Image-Layered's layer-index embedding
CONTROLNET_MARKER = "controlnet_x_embedder.weight"  # a Qwen-Image ControlNet: the blocks without the output layers

# Every release has one config (diffusers' QwenImageTransformer2DModel defaults, 20.4B
# parameters) but for zero_cond_t, which is what a `variant` hint says about each release:
# only Edit-2511 sets it.
RELEASED_CONFIG: dict[str, Any] = dict(
    in_channels=16, patch_size=2, num_layers=60, num_heads=24, head_dim=128, joint_attention_dim=3584,
    axes_dim=[16, 56, 56], theta=10000,
)
ZERO_COND_T_OF_RELEASE = {
    "qwen-image": False,
    "qwen-image-2512": False,
    "qwen-image-edit": False,
    "qwen-image-edit-2509": False,
    "qwen-image-edit-2511": True,
}
EXPECTED_SIGNATURE = (
    "transformer_blocks.0..num_layers-1 without gaps, img_in.weight [hidden, in_channels * patch^2], "
    "transformer_blocks.0.attn.norm_q.weight [head_dim] with hidden divisible by head_dim, "
    "txt_norm.weight [joint_attention_dim], txt_in.weight [hidden, joint_attention_dim], "
    f"img_mlp.net.0.proj.weight [{MLP_RATIO} * hidden, hidden], proj_out.weight [in_channels * patch^2, hidden], "
    "axes_dim three even sizes summing to head_dim"
)


# --- detection and layout -----------------------------------------------------


def is_qwen_image(keys: set[str]) -> bool:
    return set(QWEN_IMAGE_MARKERS) <= keys


def plan_comfy_layout_qwen(keys: Iterable[str]) -> LayoutPlan:
    """Layout plan for Qwen-Image keys (prefix stripped): every weight as stored, the Edit-2511 marker dropped."""
    return {key: ((key,), as_stored) for key in keys if key != EDIT_2511_MARKER}


# --- config from shapes -------------------------------------------------------


def _num_layers(shape: ShapeReader) -> int:
    indices = {int(m.group(1)) for key in shape.state_dict if (m := re.match(r"^transformer_blocks\.(\d+)\.", key))}
    count = max(indices) + 1 if indices else 0
    shape.seen["num_layers"] = count
    if not count:
        raise shape.error("there are no transformer_blocks")
    if gaps := sorted(set(range(count)) - indices):
        raise shape.error(f"transformer_blocks {gaps} are missing (blocks must be numbered 0..{count - 1})")
    return count


def _zero_cond_t(keys: Iterable[str], hints: Mapping[str, Any]) -> bool:
    """zero_cond_t from the Edit-2511 marker, a `variant` hint and a `zero_cond_t` hint, which must agree."""
    said: dict[str, bool] = {}
    if EDIT_2511_MARKER in keys:
        said[f"the '{EDIT_2511_MARKER}' tensor (Edit-2511)"] = True
    if "variant" in hints:
        name = hints["variant"]
        if not isinstance(name, str) or name not in ZERO_COND_T_OF_RELEASE:
            raise ValueError(
                f"metadata 'variant' = {name!r} is not a Qwen-Image release; use one of "
                f"{list(ZERO_COND_T_OF_RELEASE)}, or give 'zero_cond_t' (true for Edit-2511) instead"
            )
        said[f"metadata 'variant' = {name!r}"] = ZERO_COND_T_OF_RELEASE[name]
    if "zero_cond_t" in hints:
        value = hints["zero_cond_t"]
        if not isinstance(value, bool):
            raise ValueError(f"metadata 'zero_cond_t' = {value!r} is not a JSON boolean; use true or false")
        said["metadata 'zero_cond_t'"] = value
    if len(set(said.values())) > 1:
        raise ValueError(
            f"zero_cond_t is given both ways: {said}; remove the hint that does not describe this checkpoint"
        )
    return next(iter(said.values()), False)


def qwen_config_from_shapes(
    state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None
) -> QwenImageConfig:
    """Qwen-Image hyper-parameters from tensor shapes (prefix stripped; meta-device tensors suffice).

    `hints` (decoded metadata) may give `axes_dim`, `theta`, `patch_size`, `zero_cond_t`
    and `variant` (a release name from ZERO_COND_T_OF_RELEASE), which shapes cannot show.
    Raises ValueError listing what was seen and the expected signature when the shapes
    cannot form a QwenImageDiT.
    """
    hints = dict(hints or {})
    shape = ShapeReader(state_dict, "Qwen-Image", EXPECTED_SIGNATURE)
    if LAYERED_MARKER in state_dict:
        raise shape.error(
            f"'{LAYERED_MARKER}' is Qwen-Image-Layered's layer-index embedding, which QwenImageDiT does not have "
            "(Layered also uses a different RoPE); load Qwen-Image or an Edit release instead"
        )
    if CONTROLNET_MARKER in state_dict:
        raise shape.error(
            f"'{CONTROLNET_MARKER}' marks a Qwen-Image ControlNet, which steers the base model and cannot be "
            "trained as one; load the Qwen-Image base (or Edit) diffusion model"
        )
    num_layers = _num_layers(shape)
    hidden, patch_features = shape("img_in.weight", 2)
    shape.seen["hidden"] = hidden
    (head_dim,) = shape("transformer_blocks.0.attn.norm_q.weight", 1)
    shape.seen["head_dim"] = head_dim
    if hidden % head_dim:
        raise shape.error(
            f"hidden size {hidden} is not a multiple of head_dim {head_dim} ('transformer_blocks.0.attn.norm_q.weight')"
        )
    txt_rows, joint_attention_dim = shape("txt_in.weight", 2)
    (txt_norm,) = shape("txt_norm.weight", 1)
    shape.seen["joint_attention_dim"] = joint_attention_dim
    if txt_rows != hidden or txt_norm != joint_attention_dim:
        raise shape.error(
            f"txt_in.weight is {[txt_rows, joint_attention_dim]} and txt_norm.weight [{txt_norm}]; expected "
            f"[hidden {hidden}, joint_attention_dim] and [joint_attention_dim]"
        )
    mlp_in = shape("transformer_blocks.0.img_mlp.net.0.proj.weight", 2)
    if mlp_in != (MLP_RATIO * hidden, hidden):
        raise shape.error(
            f"'transformer_blocks.0.img_mlp.net.0.proj.weight' is {list(mlp_in)}, not [{MLP_RATIO} x hidden, hidden] = "
            f"[{MLP_RATIO * hidden}, {hidden}]: QwenImageDiT's MLP width is fixed at {MLP_RATIO} x hidden"
        )

    patch_size = int(hints.get("patch_size", RELEASED_CONFIG["patch_size"]))
    out_features = shape("proj_out.weight", 2)[0]
    if patch_features % patch_size**2 or out_features != patch_features:
        raise shape.error(
            f"img_in takes {patch_features} features per token and proj_out gives {out_features}: they must be equal "
            f"(in_channels x patch_size^2, patch_size {patch_size}); a model with extra input channels is not "
            "supported, and a different patch size needs the 'patch_size' metadata"
        )
    axes_dim = hinted_axes_dim(shape, hints, "flux1", head_dim)  # Flux.1's split: [16, 56, 56] at 128
    zero_cond_t = _zero_cond_t(state_dict, hints)
    try:
        return QwenImageConfig(
            in_channels=patch_features // patch_size**2,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=hidden // head_dim,
            head_dim=head_dim,
            joint_attention_dim=joint_attention_dim,
            axes_dim=list(axes_dim),
            theta=int(hints.get("theta", RELEASED_CONFIG["theta"])),
            zero_cond_t=zero_cond_t,
        )
    except ValueError as error:  # QwenImageConfig's own checks, e.g. axes_dim against head_dim
        raise shape.error(str(error)) from None


def qwen_variant(cfg: QwenImageConfig) -> str:
    """The release these hyper-parameters match: 'qwen-image' (also 2512, Edit, Edit-2509: same shapes and
    behaviour), 'qwen-image-edit-2511' for those shapes with zero_cond_t, else 'qwen-image-custom'."""
    if any(getattr(cfg, field) != value for field, value in RELEASED_CONFIG.items()):
        return "qwen-image-custom"
    return "qwen-image-edit-2511" if cfg.zero_cond_t else "qwen-image"
