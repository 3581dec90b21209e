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
`flux_to_diffusers`); Qwen-Image's ComfyUI names already are diffusers names.
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


@dataclass(frozen=True)
class Alias:
    """Another name of (part of) an adapted layer: `rows` = (offset, count) of its output rows."""

    name: str
    rows: tuple[int, int] | None = None


def split_key(key: str) -> tuple[str, str] | None:
    """(module part, role) of a LoRA file key, or None when the suffix is not a LoRA one."""
    for suffix, role in SUFFIX_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


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


_FLUX_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
_FLUX_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
# Outside the blocks (final_layer.adaLN_modulation.1 is left out: diffusers swaps its
# scale / shift halves, so a LoRA on it does not carry over by renaming).
_FLUX_TOP = {
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


def _flux_aliases(name: str, out_features: int, in_features: int) -> list[Alias]:
    if match := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name):
        block, rest = match.groups()
        prefix = f"transformer_blocks.{block}."
        if rest in ("img_attn.qkv", "txt_attn.qkv"):
            parts = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            return _slices([prefix + "attn." + p for p in parts], split_dims("flux", name, out_features, in_features))
        if rest in _FLUX_DOUBLE:
            return [Alias(prefix + _FLUX_DOUBLE[rest])]
    if match := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", name):
        block, rest = match.groups()
        prefix = f"single_transformer_blocks.{block}."
        if rest == "linear1":
            names = [prefix + "attn." + p for p in ("to_q", "to_k", "to_v")] + [prefix + "proj_mlp"]
            return _slices(names, split_dims("flux", name, out_features, in_features))
        if rest in _FLUX_SINGLE:
            return [Alias(prefix + _FLUX_SINGLE[rest])]
    if name in _FLUX_TOP:
        return [Alias(_FLUX_TOP[name])]
    return []


def diffusers_aliases(architecture: str, name: str, out_features: int, in_features: int) -> list[Alias]:
    """Diffusers names of a ComfyUI layer (several for a fused projection); [] when identical."""
    if architecture == "zimage":
        return _zimage_aliases(name, out_features, in_features)
    if architecture == "flux":
        return _flux_aliases(name, out_features, in_features)
    return []


def key_forms(module_name: str) -> dict[str, str]:
    """Every accepted module-key form of a dotted module name -> its key style."""
    forms = {prefix + module_name: style for prefix, style in DOTTED_PREFIXES.items()}
    underscored = module_name.replace(".", "_")
    forms.update({prefix + underscored: style for prefix, style in UNDERSCORE_PREFIXES.items()})
    return forms
