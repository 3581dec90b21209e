"""Flux.1 / Flux.2 LoRA files of other trainers: built from known factors, imported, compared per module.

Formats (each a file written here the way its tool writes it):
  kohya       lora_unet_double_blocks_0_img_attn_qkv.lora_down / lora_up / alpha (sd-scripts)
  musubi      the same keys, bf16, musubi-tuner's metadata (networks/lora_flux.py, lora_flux_2.py)
  diffusers   transformer.<diffusers name>.lora_A / lora_B, no alpha (ai-toolkit Flux.1, diffusers,
              SimpleTuner): q / k / v (/ proj_mlp) as separate LoRAs of rank r each, which the
              importer fuses into one block-diagonal LoRA of rank 3r (4r for Flux.1's linear1)
  ai-toolkit  diffusion_model.<BFL path>.lora_A / lora_B, no alpha (its Flux.2 files)
  mangled     musubi-tuner's convert_lora.py --target other: diffusion_model.double_blocks.0.img_attn_qkv
              (underscores inside the path), sqrt(alpha / r) folded into both factors; ComfyUI ignores it
Each file's weight change per module must come back from the network built by `config_for_file`
(<= 1e-6 relative); where ComfyUI maps the format, its merge must agree with the network too.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfy_merge import comfy_patched_weights
from dit_trainer.training.network.comfy_format import load_adapter_into
from dit_trainer.training.network.file_config import config_for_file
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from test_network_flux2 import DIFFUSERS_DOUBLE as FLUX2_DOUBLE
from test_network_flux2 import QKV_PARTS
from test_network_flux_names import ARCHITECTURE, HIDDEN, FluxToy, checkpoint_of, flux_key_map
from test_network_io import rel_err

RANK, ALPHA = 2, 3.0
FLUX1_DOUBLE = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
DIFFUSERS_DOUBLE = {"flux1": FLUX1_DOUBLE, "flux2": FLUX2_DOUBLE}
DIFFUSERS_SINGLE = {
    "flux1": {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"]},
    "flux2": {"linear1": ["attn.to_qkv_mlp_proj"], "linear2": ["attn.to_out"]},
}


def diffusers_parts(family: str, name: str, out_features: int) -> list[tuple[str, int]]:
    """(diffusers module, rows) of a block layer, in row order."""
    kind, index, rest = name.split(".", 2)
    if kind == "double_blocks":
        prefix, parts = f"transformer_blocks.{index}.", QKV_PARTS.get(rest) or (DIFFUSERS_DOUBLE[family][rest],)
    else:
        prefix, parts = f"single_transformer_blocks.{index}.", DIFFUSERS_SINGLE[family][rest]
    if len(parts) == 4:  # Flux.1 linear1: q, k, v of the hidden size, then the MLP input
        rows = [HIDDEN] * 3 + [out_features - 3 * HIDDEN]
    else:
        rows = [out_features // len(parts)] * len(parts)
    return [(prefix + part, count) for part, count in zip(parts, rows)]


def musubi_converted(kohya_module: str) -> str:
    """musubi-tuner convert_lora.py convert_to_diffusers: underscores back to dots, then its HunyuanVideo repair."""
    module = kohya_module[len("lora_unet_") :].replace("_", ".")
    repairs = (("double.blocks.", "double_blocks."), ("single.blocks.", "single_blocks."), ("img.", "img_"), ("txt.", "txt_"), ("attn.", "attn_"))
    for broken, repaired in repairs:
        module = module.replace(broken, repaired)
    return module


def foreign_file(path, model: FluxToy, fmt: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `model`'s default-target LoRA in format `fmt`; returns the weight change it encodes per module."""
    family = model.family
    names = LoRANetwork(model, ARCHITECTURE[family], NetworkConfig(rank=RANK)).names
    layers = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if fmt == "musubi" else torch.float32
    tensors, deltas = {}, {}
    for name in names:
        out_features, in_features = layers[name].weight.shape
        parts = diffusers_parts(family, name, out_features) if fmt == "diffusers" else [(name, out_features)]
        delta, row = torch.zeros(out_features, in_features), 0
        for module, rows in parts:
            down = (torch.randn(RANK, in_features, generator=g) * 0.3).to(dtype)
            up = (torch.randn(rows, RANK, generator=g) * 0.3).to(dtype)
            scale = ALPHA / RANK if fmt in ("kohya", "musubi", "mangled") else 1.0
            delta[row : row + rows] = scale * up.float() @ down.float()
            row += rows
            if fmt in ("kohya", "musubi"):
                key = "lora_unet_" + module.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
            elif fmt == "mangled":
                folded = math.sqrt(scale)  # convert_lora.py scales both factors by sqrt(alpha / rank), drops alpha
                key = "diffusion_model." + musubi_converted("lora_unet_" + module.replace(".", "_"))
                tensors |= {f"{key}.lora_A.weight": down * folded, f"{key}.lora_B.weight": up * folded}
            else:
                key = ("transformer." if fmt == "diffusers" else "diffusion_model.") + module
                tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
        deltas[name] = delta
    musubi_module = "networks.lora_flux_2" if family == "flux2" else "networks.lora_flux"
    metadata = {"ss_network_module": musubi_module, "ss_network_dim": str(RANK)} if fmt == "musubi" else None
    save_file(tensors, str(path), metadata=metadata)
    return deltas


CASES = [
    ("flux1", "kohya"), ("flux1", "musubi"), ("flux1", "diffusers"), ("flux1", "mangled"),
    ("flux2", "kohya"), ("flux2", "musubi"), ("flux2", "diffusers"), ("flux2", "ai-toolkit"), ("flux2", "mangled"),
]


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_foreign_file_reproduces_its_weight_deltas(tmp_path, caplog, family, fmt):
    model = FluxToy(family, depth=2, depth_single=2)
    path = tmp_path / f"{fmt}.safetensors"
    deltas = foreign_file(path, model, fmt)
    architecture = ARCHITECTURE[family]
    cfg = config_for_file(model, architecture, path)
    network = LoRANetwork(model, architecture, cfg).attach()
    assert network.names == list(deltas)
    with caplog.at_level(logging.WARNING):
        report = load_adapter_into(network, path)
    assert sorted(report.loaded) == sorted(deltas) and not report.not_in_file
    for adapter in network.adapters:
        assert rel_err(adapter.delta_weight(), deltas[adapter.name]) <= 1e-6, adapter.name
    sliced = {n for n in deltas if n.endswith("qkv") or (family == "flux1" and n.endswith("linear1"))}
    fused = sliced if fmt == "diffusers" else set()
    assert set(report.qkv_converted) == fused
    # q / k / v of rank r each: one block-diagonal LoRA of rank 3r (Flux.1 linear1: 4r, with proj_mlp).
    assert cfg.rank_pattern == {n.replace(".", r"\."): 4 * RANK if n.endswith("linear1") else 3 * RANK for n in fused}

    patched, not_loaded = comfy_patched_weights(checkpoint_of(model), load_file(str(path)), flux_key_map(model), 1.0)
    if fmt == "mangled":
        # Why the importer warns: ComfyUI loads none of the underscored keys.
        assert not_loaded and all("_attn_" in key for key in not_loaded)
        assert any("broken converter" in w and "ComfyUI does not load them" in w for w in report.warnings)
        assert "broken converter" in caplog.text
        return
    assert not not_loaded and not report.warnings
    g = torch.Generator().manual_seed(7)
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features, generator=g)
        with torch.no_grad():
            comfy = F.linear(x, patched[f"diffusion_model.{adapter.name}.weight"], adapter.base.bias)
            assert rel_err(adapter.base(x), comfy) < 1e-5, adapter.name


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_separate_qkv_loras_fill_a_split_network(tmp_path, family):
    """The diffusers file into split_qkv=True at rank r: each q / k / v (/ MLP) LoRA is one slice; Flux.2's whole
    to_qkv_mlp_proj LoRA is shared by the slices of linear1. No alpha in the file: B is rescaled to alpha / r."""
    model = FluxToy(family, depth=2, depth_single=2)
    deltas = foreign_file(tmp_path / "d.safetensors", model, "diffusers")
    network = LoRANetwork(model, ARCHITECTURE[family], NetworkConfig(rank=RANK, alpha=1.0, split_qkv=True)).attach()
    report = load_adapter_into(network, tmp_path / "d.safetensors")
    assert len(report.rescaled) == len(deltas)
    for adapter in network.adapters:
        assert rel_err(adapter.delta_weight(), deltas[adapter.name]) <= 1e-6, adapter.name


def test_mangled_keys_are_read_only_when_nothing_else_matches(tmp_path):
    """A correct dotted key that happens to have underscores is not taken for the broken form."""
    model = FluxToy("flux2")
    deltas = foreign_file(tmp_path / "m.safetensors", model, "mangled")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in tensors
    assert "diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight" in tensors  # musubi's repair got this one right
    network = LoRANetwork(model, "flux2", config_for_file(model, "flux2", tmp_path / "m.safetensors"))
    report = load_adapter_into(network, tmp_path / "m.safetensors")
    assert report.styles == ["comfy", "mangled_converter"]
    warning = next(w for w in report.warnings if "broken converter" in w)
    assert "img_attn_qkv" in warning and "img_mlp.0" not in warning
    assert len(report.loaded) == len(deltas)


def test_other_familys_keys_are_a_clear_error(tmp_path):
    """A Flux.1 file (per-block modulation, proj_mlp slices) does not fit a Flux.2 model: the keys are listed."""
    flux1 = FluxToy("flux1")
    network = LoRANetwork(flux1, "flux", NetworkConfig(rank=RANK, exclude_mod=False))
    tensors = {}
    for adapter in network.adapters:
        key = "lora_unet_" + adapter.name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.zeros(RANK, adapter.base.in_features)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(adapter.base.out_features, RANK)
    save_file(tensors, str(tmp_path / "flux1.safetensors"))
    flux2 = FluxToy("flux2")
    with pytest.raises(ValueError, match=r"keys match no layer this flux2 network adapts \(lora_unet_double_blocks_0_img_mod_lin"):
        load_adapter_into(LoRANetwork(flux2, "flux2", NetworkConfig(rank=RANK)), tmp_path / "flux1.safetensors")
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, HIDDEN),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(HIDDEN, RANK)},
              str(tmp_path / "slices.safetensors"))
    listed = r"match no Linear / Conv layer of this flux2 model \(transformer\.single_transformer_blocks\.0\.attn\.to_q"
    with pytest.raises(ValueError, match=listed):
        config_for_file(flux2, "flux2", tmp_path / "slices.safetensors")
