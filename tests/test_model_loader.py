"""Checkpoint loader: prefixes, layouts, config inference, refusals, errors, save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_trainer.training.models.loader import (
    detect_architecture,
    infer_zimage_config,
    load_dit,
    save_dit,
    strip_prefix,
    to_comfy_layout_zimage,
    to_split_layout_zimage,
)
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT, default_axes_dims

PREFIXES = ["", "diffusion_model.", "model.diffusion_model.", "transformer."]


def tiny_config(**overrides) -> ZImageConfig:
    # ffn_dim and the timestep widths are deliberately not the released ratios:
    # inference must read them from shapes, not derive them from dim.
    fields = dict(
        in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, ffn_dim=160,
        cap_feat_dim=24, t_freq_dim=32, t_mid_dim=48, axes_dims=[4, 6, 6],
    )
    return ZImageConfig(**{**fields, **overrides})


def random_model(cfg: ZImageConfig, seed: int = 0) -> ZImageDiT:
    model = ZImageDiT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = min(0.2, param.shape[-1] ** -0.5) if param.ndim == 2 else 0.2
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model.eval()


def inputs(cfg: ZImageConfig) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 6, 4, generator=gen)
    context = torch.randn(2, 9, cfg.cap_feat_dim, generator=gen)
    context[1, 3:] = 0.0
    return x, torch.tensor([0.2, 0.7]), context, torch.tensor([9, 3])


def run(model: torch.nn.Module, x, sigma, context, lens) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(x.to(dtype), sigma, context.to(dtype), lens).float()


@pytest.fixture(scope="module")
def model() -> ZImageDiT:
    return random_model(tiny_config())


def write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --- prefixes and layouts ----------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_prefix_variants_load_identically(model: ZImageDiT, prefix: str, tmp_path: Path) -> None:
    state_dict = model.state_dict()
    prefixed = {prefix + k: v for k, v in state_dict.items()}
    assert strip_prefix(prefixed).keys() == state_dict.keys()
    loaded = load_dit(write(prefixed, tmp_path / "m.safetensors"))
    assert torch.equal(run(loaded, *inputs(model.cfg)), run(model, *inputs(model.cfg)))


def test_single_file_drops_vae_and_text_encoder_keys(model: ZImageDiT) -> None:
    full = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    full.update({"first_stage_model.decoder.conv_in.weight": torch.zeros(1), "text_encoders.qwen3.w": torch.zeros(1)})
    assert strip_prefix(full).keys() == model.state_dict().keys()


def test_split_fused_round_trip_is_exact(model: ZImageDiT) -> None:
    fused = model.state_dict()
    split = to_split_layout_zimage(fused)
    assert "layers.0.attention.to_q.weight" in split and "layers.0.attention.qkv.weight" not in split
    assert "attention.to_out.0.weight" in " ".join(split) and "all_x_embedder.2-1.weight" in split
    assert "noise_refiner.0.attention.norm_k.weight" in split and "all_final_layer.2-1.linear.bias" in split
    back = to_comfy_layout_zimage(split)
    assert back.keys() == fused.keys()
    assert all(torch.equal(back[k], fused[k]) for k in fused)
    assert to_split_layout_zimage(back).keys() == split.keys()


def test_fused_layout_passes_through_unchanged(model: ZImageDiT) -> None:
    fused = model.state_dict()
    same = to_comfy_layout_zimage(fused)
    assert same.keys() == fused.keys() and all(same[k] is fused[k] for k in fused)


def test_incomplete_split_attention_is_named(model: ZImageDiT) -> None:
    split = to_split_layout_zimage(model.state_dict())
    del split["layers.1.attention.to_v.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.to_v\.weight"):
        to_comfy_layout_zimage(split)


# --- config inference and detection -----------------------------------------

CONFIGS = {
    "tiny": tiny_config(),
    "wide-16ch-custom-rope": tiny_config(
        in_channels=16, dim=96, n_heads=6, n_refiner_layers=2, n_layers=3, axes_dims=[8, 4, 4],
        rope_theta=10000.0, t_scale=1.0, norm_eps=1e-6,
    ),
    "patch-1": tiny_config(patch_size=1),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_config_inference_recovers_constructing_config(name: str, layout: str) -> None:
    cfg = CONFIGS[name]
    state_dict = ZImageDiT(cfg).state_dict()
    if layout == "split":
        state_dict = to_split_layout_zimage(state_dict, patch_size=cfg.patch_size)
    metadata = {"architecture": "zimage", "config": json.dumps(cfg.to_dict())}
    if layout == "split":  # split keys name the patch size, and top-level keys override `config`
        metadata = {k: json.dumps(getattr(cfg, k)) for k in ("axes_dims", "rope_theta", "t_scale", "norm_eps")}
    assert infer_zimage_config(state_dict, metadata) == cfg


def test_config_inference_defaults_without_metadata(model: ZImageDiT) -> None:
    cfg = infer_zimage_config(model.state_dict(), None)
    defaults = ZImageConfig()
    assert cfg.axes_dims == default_axes_dims(cfg.head_dim) and cfg.patch_size == 2
    assert (cfg.rope_theta, cfg.t_scale, cfg.norm_eps) == (defaults.rope_theta, defaults.t_scale, defaults.norm_eps)


def test_bad_metadata_json_is_named(model: ZImageDiT) -> None:
    with pytest.raises(ValueError, match=r"axes_dims.*not valid JSON"):
        infer_zimage_config(model.state_dict(), {"axes_dims": "[4, 6"})


def test_foreign_config_metadata_is_ignored(model: ZImageDiT) -> None:
    # Other tools store unrelated text under `config`; only save_dit's, tagged with the architecture, counts.
    assert infer_zimage_config(model.state_dict(), {"config": "model: {dim: 8}"}) == model.cfg


def test_detects_zimage_in_both_layouts(model: ZImageDiT) -> None:
    assert detect_architecture(model.state_dict()) == "zimage"
    assert detect_architecture(to_split_layout_zimage(model.state_dict())) == "zimage"


def test_unknown_architecture_lists_keys_and_supported() -> None:
    keys = [f"blocks.{i}.mlp.weight" for i in range(30)]
    with pytest.raises(ValueError) as error:
        detect_architecture(keys)
    message = str(error.value)
    assert "blocks.0.mlp.weight" in message and "blocks.19.mlp.weight" in message
    assert "blocks.20.mlp.weight" not in message  # a sample, not a dump
    assert "30 keys" in message and "zimage" in message


# --- refusals and strict-load errors ----------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"x_embedder.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_dit(path)


def test_other_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="only safetensors"):
        load_dit(path)


def test_missing_key_is_named(model: ZImageDiT) -> None:
    state_dict = dict(model.state_dict())
    del state_dict["layers.1.feed_forward.w2.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.feed_forward\.w2\.weight'\]"):
        load_dit(state_dict)


def test_unexpected_key_is_named(model: ZImageDiT) -> None:
    state_dict = {**model.state_dict(), "layers.0.attention.qkv.lora_A.weight": torch.zeros(2, 64)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.0\.attention\.qkv\.lora_A\.weight'\]"):
        load_dit(state_dict)


def test_shape_mismatch_is_named(model: ZImageDiT) -> None:
    state_dict = {**model.state_dict(), "final_layer.linear.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"final_layer\.linear\.bias.*\(3,\)"):
        load_dit(state_dict)


def test_unsupported_dtype_is_refused(model: ZImageDiT) -> None:
    with pytest.raises(ValueError, match="float64"):
        load_dit(model.state_dict(), dtype=torch.float64)


# --- save / load -------------------------------------------------------------


def test_save_then_load_is_identical(tmp_path: Path) -> None:
    cfg = CONFIGS["wide-16ch-custom-rope"]
    original = random_model(cfg, seed=3)
    path = tmp_path / "demo" / "base.safetensors"
    save_dit(original, path, extra_metadata={"note": "demo base", "steps": 3000})

    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with safe_open(str(path), framework="pt") as handle:
        assert all(key.startswith("model.diffusion_model.") for key in handle.keys())
        assert "layers.0.attention.qkv.weight" in {key.split(".", 2)[2] for key in handle.keys()}
    loaded = load_dit(path)
    assert loaded.cfg == cfg
    assert loaded.source_metadata["architecture"] == "zimage"
    assert loaded.source_metadata["note"] == "demo base" and loaded.source_metadata["steps"] == "3000"
    assert torch.equal(run(loaded, *inputs(cfg)), run(original, *inputs(cfg)))


def test_save_refuses_reserved_metadata(model: ZImageDiT, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architecture"):
        save_dit(model, tmp_path / "m.safetensors", extra_metadata={"architecture": "flux"})
    assert not list(tmp_path.iterdir())


def test_base_hash_follows_weights_not_layout(model: ZImageDiT, tmp_path: Path) -> None:
    state_dict = model.state_dict()
    reference = load_dit(state_dict).base_hash
    save_dit(model, tmp_path / "m.safetensors")
    assert load_dit(tmp_path / "m.safetensors").base_hash == reference
    assert load_dit(to_split_layout_zimage(state_dict)).base_hash == reference
    assert load_dit(state_dict, dtype=torch.bfloat16).base_hash == reference
    changed = {**state_dict, "x_pad_token": state_dict["x_pad_token"] + 1e-3}
    assert load_dit(changed).base_hash != reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(model: ZImageDiT, dtype: torch.dtype) -> None:
    loaded = load_dit(model.state_dict(), dtype=dtype)
    assert all(p.dtype == dtype and not p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    expected = run(model, *inputs(model.cfg))
    error = (run(loaded, *inputs(model.cfg)) - expected).abs().max() / expected.abs().max()
    assert error < 5e-2  # half-precision rounding through four blocks; see test_zimage_parity
