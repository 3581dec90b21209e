"""Flux.1 / Flux.2 names without a Flux model: module trees with ComfyUI's (BFL's) Flux layout at toy sizes.

Checks the default targets and splits on the toy trees, the diffusers aliases against
ComfyUI's own `flux_to_diffusers` (transcribed in comfy_merge.py), the exported key names,
and that every export style, merged with ComfyUI's LoRA math, reproduces the engine's
layers at strength 1 and 0.5, for both families. The real-size layouts are checked by
name in test_network_selection.py (Flux.1) and test_network_flux2.py (Flux.2).
"""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from comfy_merge import comfy_key_map, comfy_patched_weights
from dit_trainer.training.network.comfy_format import adapter_state_dict, export_adapter, load_adapter_into
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.network.targets import select_modules
from test_adapter_math import VARIANTS, randomise_adapters
from test_adapter_math import one_cpu_thread  # noqa: F401  (pytest fixture, used by name)
from test_network_io import option_id, rel_err
from test_network_selection import flux_modules

HIDDEN = 8  # Flux.1: 3072; Flux.2 dev 6144, klein 4B 3072, klein 9B 4096
MLP = {"flux1": 4 * HIDDEN, "flux2": 3 * HIDDEN}  # mlp_ratio 4 (GELU) / 3 (SwiGLU: 2 * mlp_hidden in)
IN_CHANNELS, CONTEXT = 4, 12
ARCHITECTURE = {"flux1": "flux", "flux2": "flux2"}


def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, std=0.3)
    if bias:
        nn.init.normal_(layer.bias, std=0.3)
    return layer


class RMSNormScale(nn.Module):
    """Stands for QKNorm's RMSNorm: a `scale` parameter, no Linear (never an adapter target)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


def qk_norm() -> nn.Module:
    norm = nn.Module()
    norm.query_norm, norm.key_norm = RMSNormScale(2), RMSNormScale(2)
    return norm


def double_block(family: str) -> nn.Module:
    bias, mlp = family == "flux1", MLP[family]
    block = nn.Module()
    for stream in ("img", "txt"):
        if family == "flux1":  # Flux.2 has no per-block modulation
            mod = nn.Module()
            mod.lin = linear(HIDDEN, 6 * HIDDEN, bias)
            setattr(block, f"{stream}_mod", mod)
        attn = nn.Module()
        attn.qkv = linear(HIDDEN, 3 * HIDDEN, bias)
        attn.norm = qk_norm()
        attn.proj = linear(HIDDEN, HIDDEN, bias)
        setattr(block, f"{stream}_attn", attn)
        mlp_in = 2 * mlp if family == "flux2" else mlp
        # The activation is a placeholder (GELU / SwiGLU): the toy is never run, only its layers are.
        setattr(block, f"{stream}_mlp", nn.Sequential(linear(HIDDEN, mlp_in, bias), nn.GELU(), linear(mlp, HIDDEN, bias)))
    return block


def single_block(family: str) -> nn.Module:
    bias, mlp = family == "flux1", MLP[family]
    block = nn.Module()
    block.linear1 = linear(HIDDEN, 3 * HIDDEN + (2 * mlp if family == "flux2" else mlp), bias)
    block.linear2 = linear(HIDDEN + mlp, HIDDEN, bias)
    block.norm = qk_norm()
    if family == "flux1":
        block.modulation = nn.Module()
        block.modulation.lin = linear(HIDDEN, 3 * HIDDEN, bias)
    return block


class FluxToy(nn.Module):
    """Blocks named as comfy/ldm/flux (Flux.1) and BFL's flux2 (Flux.2), Linear sizes as the real ones.

    Flux.2: no biases, SwiGLU MLP input 2 * mlp_hidden, linear1 = q | k | v | 2 * mlp_hidden,
    three shared modulation layers instead of one per block.
    """

    def __init__(self, family: str = "flux1", depth: int = 1, depth_single: int = 1):
        super().__init__()
        torch.manual_seed(0)
        bias = family == "flux1"
        self.img_in = linear(IN_CHANNELS, HIDDEN, bias)
        self.time_in = nn.Module()
        self.time_in.in_layer, self.time_in.out_layer = linear(16, HIDDEN, bias), linear(HIDDEN, HIDDEN, bias)
        self.txt_in = linear(CONTEXT, HIDDEN, bias)
        self.double_blocks = nn.ModuleList([double_block(family) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([single_block(family) for _ in range(depth_single)])
        if family == "flux2":
            for name, sets in (("double_stream_modulation_img", 2), ("double_stream_modulation_txt", 2), ("single_stream_modulation", 1)):
                modulation = nn.Module()
                modulation.lin = linear(HIDDEN, 3 * sets * HIDDEN, bias)
                setattr(self, name, modulation)
        self.final_layer = nn.Module()
        self.final_layer.linear = linear(HIDDEN, IN_CHANNELS, bias)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(HIDDEN, 2 * HIDDEN, bias))
        self.requires_grad_(False)
        self.family, self.depth, self.depth_single = family, depth, depth_single


def checkpoint_of(model: FluxToy) -> dict[str, torch.Tensor]:
    return {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}


def flux_key_map(model: FluxToy) -> dict:
    """ComfyUI's key map for the toy (the same Flux branch serves Flux.1 and Flux.2)."""
    layout = dict(depth=model.depth, depth_single_blocks=model.depth_single, hidden_size=HIDDEN)
    return comfy_key_map(checkpoint_of(model), flux=layout)


def trained_flux(family: str = "flux1", depth: int = 1, depth_single: int = 1, **options) -> tuple[FluxToy, LoRANetwork]:
    model = FluxToy(family, depth, depth_single)
    network = LoRANetwork(model, ARCHITECTURE[family], NetworkConfig(rank=2, **{"alpha": 1.5, **options})).attach()
    randomise_adapters(network, seed=3)
    return model, network


def layer_outputs(network: LoRANetwork) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        return {a.name: a.base(torch.randn(3, a.base.in_features, generator=g)) for a in network.adapters}


def assert_exact_in_comfyui_and_round_trips(model, network: LoRANetwork, path, key_map: dict, strength: float) -> None:
    """Every adapted layer: ComfyUI's key map + LoRAAdapter / weight_decompose on the file at `path` (against the
    original weights) == the engine's layer at that strength == W0 + s (W_engine - W0) (fp32, 1e-5); and the
    file loads back into a fresh network that reproduces the layers (1e-6)."""
    patched, not_loaded = comfy_patched_weights(checkpoint_of(model), load_file(str(path)), key_map, strength)
    assert not not_loaded, f"ComfyUI would log 'lora key not loaded' for {not_loaded}"
    assert sorted(patched) == sorted(f"diffusion_model.{name}.weight" for name in network.names)
    network.set_multiplier(strength)
    g = torch.Generator().manual_seed(5)
    for adapter in network.adapters:
        x = torch.randn(3, 5, adapter.base.in_features, generator=g)
        original = adapter.original_weight()
        interpolated = original + strength * (adapter.adapted_weight() - original)
        with torch.no_grad():
            engine = adapter.base(x)
            comfy = F.linear(x, patched[f"diffusion_model.{adapter.name}.weight"], adapter.base.bias)
        assert rel_err(comfy, engine) < 1e-5, adapter.name
        assert rel_err(comfy, F.linear(x, interpolated, adapter.base.bias)) < 1e-5, adapter.name
        assert rel_err(comfy, F.linear(x, original, adapter.base.bias)) > 1e-3, adapter.name  # the adapter does something
    network.set_multiplier(1.0)
    expected = layer_outputs(network)
    network.detach_from_model()
    fresh = LoRANetwork(model, network.architecture, network.cfg).attach()
    load_adapter_into(fresh, path)
    for name, got in layer_outputs(fresh).items():
        assert rel_err(got, expected[name]) <= 1e-6, name


def test_flux1_modulation_is_reported_as_skipped():
    selection = select_modules(flux_modules(), "flux", rank=4, alpha=1.0)
    assert len(selection.names) == 228
    skipped = dict(selection.skipped)
    assert len(skipped) == 19 * 2 + 38
    assert skipped["double_blocks.0.txt_mod.lin"] == skipped["single_blocks.37.modulation.lin"] == "modulation layer (exclude_mod)"


def test_default_targets_and_split_dims():
    model, network = trained_flux(split_qkv=True)
    assert len(network.names) == 10  # 8 per double block + linear1 / linear2
    split = {a.name: a.split_dims for a in network.adapters if a.split_dims}
    assert split == {
        "double_blocks.0.img_attn.qkv": [HIDDEN] * 3,
        "double_blocks.0.txt_attn.qkv": [HIDDEN] * 3,
        "single_blocks.0.linear1": [HIDDEN] * 3 + [MLP["flux1"]],
    }


def test_peft_names_are_the_ones_comfyui_maps():
    _, network = trained_flux()
    tensors = adapter_state_dict(network, style="peft")
    modules = sorted({k[len("transformer.") : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    assert modules == sorted(
        [f"transformer_blocks.0.{m}" for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        )]
        + [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")]
    )
    key_map = flux_key_map(FluxToy())
    assert all(f"transformer.{module}" in key_map for module in modules)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_peft_refuses_layers_comfyui_cannot_map(tmp_path, family):
    """final_layer.adaLN_modulation.1 (both families; diffusers swaps its halves) has no mapped diffusers name."""
    _, network = trained_flux(family, include_patterns=[r"final_layer\.adaLN_modulation\.1"])
    refusal = r"style 'peft': ComfyUI maps no diffusers name for 1 .*final_layer\.adaLN_modulation\.1.*style='comfy' or 'kohya'"
    with pytest.raises(ValueError, match=refusal):
        export_adapter(network, tmp_path / "a.safetensors", style="peft")
    export_adapter(network, tmp_path / "a.safetensors", style="comfy")  # the styles it names do work


@pytest.mark.parametrize("family", ["flux1", "flux2"])
@pytest.mark.parametrize("style", ["comfy", "kohya"])
def test_exported_keys_are_exactly_the_module_paths(family, style):
    outside_blocks = ["img_in", "txt_in", r"time_in\..*", r"final_layer\..*"]
    _, network = trained_flux(family, split_qkv=True, exclude_mod=False, include_patterns=outside_blocks)
    tensors = adapter_state_dict(network, style=style)
    prefix, suffix = ("diffusion_model.", ".lora_A.weight") if style == "comfy" else ("lora_unet_", ".lora_down.weight")
    modules = sorted(k[len(prefix) : -len(suffix)] for k in tensors if k.endswith(suffix))
    expected = sorted(n if style == "comfy" else n.replace(".", "_") for n in network.names)
    assert modules == expected
    assert all(k.startswith(prefix) for k in tensors)
    if style == "comfy":
        # No underscore where the module path has a dot (the broken converter form `img_attn_qkv`).
        assert not [k for k in tensors if re.search(r"_(attn|mlp|mod)_|_(qkv|proj|lin)\.|stream_modulation_(img|txt)_lin", k)]


CASES = [
    *[(variant, style) for variant in VARIANTS for style in ("comfy", "kohya")],
    # ComfyUI ignores PEFT's lora_magnitude_vector, so only LoRA files apply in the peft style.
    *[(variant, "peft") for variant in VARIANTS[:2]],
    *[(dict(algo="lora", split_qkv=True), style) for style in ("comfy", "kohya", "peft")],
]


@pytest.mark.parametrize("family", ["flux1", "flux2"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("variant,style", CASES, ids=option_id)
def test_flux_files_reproduce_the_engine_in_comfyui_and_round_trip(tmp_path, family, strength, variant, style, one_cpu_thread):
    """Every adapted layer: ComfyUI's key map + LoRAAdapter / weight_decompose on our file (against the
    original weights) == the engine's layer at that strength == W0 + s (W_engine - W0) (fp32, 1e-5)."""
    model, network = trained_flux(family, depth=2, depth_single=2, **variant)
    path = export_adapter(network, tmp_path / "flux.safetensors", style=style)
    assert_exact_in_comfyui_and_round_trips(model, network, path, flux_key_map(model), strength)
