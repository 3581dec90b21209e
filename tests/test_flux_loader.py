"""Flux.1 / Flux.2 checkpoints: layouts against diffusers' converters, config from shapes, detection, memory.

diffusers' own BFL -> diffusers converters are the oracle for the key layout: our
diffusers -> BFL conversion must undo them bit for bit. Real-size configs are
inferred from meta-device tensors, which have shapes but no memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from safetensors.torch import save_file

from dit_trainer.training.models.flux import FluxConfig, FluxDiT
from dit_trainer.training.models.flux_layouts import flux_variant, to_comfy_layout_flux
from dit_trainer.training.models.loader import (
    ARCHITECTURES,
    detect_architecture,
    infer_flux_config,
    load_dit,
    save_dit,
    to_split_layout_zimage,
)
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT

COMFY_PREFIX = "model.diffusion_model."
# head_dim 16 everywhere, whose default RoPE splits are these axes; MLP ratios and
# widths are deliberately not the released ones: inference must read them from shapes.
TINY = {
    "flux1-dev-like": FluxConfig(
        in_channels=4, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, mlp_ratio=3.0,
        context_in_dim=24, vec_in_dim=12, guidance_embed=True, axes_dim=[4, 6, 6],
    ),
    "flux1-schnell-like": FluxConfig(
        in_channels=4, hidden_size=48, num_heads=3, depth=1, depth_single_blocks=3, mlp_ratio=2.0,
        context_in_dim=20, vec_in_dim=8, guidance_embed=False, axes_dim=[4, 6, 6],
    ),
    "flux2-dev-like": FluxConfig(
        family="flux2", in_channels=8, patch_size=1, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
        mlp_ratio=2.5, context_in_dim=24, vec_in_dim=0, guidance_embed=True, axes_dim=[4, 4, 4, 4], theta=2000,
        qkv_bias=False,
    ),
    "flux2-klein-like": FluxConfig(
        family="flux2", in_channels=8, patch_size=1, hidden_size=48, num_heads=3, depth=1, depth_single_blocks=3,
        mlp_ratio=3.0, context_in_dim=20, vec_in_dim=0, guidance_embed=False, axes_dim=[4, 4, 4, 4], theta=2000,
        qkv_bias=False,
    ),
}


def random_weights(cfg: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """BFL-layout tensors at realistic scale: fan-in-scaled matrices, gains near 1, non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in FluxDiT(cfg).state_dict().items()}
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        weights[key] = 1.0 + 0.1 * noise if key.endswith(".scale") else noise * min(0.2, shape[-1] ** -0.5)
    return weights


class _TorchWithModelWidth:
    """diffusers' Flux.1 converter hard-codes the released width (inner_dim 3072, mlp 12288) for
    splitting single-block linear1; this stand-in for its `torch` substitutes the test model's."""

    def __init__(self, cfg: FluxConfig):
        self.sizes = (cfg.hidden_size,) * 3 + (cfg.mlp_hidden_dim,)

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def split(self, tensor: torch.Tensor, sizes, dim: int = 0):
        assert tuple(sizes) == (3072, 3072, 3072, 12288), "diffusers' converter changed; drop this stand-in"
        return torch.split(tensor, self.sizes, dim)


def to_diffusers(cfg: FluxConfig, weights: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> dict:
    """The oracle: diffusers' own BFL -> diffusers converter (it pops from its argument, so pass a copy)."""
    if cfg.family == "flux2":
        return single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers(dict(weights))
    with monkeypatch.context() as patch:
        patch.setattr(single_file_utils, "torch", _TorchWithModelWidth(cfg))
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(weights))


def diffusers_model_keys(cfg: FluxConfig) -> dict[str, torch.Size]:
    """State-dict shapes of diffusers' own model class for cfg (built on meta: no memory)."""
    shared = dict(
        num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim, guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=tuple(cfg.axes_dim),
    )
    with torch.device("meta"):
        if cfg.family == "flux1":  # its MLP ratio is fixed at 4: compare names, not shapes
            model = FluxTransformer2DModel(
                in_channels=cfg.in_channels * 4, pooled_projection_dim=cfg.vec_in_dim, **shared
            )
        else:
            model = Flux2Transformer2DModel(in_channels=cfg.in_channels, mlp_ratio=cfg.mlp_ratio, **shared)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def model_architecture(cfg: FluxConfig) -> str:
    return "flux" if cfg.family == "flux1" else "flux2"


def write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def single_file(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI checkpoint: DiT under model.diffusion_model., plus a VAE and a text encoder with more keys
    than the DiT (as an LLM encoder next to Flux.2 klein has)."""
    tensors = {COMFY_PREFIX + key: value for key, value in weights.items()}
    tensors.update({f"first_stage_model.decoder.up.{i}.conv.weight": torch.zeros(2, 2) for i in range(8)})
    tensors.update({f"text_encoders.qwen3.layers.{i}.mlp.weight": torch.ones(3) for i in range(len(weights) + 8)})
    return tensors


# --- key layouts -------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_diffusers_converter_is_undone_bit_for_bit(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TINY[name]
    weights = random_weights(cfg)
    diffusers_layout = to_diffusers(cfg, weights, monkeypatch)
    expected = diffusers_model_keys(cfg)
    assert diffusers_layout.keys() == expected.keys()  # the oracle's output is what diffusers' model loads
    if cfg.family == "flux2":
        assert all(diffusers_layout[key].shape == shape for key, shape in expected.items())

    back = to_comfy_layout_flux(diffusers_layout)
    assert back.keys() == weights.keys()
    assert all(back[key].dtype == weights[key].dtype and torch.equal(back[key], weights[key]) for key in weights)


def test_bfl_keys_pass_through_unchanged() -> None:
    weights = random_weights(TINY["flux2-dev-like"])
    same = to_comfy_layout_flux(weights)
    assert same.keys() == weights.keys() and all(same[key] is weights[key] for key in weights)


@pytest.mark.parametrize("name", ["flux1-dev-like", "flux2-dev-like"])
def test_final_layer_halves_are_swapped_back(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The round trip above would also pass if neither side swapped; diffusers does.
    cfg = TINY[name]
    weights = random_weights(cfg)
    shift, scale = weights["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(to_diffusers(cfg, weights, monkeypatch)["norm_out.linear.weight"], torch.cat([scale, shift]))


def test_mixed_layouts_name_both_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TINY["flux1-dev-like"]
    weights = random_weights(cfg)
    diffusers_layout = to_diffusers(cfg, weights, monkeypatch)
    split_qkv = {f"transformer_blocks.1.attn.to_{part}.weight" for part in "qkv"}
    mixed = {**weights, **{key: diffusers_layout[key] for key in split_qkv}}
    with pytest.raises(ValueError, match=r"double_blocks\.1\.img_attn\.qkv\.weight.*transformer_blocks\.1\.attn\.to_q"):
        to_comfy_layout_flux(mixed)
    with pytest.raises(ValueError, match=r"'img_in\.weight'.*'x_embedder\.weight'.*two layouts"):
        to_comfy_layout_flux({**weights, "x_embedder.weight": diffusers_layout["x_embedder.weight"]})


def test_incomplete_split_projection_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TINY["flux1-schnell-like"]
    diffusers_layout = to_diffusers(cfg, random_weights(cfg), monkeypatch)
    del diffusers_layout["single_transformer_blocks.2.proj_mlp.bias"]
    missing = r"single_blocks\.2\.linear1\.bias.*\['single_transformer_blocks\.2\.proj_mlp\.bias'\] are missing"
    with pytest.raises(ValueError, match=missing):
        to_comfy_layout_flux(diffusers_layout)


# --- the same weights from every layout load the same model -------------------


@pytest.mark.parametrize("name", TINY)
def test_every_layout_loads_the_same_model(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TINY[name]
    weights = random_weights(cfg, seed=1)
    files = {
        "bfl": write(weights, tmp_path / "bfl.safetensors"),
        "comfy": write(single_file(weights), tmp_path / "comfy.safetensors"),
        "diffusers": write(to_diffusers(cfg, weights, monkeypatch), tmp_path / "diffusers.safetensors"),
    }
    models = {layout: load_dit(path) for layout, path in files.items()}
    models["state dict"] = load_dit({COMFY_PREFIX + key: value for key, value in weights.items()})
    for layout, model in models.items():
        assert isinstance(model, FluxDiT) and model.cfg == cfg, layout
        assert model.architecture == model_architecture(cfg)
        assert model.variant == f"{cfg.family}-custom"
        loaded = model.state_dict()
        assert loaded.keys() == weights.keys(), layout
        assert all(torch.equal(loaded[key], weights[key]) for key in weights), layout
        assert not any(param.requires_grad for param in model.parameters()) and not model.training
    assert len({model.base_hash for model in models.values()}) == 1


def test_cast_keeps_the_stored_weights_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TINY["flux2-klein-like"]
    weights = random_weights(cfg, seed=2)
    full = load_dit(weights)
    half = load_dit(to_diffusers(cfg, weights, monkeypatch), dtype=torch.bfloat16)
    assert half.base_hash == full.base_hash
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(torch.equal(half.state_dict()[key], value.to(torch.bfloat16)) for key, value in weights.items())
    changed = {**weights, "img_in.weight": weights["img_in.weight"] + 1e-3}
    assert load_dit(changed).base_hash != full.base_hash


def test_save_then_load_keeps_rope_hints(tmp_path: Path) -> None:
    # axes_dim and theta are invisible in shapes: save_dit's metadata carries them.
    cfg = replace(TINY["flux1-dev-like"], axes_dim=[2, 8, 6], theta=500)
    model = load_dit(random_weights(cfg), metadata={"axes_dim": "[2, 8, 6]", "theta": "500"})
    assert model.cfg == cfg
    save_dit(model, tmp_path / "flux.safetensors")
    loaded = load_dit(tmp_path / "flux.safetensors")
    assert loaded.cfg == cfg and loaded.base_hash == model.base_hash
    assert load_dit(tmp_path / "flux.safetensors", metadata={"theta": "700"}).cfg.theta == 700  # top level wins


# --- config from shapes at real size (meta tensors: no memory) ---------------


# The released transformers as diffusers configures them: FLUX.1-dev / -schnell's
# transformer/config.json, Flux2Transformer2DModel's defaults (FLUX.2-dev) and
# FLUX.2-klein-4B / -9B's transformer/config.json.
RELEASED = {
    "flux1-dev": dict(in_channels=64, num_layers=19, num_single_layers=38, num_attention_heads=24,
                      joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True),
    "flux1-schnell": dict(in_channels=64, num_layers=19, num_single_layers=38, num_attention_heads=24,
                          joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False),
    "flux2-dev": dict(in_channels=128, num_layers=8, num_single_layers=48, num_attention_heads=48,
                      joint_attention_dim=15360, guidance_embeds=True),
    "flux2-klein-4b": dict(in_channels=128, num_layers=5, num_single_layers=20, num_attention_heads=24,
                           joint_attention_dim=7680, guidance_embeds=False),
    "flux2-klein-9b": dict(in_channels=128, num_layers=8, num_single_layers=24, num_attention_heads=32,
                           joint_attention_dim=12288, guidance_embeds=False),
}


@pytest.mark.parametrize("name", RELEASED)
def test_real_size_configs_are_inferred_and_named(name: str) -> None:
    model_class = FluxTransformer2DModel if name.startswith("flux1") else Flux2Transformer2DModel
    with torch.device("meta"):
        diffusers_layout = model_class(attention_head_dim=128, **RELEASED[name]).state_dict()
    cfg = infer_flux_config(diffusers_layout)
    assert flux_variant(cfg) == name
    released_mlp_ratio = 4.0 if cfg.family == "flux1" else 3.0
    assert (cfg.hidden_size, cfg.head_dim, cfg.mlp_ratio) == (128 * cfg.num_heads, 128, released_mlp_ratio)
    assert cfg.axes_dim == ([16, 56, 56] if cfg.family == "flux1" else [32, 32, 32, 32])
    # Our model at that config has exactly the shapes of diffusers' model, converted.
    with torch.device("meta"):
        bfl = FluxDiT(cfg).state_dict()
    converted = to_comfy_layout_flux(diffusers_layout)
    assert {key: t.shape for key, t in converted.items()} == {key: t.shape for key, t in bfl.items()}
    assert infer_flux_config(bfl) == cfg
    assert detect_architecture(bfl) == detect_architecture(diffusers_layout) == model_architecture(cfg)


def test_qkv_bias_and_missing_guidance_are_read_from_keys() -> None:
    cfg = replace(TINY["flux1-schnell-like"], qkv_bias=False, guidance_embed=False)
    assert infer_flux_config(random_weights(cfg)) == cfg


# --- shapes that cannot be Flux ----------------------------------------------


def meta_weights(cfg: FluxConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(FluxDiT(cfg).state_dict())


def test_wrong_qkv_rows_list_what_was_seen() -> None:
    weights = meta_weights(TINY["flux1-dev-like"])
    weights["double_blocks.0.img_attn.qkv.weight"] = torch.empty(200, 64, device="meta")
    with pytest.raises(ValueError) as error:
        infer_flux_config(weights)
    message = str(error.value)
    assert "'double_blocks.0.img_attn.qkv.weight' is [200, 64], not [3 x hidden, hidden] = [192, 64]" in message
    assert "double_blocks 2, single_blocks 2, hidden_size 64" in message
    assert "Expected img_in.weight [hidden, in_channels * patch^2]" in message and "'txt_in.weight'" in message


def test_missing_blocks_are_named() -> None:
    weights = meta_weights(TINY["flux2-dev-like"])
    weights = {key: tensor for key, tensor in weights.items() if not key.startswith("double_blocks.0.")}
    with pytest.raises(ValueError, match=r"double_blocks \[0\] are missing.*Saw family flux2, double_blocks 2"):
        infer_flux_config(weights)


def test_rope_axes_must_fit_head_dim() -> None:
    with pytest.raises(ValueError, match=r"axes_dim \[4, 4, 4\] must be even sizes summing to head_dim 16"):
        infer_flux_config(meta_weights(TINY["flux1-dev-like"]), {"axes_dim": "[4, 4, 4]"})


def test_fill_models_with_extra_input_channels_are_refused(tmp_path: Path) -> None:
    weights = random_weights(TINY["flux1-dev-like"])
    weights["img_in.weight"] = torch.zeros(64, 3 * 16)  # image + masked image + mask, as Flux Fill takes
    with pytest.raises(ValueError, match=r"img_in takes 48 features per token and final_layer\.linear gives 16"):
        load_dit(write(weights, tmp_path / "fill.safetensors"))


def test_flux1_without_pooled_input_is_refused() -> None:
    weights = meta_weights(TINY["flux1-dev-like"])
    weights = {key: tensor for key, tensor in weights.items() if not key.startswith("vector_in.")}
    with pytest.raises(ValueError, match="without vector_in.in_layer.weight"):
        infer_flux_config(weights)


def test_extra_keys_are_named_with_the_variant() -> None:
    lora_key = "single_blocks.0.linear1.lora_A.weight"
    weights = {**random_weights(TINY["flux2-klein-like"]), lora_key: torch.zeros(2, 48)}
    with pytest.raises(ValueError, match=r"state dict \(flux2-custom\) does not fit FluxDiT.*lora_A"):
        load_dit(weights)


# --- detection ---------------------------------------------------------------


def layouts_by_architecture(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict]]:
    zimage = ZImageDiT(ZImageConfig(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64,
                                    cap_feat_dim=8, t_freq_dim=16, t_mid_dim=16, axes_dims=[4, 6, 6])).state_dict()
    found = {"zimage": [zimage, to_split_layout_zimage(zimage)], "flux": [], "flux2": []}
    for cfg in TINY.values():
        weights = random_weights(cfg)
        found[model_architecture(cfg)] += [weights, to_diffusers(cfg, weights, monkeypatch)]
    return found


def test_detection_never_confuses_families(monkeypatch: pytest.MonkeyPatch) -> None:
    for expected, layouts in layouts_by_architecture(monkeypatch).items():
        for keys in layouts:
            assert [name for name, arch in ARCHITECTURES.items() if arch.matches(set(keys))] == [expected]


def test_look_alikes_are_not_flux() -> None:
    bfl = meta_weights(TINY["flux1-dev-like"])
    chroma = {key: value for key, value in bfl.items() if "_mod." not in key and ".modulation." not in key}
    sd3 = {"transformer_blocks.0.norm1.linear.weight": 0, "x_embedder.weight": 0, "pos_embed.proj.weight": 0}
    for keys in (chroma, sd3):
        with pytest.raises(ValueError, match="unrecognised DiT checkpoint"):
            detect_architecture(keys)


def test_unknown_architecture_lists_flux_signatures() -> None:
    with pytest.raises(ValueError) as error:
        detect_architecture(["blocks.0.mlp.weight"])
    message = str(error.value)
    assert "flux: double_blocks.0.img_mod.lin.weight, img_in.weight" in message
    assert "flux2: double_stream_modulation_img.lin.weight" in message and "zimage:" in message


# --- memory: a streaming load holds one copy ---------------------------------

# Runs in a fresh interpreter so that its peak RSS is its own. A fixed
# MALLOC_MMAP_THRESHOLD_ makes glibc serve every tensor over 128 KiB from its own
# mapping and unmap it on free (the default threshold adapts and then keeps freed
# memory), so resident memory follows the live tensors.
MEMORY_PROBE = r"""
import json, os, sys, threading, time
import torch
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.storage import read_safetensors

PAGE = os.sysconf("SC_PAGE_SIZE")

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def anonymous():  # resident minus file-backed pages: memory the OS cannot reclaim without swap
    with open("/proc/self/statm") as f:
        resident, shared = (int(x) for x in f.read().split()[1:3])
    return (resident - shared) * PAGE

def measure(work):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart VmHWM (peak RSS) from the current RSS
    base_rss, base_anon = status("VmRSS"), anonymous()
    peak = [base_anon]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.0002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    result = work()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anonymous())
    return result, {"rss": status("VmHWM") - base_rss, "anonymous": peak[0] - base_anon}

bfl, diffusers = sys.argv[1:3]
report = {}
bfl_model, report["bfl fp32"] = measure(lambda: load_dit(bfl))
half_model, report["diffusers bf16"] = measure(lambda: load_dit(diffusers, dtype=torch.bfloat16))
# Negative control: the whole file read and copied, as a loader holding a second copy would.
_, report["copy of the file"] = measure(lambda: {k: v.clone() for k, v in read_safetensors(bfl)[0].items()})
full, half = bfl_model.state_dict(), half_model.state_dict()
report["identical"] = full.keys() == half.keys() and all(
    torch.equal(tensor.to(torch.bfloat16), half[key]) for key, tensor in full.items()
)
report["same hash"] = bfl_model.base_hash == half_model.base_hash
print(json.dumps(report))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from Linux's /proc")
def test_streaming_load_peak_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = FluxConfig(in_channels=16, hidden_size=384, num_heads=6, depth=2, depth_single_blocks=3,
                     context_in_dim=1024, vec_in_dim=768, axes_dim=[8, 28, 28])
    weights = random_weights(cfg, seed=3)
    bfl = write(weights, tmp_path / "bfl.safetensors")
    diffusers = write(to_diffusers(cfg, weights, monkeypatch), tmp_path / "diffusers.safetensors")
    del weights
    file_size = bfl.stat().st_size  # ~77 MB of fp32 weights
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(bfl), str(diffusers)],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["identical"] and report["same hash"]  # the BFL and the diffusers file, loaded

    # safetensors maps the file, so reading it once makes up to file_size of RSS: page
    # cache the OS can drop, shared with any other reader. Beyond that, a load may only
    # hold what it must create (here the cast model; its fused q|k|v are cast tensors
    # too) plus 10% for one tensor's temporaries: a second copy does not fit.
    # RSS also counts incidental pages (allocator arenas, imports touched late), a few MB that vary
    # from machine to machine, so its bound is looser; the anonymous bound is the precise one.
    slack, rss_slack = 0.1 * file_size, 0.4 * file_size
    created = {"bfl fp32": 0, "diffusers bf16": file_size / 2}  # bf16: the whole model, cast
    for name, new_bytes in created.items():
        assert report[name]["anonymous"] < new_bytes + slack, (name, report[name])
        assert report[name]["rss"] < file_size + new_bytes + rss_slack, (name, report[name])
    # The meter sees a second copy: the negative control lands outside both budgets.
    assert report["copy of the file"]["anonymous"] > 0.9 * file_size
    assert report["copy of the file"]["rss"] > file_size + rss_slack
