"""Flux.2 adapter targets and names: real-size layouts (names only), splits, modulation, diffusers names.

The ComfyUI-merge checks of every export style run for Flux.2 in test_network_flux_names.py
(parametrised over both families); here are the Flux.2-only rules and a check of the peft
file against diffusers' own Flux2Transformer2DModel.
"""

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file

from dit_trainer.training.network.comfy_format import adapter_state_dict, export_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.network.targets import select_modules, split_dims
from test_network_flux_names import CONTEXT, HIDDEN, IN_CHANNELS, MLP, FluxToy, flux_key_map, trained_flux
from test_network_io import option_id, rel_err
from test_network_selection import flux_modules

SHARED_MODULATION = ["double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"]


@pytest.mark.parametrize(
    "depth,depth_single,count",
    [(8, 48, 160), (5, 20, 80), (8, 24, 112)],
    ids=["dev", "klein-4b", "klein-9b"],
)
def test_real_layouts_default_targets(depth, depth_single, count):
    layout = flux_modules("flux2", depth, depth_single)
    chosen = select_modules(layout, "flux2", rank=16, alpha=1.0)
    assert len(chosen.names) == depth * 8 + depth_single * 2 == count
    assert set(chosen.names) == {
        f"double_blocks.{n}.{stream}_{layer}"
        for n in range(depth)
        for stream in ("img", "txt")
        for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    } | {f"single_blocks.{n}.linear{i}" for n in range(depth_single) for i in (1, 2)}
    assert [name for name, reason in chosen.skipped if reason == "modulation layer (exclude_mod)"] == SHARED_MODULATION
    with_mod = select_modules(layout, "flux2", rank=16, alpha=1.0, exclude_mod=False)
    assert set(with_mod.names) - set(chosen.names) == set(SHARED_MODULATION) and len(with_mod.names) == count + 3


def test_flux1_modulation_names_are_not_flux2_targets():
    """Negative control: a Flux.1 layout under the flux2 rules adapts no per-block modulation."""
    chosen = select_modules(flux_modules("flux1", 2, 2), "flux2", rank=4, alpha=1.0, exclude_mod=False)
    assert not [name for name in chosen.names if "mod" in name]


def test_split_dims_of_the_fused_projections():
    hidden, mlp_hidden = 6144, 18432  # Flux.2 dev
    assert split_dims("flux2", "single_blocks.0.linear1", 3 * hidden + 2 * mlp_hidden, hidden) == [hidden] * 3 + [2 * mlp_hidden]
    assert split_dims("flux2", "double_blocks.7.txt_attn.qkv", 3 * hidden, hidden) == [hidden] * 3
    assert split_dims("flux2", "double_blocks.0.img_mlp.0", 2 * mlp_hidden, hidden) is None
    model, network = trained_flux("flux2", split_qkv=True)
    split = {a.name: a.split_dims for a in network.adapters if a.split_dims}
    assert split == {
        "double_blocks.0.img_attn.qkv": [HIDDEN] * 3,
        "double_blocks.0.txt_attn.qkv": [HIDDEN] * 3,
        "single_blocks.0.linear1": [HIDDEN] * 3 + [2 * MLP["flux2"]],
    }


def test_shared_modulation_only_with_exclude_mod_off():
    _, network = trained_flux("flux2")
    assert not set(SHARED_MODULATION) & set(network.names)
    assert {name for name, _ in network.skipped} >= set(SHARED_MODULATION)
    _, with_mod = trained_flux("flux2", exclude_mod=False)
    assert set(SHARED_MODULATION) <= set(with_mod.names)


DIFFUSERS_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
QKV_PARTS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


def diffusers_modules(name: str) -> list[str]:
    """Diffusers Flux2Transformer2DModel modules holding the ComfyUI layer `name` (row slices in order)."""
    kind, index, rest = name.split(".", 2)
    if kind == "double_blocks":
        parts = QKV_PARTS[rest] if rest in QKV_PARTS else (DIFFUSERS_DOUBLE[rest],)
        return [f"transformer_blocks.{index}.{part}" for part in parts]
    return [f"single_transformer_blocks.{index}.attn." + {"linear1": "to_qkv_mlp_proj", "linear2": "to_out"}[rest]]


def reference_model(model: FluxToy) -> Flux2Transformer2DModel:
    """A tiny diffusers Flux.2 holding the toy's block weights."""
    reference = Flux2Transformer2DModel(
        in_channels=IN_CHANNELS, num_layers=model.depth, num_single_layers=model.depth_single, attention_head_dim=HIDDEN,
        num_attention_heads=1, joint_attention_dim=CONTEXT, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2),
    )
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
                targets = diffusers_modules(name)
                for target, rows in zip(targets, layer.weight.chunk(len(targets))):
                    modules[target].weight.copy_(rows)
    return reference


PEFT_VARIANTS = [
    dict(algo="lora"),
    dict(algo="lora", use_rslora=True, alpha=4.0),
    dict(algo="dora", dora_axis="output"),
    dict(algo="lora", split_qkv=True),
]


@pytest.mark.parametrize("variant", PEFT_VARIANTS, ids=option_id)
def test_peft_export_loads_in_diffusers_flux2(tmp_path, variant):
    """diffusers' Flux2Transformer2DModel.load_lora_adapter on our peft file reproduces every adapted layer,
    and every name in the file is one ComfyUI maps too."""
    model, network = trained_flux("flux2", depth=2, depth_single=2, **variant)
    reference = reference_model(model)
    path = export_adapter(network, tmp_path / "peft.safetensors", style="peft")
    tensors = load_file(str(path))
    key_map = flux_key_map(model)
    assert all(key.rsplit(".lora_", 1)[0] in key_map for key in tensors if ".lora_" in key)
    reference.load_lora_adapter(tensors, prefix="transformer", adapter_name="ours")
    modules = dict(reference.named_modules())
    g = torch.Generator().manual_seed(6)
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features, generator=g)
        with torch.no_grad():
            ours = adapter.base(x)
            theirs = torch.cat([modules[target](x) for target in diffusers_modules(adapter.name)], dim=-1)
        assert rel_err(theirs, ours) < 1e-5, adapter.name
        assert rel_err(theirs, torch.nn.functional.linear(x, adapter.original_weight())) > 1e-3  # the LoRA is applied


def test_peft_names_of_flux2():
    _, network = trained_flux("flux2")
    tensors = adapter_state_dict(network, style="peft")
    modules = sorted({k[len("transformer.") : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    assert modules == sorted(
        [f"transformer_blocks.0.{m}" for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
            "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
        )]
        + ["single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"]
    )


@pytest.mark.parametrize("options", [dict(exclude_mod=False), dict(include_patterns=[r"time_in\..*"])], ids=["modulation", "time_in"])
def test_peft_refuses_flux2_layers_comfyui_does_not_map(tmp_path, options):
    """Diffusers names them (`*_modulation.linear`, `time_guidance_embed.*`) but ComfyUI's key map does not."""
    _, network = trained_flux("flux2", **options)
    with pytest.raises(ValueError, match=r"style 'peft': ComfyUI maps no diffusers name .*style='comfy' or 'kohya'"):
        export_adapter(network, tmp_path / "a.safetensors", style="peft")
    for style in ("comfy", "kohya"):
        export_adapter(network, tmp_path / f"{style}.safetensors", style=style)

