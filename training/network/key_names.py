"""Adapter key names: ComfyUI module paths, their diffusers / PEFT aliases, and key forms.

A LoRA file key is <prefix><module><suffix>. The module is a ComfyUI path
(`layers.0.attention.qkv`) or, where ComfyUI maps one, a diffusers path
(`layers.0.attention.to_q`, a row slice of the fused qkv). The forms read here are
the ones ComfyUI's `model_lora_keys_unet` accepts for our architectures:

    diffusion_model.<path>       ComfyUI / ours           <path> dotted
    lora_unet_<path_>            kohya sd-scripts, musubi  dots -> underscores
    transformer.<path>           diffusers, ai-toolkit     dotted
    base_model.model.<path>      PEFT                      dotted
    <path>                       DiffSynth / bare          dotted
    lycoris_<path_>, lora_transformer_<path_>  LyCORIS, OneTrainer

Diffusers aliases follow ComfyUI's comfy/utils.py (`z_image_to_diffusers`,
`flux_to_diffusers`); Qwen-Image's ComfyUI names already are diffusers names, which
ComfyUI's QwenImage branch maps bare, under `transformer.` and as `lycoris_<path_>` (not
under `base_model.model.` or `lora_transformer_`, read here all the same). ComfyUI
builds the Flux.2 key map with the same `flux_to_diffusers` (model_base.Flux2 is a
Flux), which since its Flux.2 support also maps diffusers' Flux.2 names: `ff.linear_in`
/ `ff.linear_out` (img_mlp.0 / .2), `attn.to_qkv_mlp_proj` / `attn.to_out` (linear1 /
linear2). Diffusers names ComfyUI does not map (Flux.2's `time_guidance_embed.*` and
shared `*_modulation.linear`) are read here but never written (`comfy_maps=False`).

One broken form is read too: a dotted prefix followed by a path with underscores for
some of its dots (`diffusion_model.double_blocks.0.img_attn_qkv`), which musubi-tuner's
convert_lora.py writes for Flux (its HunyuanVideo name repair) and ComfyUI ignores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .targets import split_dims

COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "transformer."
# module-key prefix -> key style (dotted module names follow).
DOTTED_PREFIXES = {
    "base_model.model.transformer.": "peft",
    "base_model.model.": "peft",
    COMFY_PREFIX: "comfy",
    PEFT_PREFIX: "diffusers",
    "": "bare",
}
UNDERSCORE_PREFIXES = {KOHYA_PREFIX: "kohya", "lycoris_": "lycoris", "lora_transformer_": "onetrainer"}
# Style of keys in the broken converter form (see the module docstring).
MANGLED_STYLE = "mangled_converter"
# Text-encoder adapters: we train the diffusion model only, so these are reported and skipped.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoders.", "text_encoder.", "te1.", "te2.")

# suffix -> role, longest first (".lora_A.default.weight" before ".lora_A.weight").
SUFFIX_ROLES = (
    (".lora_magnitude_vector.default.weight", "magnitude"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
)
# LoHa / LoKr tensors (LyCORIS names, which ComfyUI reads): the role is the name itself.
PRODUCT_ROLES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
)


@dataclass(frozen=True)
class Alias:
    """Another name of (part of) an adapted layer: `rows` = (offset, count) of its output rows.

    comfy_maps: ComfyUI's key map has this name, so a file may be written with it.
    """

    name: str
    rows: tuple[int, int] | None = None
    comfy_maps: bool = True


def split_key(key: str) -> tuple[str, str] | None:
    """(module part, role) of a LoRA file key, or None when the suffix is not a LoRA one."""
    for suffix, role in SUFFIX_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    module, _, role = key.rpartition(".")
    return (module, role) if module and role in PRODUCT_ROLES else None


def _slices(names: list[str], sizes: list[int]) -> list[Alias]:
    aliases, offset = [], 0
    for name, size in zip(names, sizes):
        aliases.append(Alias(name, (offset, size)))
        offset += size
    return aliases


def _zimage_aliases(name: str, out_features: int, in_features: int) -> list[Alias]:
    if name.endswith(".attention.qkv"):
        base = name[: -len("qkv")]
        return _slices([base + p for p in ("to_q", "to_k", "to_v")], split_dims("zimage", name, out_features, in_features))
    if name.endswith(".attention.out"):
        return [Alias(name[: -len("out")] + "to_out.0")]
    # The released model's patch embedder / final layer keys carry "<patch>-<frame patch>".
    if name == "x_embedder":
        return [Alias("all_x_embedder.2-1")]
    if name.startswith("final_layer."):
        return [Alias("all_final_layer.2-1." + name[len("final_layer.") :])]
    return []


# Flux.1 diffusers names (diffusers' FluxTransformer2DModel), all in ComfyUI's key map.
_FLUX1_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
_FLUX1_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
# Outside the blocks (final_layer.adaLN_modulation.1 is left out in both families:
# diffusers swaps its scale / shift halves, so a LoRA on it does not carry over by renaming).
_FLUX1_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
# Flux.2 diffusers names (diffusers' Flux2Transformer2DModel); the single blocks keep
# linear1 whole (`to_qkv_mlp_proj`), so no q / k / v / MLP slices there.
_FLUX2_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_FLUX2_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
# Diffusers' Flux.2 names that ComfyUI's flux_to_diffusers lacks (it maps the Flux.1
# `time_text_embed.*` names instead, and no modulation name of Flux.2).
_FLUX2_TOP_UNMAPPED = {
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
}


def _flux_aliases(architecture: str, name: str, out_features: int, in_features: int) -> list[Alias]:
    flux2 = architecture == "flux2"
    if match := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name):
        block, rest = match.groups()
        prefix = f"transformer_blocks.{block}."
        if rest in ("img_attn.qkv", "txt_attn.qkv"):
            parts = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            sizes = split_dims(architecture, name, out_features, in_features)
            return _slices([prefix + "attn." + p for p in parts], sizes)
        double = _FLUX2_DOUBLE if flux2 else _FLUX1_DOUBLE
        if rest in double:
            return [Alias(prefix + double[rest])]
    if match := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", name):
        block, rest = match.groups()
        prefix = f"single_transformer_blocks.{block}."
        if flux2:
            return [Alias(prefix + _FLUX2_SINGLE[rest])] if rest in _FLUX2_SINGLE else []
        if rest == "linear1":
            names = [prefix + "attn." + p for p in ("to_q", "to_k", "to_v")] + [prefix + "proj_mlp"]
            return _slices(names, split_dims(architecture, name, out_features, in_features))
        if rest in _FLUX1_SINGLE:
            return [Alias(prefix + _FLUX1_SINGLE[rest])]
    if flux2:
        if name in _FLUX2_TOP:
            return [Alias(_FLUX2_TOP[name])]
        if name in _FLUX2_TOP_UNMAPPED:
            return [Alias(_FLUX2_TOP_UNMAPPED[name], comfy_maps=False)]
    elif name in _FLUX1_TOP:
        return [Alias(_FLUX1_TOP[name])]
    return []


def diffusers_aliases(architecture: str, name: str, out_features: int, in_features: int) -> list[Alias]:
    """Diffusers names of a ComfyUI layer (several for a fused projection); [] when identical."""
    if architecture == "zimage":
        return _zimage_aliases(name, out_features, in_features)
    if architecture in ("flux", "flux2"):
        return _flux_aliases(architecture, name, out_features, in_features)
    return []


def peft_aliases(architecture: str, name: str, out_features: int, in_features: int) -> list[Alias]:
    """The diffusers names the peft style writes for a layer; [] when ComfyUI would load none of them.

    Flux: ComfyUI reads `transformer.*` only through flux_to_diffusers, so a layer without a
    mapped diffusers name cannot be written. Z-Image / Qwen-Image: an unaliased layer keeps
    its ComfyUI name, which ComfyUI's key map has under `transformer.` as well.
    """
    aliases = diffusers_aliases(architecture, name, out_features, in_features)
    if architecture in ("flux", "flux2"):
        return [alias for alias in aliases if alias.comfy_maps]
    return aliases or [Alias(name)]


def key_forms(module_name: str) -> dict[str, str]:
    """Every accepted module-key form of a dotted module name -> its key style."""
    forms = {prefix + module_name: style for prefix, style in DOTTED_PREFIXES.items()}
    underscored = module_name.replace(".", "_")
    forms.update({prefix + underscored: style for prefix, style in UNDERSCORE_PREFIXES.items()})
    return forms


def mangled_as_kohya(module_key: str) -> str | None:
    """The kohya form (`lora_unet_<path_>`) of a key in the broken converter form, else None.

    `diffusion_model.double_blocks.0.img_attn_qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`:
    a dotted prefix, then a path that still has dots but also underscores where dots were.
    Looked up only for keys that match no accepted form, so a real dotted path never lands here.
    """
    for prefix in DOTTED_PREFIXES:
        if module_key.startswith(prefix):
            path = module_key[len(prefix) :]
            return KOHYA_PREFIX + path.replace(".", "_") if "." in path and "_" in path else None
    return None
