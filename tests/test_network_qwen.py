"""Qwen-Image adapter targets, export and import, checked with ComfyUI's LoRA math.

The module tree is the engine's QwenImageDiT at toy sizes (the names-only test builds the
released size on the meta device). ComfyUI's comfy/ldm/qwen_image/model.py and diffusers'
QwenImageTransformer2DModel share its module names; diffusers' model loads its state dict
strictly, checks its Linear names at full size and is the reference for the peft files.
ComfyUI's QwenImage key map is transcribed in comfy_merge.py.

Foreign files (each written here the way its tool writes it):
  kohya             lora_unet_<path_>.lora_down / lora_up / alpha (sd-scripts' key form)
  musubi            the same, bf16, musubi-tuner's metadata (networks/lora_qwen_image.py); its
                    exclude pattern `.*(_mod_).*` never matches a dotted name like
                    `transformer_blocks.0.img_mod.1`, so its files carry img_mod.1 / txt_mod.1
  musubi-converted  musubi-tuner convert_lora.py --target other: diffusion_model.<path>.lora_A /
                    lora_B, sqrt(alpha / r) folded into both factors, no alpha (Qwen-Image names
                    come from its QWEN_IMAGE_KEYS table, so they are dotted correctly)
  ai-toolkit        diffusion_model.<path>.lora_A / lora_B, no alpha, every block Linear
  diffusers         transformer.<path>.lora_A / lora_B, no alpha
  peft              transformer.<path>.lora_A.default.weight (PEFT's adapter-name suffix)
  diffsynth         <path>.lora_A.default.weight, modulation included (DiffSynth-Studio)
  lycoris           lycoris_<path_>.lora_down / lora_up / alpha (SimpleTuner)
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from comfy_merge import comfy_key_map, comfy_patched_weights
from dit_trainer.training.models.qwen_image import QwenImageConfig, QwenImageDiT
from dit_trainer.training.network.comfy_format import adapter_state_dict, export_adapter, load_adapter_into
from dit_trainer.training.network.file_config import config_for_file
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.network.targets import module_kinds, select_modules
from test_adapter_math import VARIANTS, randomise_adapters
from test_adapter_math import one_cpu_thread  # noqa: F401  (pytest fixture, used by name)
from test_network_flux_names import assert_exact_in_comfyui_and_round_trips, checkpoint_of
from test_network_io import option_id, rel_err
from test_network_selection import qwen_image_modules

TOY = dict(in_channels=4, num_layers=2, num_heads=2, head_dim=8, joint_attention_dim=12, axes_dim=[2, 2, 4])
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLPS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
MODULATION = ("img_mod.1", "txt_mod.1")
OUTSIDE_BLOCKS = [
    "img_in", "txt_in", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
]
RANK, ALPHA = 2, 3.0


def qwen_tree() -> QwenImageDiT:
    """The engine's Qwen-Image at toy sizes (released: 60 layers, 24 heads x 128, 3584-wide text states)."""
    torch.manual_seed(0)
    return QwenImageDiT(QwenImageConfig(**TOY)).requires_grad_(False)


def diffusers_twin(model: QwenImageDiT) -> QwenImageTransformer2DModel:
    """diffusers' model of the same sizes holding `model`'s weights (a strict load: same state-dict names)."""
    cfg = model.cfg
    twin = QwenImageTransformer2DModel(
        in_channels=cfg.patch_features, out_channels=cfg.in_channels, num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim, axes_dims_rope=tuple(cfg.axes_dim),
    )
    twin.load_state_dict(model.state_dict())
    return twin


def qwen_key_map(model: QwenImageDiT) -> dict:
    return comfy_key_map(checkpoint_of(model), qwen_image=True)


def trained_qwen(**options) -> tuple[QwenImageDiT, LoRANetwork]:
    model = qwen_tree()
    network = LoRANetwork(model, "qwen_image", NetworkConfig(rank=RANK, **{"alpha": 1.5, **options})).attach()
    randomise_adapters(network, seed=3)
    return model, network


def block_layers(blocks: int, parts) -> set[str]:
    return {f"transformer_blocks.{n}.{p}" for n in range(blocks) for p in parts}


def linear_names(modules: list[tuple[str, str]]) -> set[str]:
    return {name for name, kind in modules if kind == "linear"}


def test_real_layout_default_targets():
    """The released 60-block layout, names only: 12 layers a block, 14 with exclude_mod=False."""
    with torch.device("meta"):
        layout = module_kinds(QwenImageDiT(QwenImageConfig()))
        reference = module_kinds(QwenImageTransformer2DModel())
    attention = [f"attn.{p}" for p in ATTENTION]
    chosen = select_modules(layout, "qwen_image", rank=16, alpha=1.0)
    assert len(chosen.names) == 60 * 12 == 720
    assert set(chosen.names) == block_layers(60, attention + list(MLPS))
    mod_skips = [name for name, reason in chosen.skipped if reason == "modulation layer (exclude_mod)"]
    assert set(mod_skips) == block_layers(60, MODULATION) and len(mod_skips) == 120
    with_mod = select_modules(layout, "qwen_image", rank=16, alpha=1.0, exclude_mod=False)
    assert set(with_mod.names) - set(chosen.names) == block_layers(60, MODULATION) and len(with_mod.names) == 840
    assert not [name for name in with_mod.names if not name.startswith("transformer_blocks.")]
    # diffusers' (= ComfyUI's) model and the hand-written layout of test_network_selection.py
    # have exactly these Linear layers.
    assert linear_names(layout) == linear_names(reference) == linear_names(qwen_image_modules())


def test_exclude_mod_on_the_toy_model():
    _, network = trained_qwen()
    assert set(network.names) == block_layers(2, [f"attn.{p}" for p in ATTENTION] + list(MLPS))
    assert {name for name, _ in network.skipped} >= block_layers(2, MODULATION)
    _, with_mod = trained_qwen(exclude_mod=False)
    assert set(with_mod.names) - set(network.names) == block_layers(2, MODULATION)


@pytest.mark.parametrize("style", ["comfy", "kohya", "peft"])
def test_exported_keys_are_exactly_the_module_paths(style):
    model, network = trained_qwen(exclude_mod=False, include_patterns=OUTSIDE_BLOCKS)
    assert set(OUTSIDE_BLOCKS) <= set(network.names)
    tensors = adapter_state_dict(network, style=style)
    prefix, suffix = {
        "comfy": ("diffusion_model.", ".lora_A.weight"),
        "kohya": ("lora_unet_", ".lora_down.weight"),
        "peft": ("transformer.", ".lora_A.weight"),  # diffusers' names are ComfyUI's
    }[style]
    modules = sorted(k[len(prefix) : -len(suffix)] for k in tensors if k.endswith(suffix))
    assert modules == sorted(n.replace(".", "_") if style == "kohya" else n for n in network.names)
    assert all(k.startswith(prefix) for k in tensors)
    key_map = qwen_key_map(model)
    assert all(f"{prefix}{module}" in key_map for module in modules)  # ComfyUI maps every one


def with_options(variant: dict, exclude_mod: bool) -> dict:
    return {**variant, "exclude_mod": exclude_mod, "include_patterns": [] if exclude_mod else OUTSIDE_BLOCKS}


CASES = [
    *[(variant, style) for variant in VARIANTS for style in ("comfy", "kohya")],
    # ComfyUI ignores PEFT's lora_magnitude_vector, so only LoRA files apply in the peft style.
    *[(variant, "peft") for variant in VARIANTS[:2]],
]


@pytest.mark.parametrize("exclude_mod", [True, False], ids=["exclude_mod", "with_mod"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("variant,style", CASES, ids=option_id)
def test_files_reproduce_the_engine_in_comfyui_and_round_trip(tmp_path, exclude_mod, strength, variant, style, one_cpu_thread):
    """Every adapted layer: ComfyUI's key map + LoRAAdapter / weight_decompose on our file (against the
    original weights) == the engine's layer at that strength == W0 + s (W_engine - W0) (fp32, 1e-5);
    exclude_mod=False also adapts the modulation and the layers outside the blocks."""
    model, network = trained_qwen(**with_options(variant, exclude_mod))
    path = export_adapter(network, tmp_path / "qwen.safetensors", style=style)
    assert_exact_in_comfyui_and_round_trips(model, network, path, qwen_key_map(model), strength)


PEFT_VARIANTS = [dict(algo="lora"), dict(algo="lora", use_rslora=True, alpha=4.0), dict(algo="dora", dora_axis="output")]


@pytest.mark.parametrize("variant", PEFT_VARIANTS, ids=option_id)
def test_peft_export_loads_in_diffusers_with_the_same_layers(tmp_path, variant):
    """diffusers' QwenImageTransformer2DModel.load_lora_adapter on our peft file reproduces every adapted layer."""
    model, network = trained_qwen(**with_options(variant, exclude_mod=False))
    reference = diffusers_twin(model)
    path = export_adapter(network, tmp_path / "peft.safetensors", style="peft")
    reference.load_lora_adapter(load_file(str(path)), prefix="transformer", adapter_name="ours")
    modules = dict(reference.named_modules())
    g = torch.Generator().manual_seed(6)
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features, generator=g)
        with torch.no_grad():
            ours, theirs = adapter.base(x), modules[adapter.name](x)
        assert rel_err(theirs, ours) < 1e-5, adapter.name
        assert rel_err(theirs, F.linear(x, adapter.original_weight(), adapter.base.bias)) > 1e-3, adapter.name


# format -> (module key of a dotted path, down / up suffixes, alpha stored, every block Linear incl. modulation)
FORMATS = {
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), (".lora_down.weight", ".lora_up.weight"), True, False),
    "musubi": (lambda p: "lora_unet_" + p.replace(".", "_"), (".lora_down.weight", ".lora_up.weight"), True, True),
    "musubi-converted": (lambda p: "diffusion_model." + p, (".lora_A.weight", ".lora_B.weight"), False, True),
    "ai-toolkit": (lambda p: "diffusion_model." + p, (".lora_A.weight", ".lora_B.weight"), False, True),
    "diffusers": (lambda p: "transformer." + p, (".lora_A.weight", ".lora_B.weight"), False, False),
    "peft": (lambda p: "transformer." + p, (".lora_A.default.weight", ".lora_B.default.weight"), False, False),
    "diffsynth": (lambda p: p, (".lora_A.default.weight", ".lora_B.default.weight"), False, True),
    "lycoris": (lambda p: "lycoris_" + p.replace(".", "_"), (".lora_down.weight", ".lora_up.weight"), True, False),
}
STYLES = {
    "kohya": "kohya", "musubi": "kohya", "musubi-converted": "comfy", "ai-toolkit": "comfy",
    "diffusers": "diffusers", "peft": "diffusers", "diffsynth": "bare", "lycoris": "lycoris",
}


def foreign_file(path, model: QwenImageDiT, fmt: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a LoRA of `model` in format `fmt`; returns the weight change it encodes per module."""
    module_key, (down_suffix, up_suffix), has_alpha, with_mod = FORMATS[fmt]
    names = LoRANetwork(model, "qwen_image", NetworkConfig(rank=RANK, exclude_mod=not with_mod)).names
    layers = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if fmt == "musubi" else torch.float32
    tensors, deltas = {}, {}
    for name in names:
        out_features, in_features = layers[name].weight.shape
        down = (torch.randn(RANK, in_features, generator=g) * 0.3).to(dtype)
        up = (torch.randn(out_features, RANK, generator=g) * 0.3).to(dtype)
        scale = ALPHA / RANK if has_alpha or fmt == "musubi-converted" else 1.0
        deltas[name] = scale * up.float() @ down.float()
        if fmt == "musubi-converted":  # convert_lora.py scales both factors by sqrt(alpha / rank), drops alpha
            down, up = down * math.sqrt(scale), up * math.sqrt(scale)
        key = module_key(name)
        tensors |= {key + down_suffix: down, key + up_suffix: up}
        if has_alpha:
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    metadata = {"ss_network_module": "networks.lora_qwen_image", "ss_network_dim": str(RANK)} if fmt == "musubi" else None
    save_file(tensors, str(path), metadata=metadata)
    return deltas


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_foreign_file_reproduces_its_weight_deltas(tmp_path, caplog, fmt):
    """The network `config_for_file` builds holds the file's weight change per module (<= 1e-6), and
    ComfyUI's merge of the same file agrees with it: every format here is one ComfyUI loads."""
    model = qwen_tree()
    path = tmp_path / f"{fmt}.safetensors"
    deltas = foreign_file(path, model, fmt)
    network = LoRANetwork(model, "qwen_image", config_for_file(model, "qwen_image", path)).attach()
    assert network.names == list(deltas)
    with caplog.at_level(logging.WARNING):
        report = load_adapter_into(network, path)
    assert sorted(report.loaded) == sorted(deltas) and not report.not_in_file
    assert report.styles == [STYLES[fmt]] and not report.warnings and not caplog.text
    for adapter in network.adapters:
        assert rel_err(adapter.delta_weight(), deltas[adapter.name]) <= 1e-6, adapter.name
    patched, not_loaded = comfy_patched_weights(checkpoint_of(model), load_file(str(path)), qwen_key_map(model), 1.0)
    assert not not_loaded, f"ComfyUI would log 'lora key not loaded' for {not_loaded}"
    g = torch.Generator().manual_seed(7)
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features, generator=g)
        with torch.no_grad():
            comfy = F.linear(x, patched[f"diffusion_model.{adapter.name}.weight"], adapter.base.bias)
            assert rel_err(adapter.base(x), comfy) < 1e-5, adapter.name


def test_musubi_modulation_needs_exclude_mod_off(tmp_path):
    """musubi's files adapt img_mod.1 / txt_mod.1: a default network names them and the fix."""
    model = qwen_tree()
    deltas = foreign_file(tmp_path / "musubi.safetensors", model, "musubi")
    default = LoRANetwork(model, "qwen_image", NetworkConfig(rank=RANK, alpha=ALPHA))
    fix = r"keys match no layer this qwen_image network adapts \(lora_unet_transformer_blocks_0_img_mod_1.*exclude_mod=False"
    with pytest.raises(ValueError, match=fix):
        load_adapter_into(default, tmp_path / "musubi.safetensors")
    with_mod = LoRANetwork(model, "qwen_image", NetworkConfig(rank=RANK, alpha=ALPHA, exclude_mod=False)).attach()
    report = load_adapter_into(with_mod, tmp_path / "musubi.safetensors")
    assert sorted(report.loaded) == sorted(deltas) and not report.rescaled
    for adapter in with_mod.adapters:
        assert rel_err(adapter.delta_weight(), deltas[adapter.name]) <= 1e-6, adapter.name


def test_file_without_alpha_into_a_network_with_its_own_scale(tmp_path):
    """ai-toolkit's alpha-less file (scale 1) in a network at alpha / rank = 0.5: B rescaled, same weight change."""
    model = qwen_tree()
    deltas = foreign_file(tmp_path / "aitk.safetensors", model, "ai-toolkit")
    network = LoRANetwork(model, "qwen_image", NetworkConfig(rank=RANK, alpha=1.0, exclude_mod=False)).attach()
    report = load_adapter_into(network, tmp_path / "aitk.safetensors")
    assert sorted(report.rescaled) == sorted(deltas)
    for adapter in network.adapters:
        assert rel_err(adapter.delta_weight(), deltas[adapter.name]) <= 1e-6, adapter.name
