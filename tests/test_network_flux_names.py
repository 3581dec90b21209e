"""Flux.1 names without a Flux model: a module tree with ComfyUI's Flux layout at toy sizes.

Checks the diffusers aliases against ComfyUI's own `flux_to_diffusers` (transcribed in
comfy_merge.py), the 4-way split of single_blocks.N.linear1 (q, k, v, MLP in), and
round trips through every key style.
"""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from comfy_merge import comfy_key_map, comfy_patched_weights
from dit_trainer.training.network.comfy_format import adapter_state_dict, export_adapter, load_adapter_into
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig

HIDDEN, MLP = 8, 32  # Flux.1: 3072 and 4 * 3072


def linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=0.3)
    return layer


class FluxToy(nn.Module):
    """One double and one single block named as comfy/ldm/flux (Linear layers only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        double = nn.Module()
        for stream in ("img", "txt"):
            setattr(double, f"{stream}_mod", nn.Module())
            getattr(double, f"{stream}_mod").lin = linear(HIDDEN, 6 * HIDDEN)
            setattr(double, f"{stream}_attn", nn.Module())
            getattr(double, f"{stream}_attn").qkv = linear(HIDDEN, 3 * HIDDEN)
            getattr(double, f"{stream}_attn").proj = linear(HIDDEN, HIDDEN)
            setattr(double, f"{stream}_mlp", nn.Sequential(linear(HIDDEN, MLP), nn.GELU(), linear(MLP, HIDDEN)))
        single = nn.Module()
        single.linear1 = linear(HIDDEN, 3 * HIDDEN + MLP)
        single.linear2 = linear(HIDDEN + MLP, HIDDEN)
        single.modulation = nn.Module()
        single.modulation.lin = linear(HIDDEN, 3 * HIDDEN)
        self.double_blocks = nn.ModuleList([double])
        self.single_blocks = nn.ModuleList([single])
        self.requires_grad_(False)


def trained_flux(**options) -> tuple[FluxToy, LoRANetwork]:
    model = FluxToy()
    network = LoRANetwork(model, "flux", NetworkConfig(rank=2, alpha=1.5, **options)).attach()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in network.adapters:
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.3)
    return model, network


def layer_outputs(network: LoRANetwork) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        return {a.name: a.base(torch.randn(3, a.base.in_features, generator=g)) for a in network.adapters}


def test_default_targets_and_split_dims():
    model, network = trained_flux(split_qkv=True)
    assert len(network.names) == 10  # 8 per double block + linear1 / linear2
    split = {a.name: a.split_dims for a in network.adapters if a.split_dims}
    assert split == {
        "double_blocks.0.img_attn.qkv": [HIDDEN] * 3,
        "double_blocks.0.txt_attn.qkv": [HIDDEN] * 3,
        "single_blocks.0.linear1": [HIDDEN] * 3 + [MLP],
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


@pytest.mark.parametrize("style", ["comfy", "kohya", "peft"])
@pytest.mark.parametrize("split_qkv", [False, True])
def test_flux_files_reproduce_the_engine_in_comfyui_and_round_trip(tmp_path, style, split_qkv):
    model, network = trained_flux(split_qkv=split_qkv)
    checkpoint = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    expected = layer_outputs(network)
    path = export_adapter(network, tmp_path / "flux.safetensors", style=style)
    key_map = comfy_key_map(checkpoint, flux=dict(depth=1, depth_single_blocks=1, hidden_size=HIDDEN))
    patched, not_loaded = comfy_patched_weights(checkpoint, load_file(str(path)), key_map, 1.0)
    assert not not_loaded
    g = torch.Generator().manual_seed(4)
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features, generator=g)
        comfy = torch.nn.functional.linear(x, patched[f"diffusion_model.{adapter.name}.weight"], adapter.base.bias)
        assert ((comfy - expected[adapter.name]).abs().max() / expected[adapter.name].abs().max()) < 1e-5, adapter.name
    network.detach_from_model()
    fresh = LoRANetwork(model, "flux", NetworkConfig(rank=2, alpha=1.5, split_qkv=split_qkv)).attach()
    load_adapter_into(fresh, path)
    for name, got in layer_outputs(fresh).items():
        assert ((got - expected[name]).abs().max() / expected[name].abs().max()) <= 1e-6, name
