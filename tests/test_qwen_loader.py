"""Qwen-Image / Qwen-Image-Edit checkpoints: one layout for every source, config from shapes, hints, detection.

diffusers' own QwenImageTransformer2DModel is the oracle for the key layout (ComfyUI's
model uses the same names): it must accept our weights strictly and hand back the same
tensors, and at its default (released) config it must have our model's shapes.
Real-size configs are inferred from meta-device tensors, which have shapes but no memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import NucleusMoEImageTransformer2DModel, QwenImage21Transformer2DModel, QwenImageTransformer2DModel
from test_flux_loader import layouts_by_architecture, write

from dit_trainer.training.models.loader import (
    ARCHITECTURES,
    detect_architecture,
    infer_qwen_config,
    load_dit,
    save_dit,
    strip_prefix,
    weights_hash,
)
from dit_trainer.training.models.qwen_image import QwenImageConfig, QwenImageDiT
from dit_trainer.training.models.qwen_layouts import EDIT_2511_MARKER, qwen_variant

COMFY_PREFIX = "model.diffusion_model."
# head_dim 16, whose default RoPE split is [4, 6, 6]; text width 24 differs from hidden 32
# so that swapped dimensions show.
TINY = QwenImageConfig(in_channels=4, num_layers=2, num_heads=2, head_dim=16, joint_attention_dim=24, axes_dim=[4, 6, 6])


def random_weights(cfg: QwenImageConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors at realistic scale: fan-in-scaled matrices, RMSNorm gains near 1, non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in QwenImageDiT(cfg).state_dict().items()}
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        is_gain = "norm" in key and len(shape) == 1
        weights[key] = 1.0 + 0.1 * noise if is_gain else noise * min(0.2, shape[-1] ** -0.5)
    return weights


def diffusers_model(cfg: QwenImageConfig, **extra) -> QwenImageTransformer2DModel:
    """diffusers' class at cfg; its in_channels counts patch features, as ComfyUI's does."""
    return QwenImageTransformer2DModel(
        patch_size=cfg.patch_size, in_channels=cfg.patch_features, out_channels=cfg.in_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim, axes_dims_rope=tuple(cfg.axes_dim), **extra,
    )


def single_file(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI checkpoint: DiT under model.diffusion_model., plus a VAE and a text encoder with more keys."""
    tensors = {COMFY_PREFIX + key: value for key, value in weights.items()}
    tensors.update({f"first_stage_model.decoder.up.{i}.conv.weight": torch.zeros(2, 2) for i in range(8)})
    encoder = "text_encoders.qwen25_7b.transformer.model.layers"  # holds "transformer." mid-key: not a prefix
    tensors.update({f"{encoder}.{i}.mlp.weight": torch.ones(3) for i in range(len(weights) + 8)})
    return tensors


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    """diffusers' default QwenImageTransformer2DModel (the released 20B shapes) on the meta device."""
    with torch.device("meta"):
        return dict(QwenImageTransformer2DModel().state_dict())


# --- one layout: ComfyUI, official / diffusers and bare files load the same model -------------


def test_diffusers_model_takes_our_keys_and_returns_the_same_tensors() -> None:
    weights = random_weights(TINY)
    model = diffusers_model(TINY)
    model.load_state_dict(weights, strict=True)  # no missing, no unexpected key, every shape fits
    back = model.state_dict()
    assert back.keys() == weights.keys() and all(torch.equal(back[key], weights[key]) for key in weights)


def test_every_layout_loads_the_same_model(tmp_path: Path) -> None:
    weights = random_weights(TINY, seed=1)
    model = diffusers_model(TINY)
    model.load_state_dict(weights)
    diffusers_layout = dict(model.state_dict())
    files = {
        "comfy single file": write(single_file(weights), tmp_path / "comfy.safetensors"),
        "bare": write(weights, tmp_path / "bare.safetensors"),
        "diffusion_model.": write({f"diffusion_model.{k}": v for k, v in weights.items()}, tmp_path / "dm.safetensors"),
        "diffusers": write(diffusers_layout, tmp_path / "diffusers.safetensors"),
        "diffusers transformer.": write(
            {f"transformer.{k}": v for k, v in diffusers_layout.items()}, tmp_path / "pipeline.safetensors"
        ),
    }
    models = {layout: load_dit(path) for layout, path in files.items()}
    models["state dict"] = load_dit({COMFY_PREFIX + key: value for key, value in weights.items()})
    for layout, loaded_model in models.items():
        assert isinstance(loaded_model, QwenImageDiT) and loaded_model.cfg == TINY, layout
        assert loaded_model.architecture == "qwen_image" and loaded_model.variant == "qwen-image-custom", layout
        loaded = loaded_model.state_dict()
        assert loaded.keys() == weights.keys(), layout
        assert all(torch.equal(loaded[key], weights[key]) for key in weights), layout
        assert not any(param.requires_grad for param in loaded_model.parameters()) and not loaded_model.training
    assert {loaded_model.base_hash for loaded_model in models.values()} == {weights_hash(weights)}


def test_load_streams_without_copies_and_hashes_before_the_cast() -> None:
    weights = random_weights(TINY, seed=2)
    full = load_dit(weights)
    # Stored tensors that need no cast become the parameters themselves: nothing is copied.
    assert all(full.state_dict()[key].data_ptr() == tensor.data_ptr() for key, tensor in weights.items())
    half = load_dit({f"transformer.{key}": value for key, value in weights.items()}, dtype=torch.bfloat16)
    assert half.base_hash == full.base_hash and all(p.dtype == torch.bfloat16 for p in half.parameters())
    changed = {**weights, "txt_norm.weight": weights["txt_norm.weight"] + 1e-3}
    assert load_dit(changed).base_hash != full.base_hash


def test_extra_keys_are_named_with_the_variant() -> None:
    lora_key = "transformer_blocks.0.attn.to_q.lora_A.weight"
    with pytest.raises(ValueError, match=r"state dict \(qwen-image-custom\) does not fit QwenImageDiT.*lora_A"):
        load_dit({**random_weights(TINY), lora_key: torch.zeros(2, 32)})


# --- Edit-2511: same shapes, zero_cond_t from the marker or a hint ------------------------------


def test_edit_2511_marker_sets_zero_cond_t_and_is_not_loaded(tmp_path: Path) -> None:
    weights = random_weights(TINY, seed=3)
    marked = {**single_file(weights), COMFY_PREFIX + EDIT_2511_MARKER: torch.tensor([])}
    edit = load_dit(write(marked, tmp_path / "edit_2511.safetensors"))
    plain = load_dit(write(weights, tmp_path / "plain.safetensors"))
    assert edit.cfg == replace(TINY, zero_cond_t=True) and plain.cfg == TINY
    assert EDIT_2511_MARKER not in edit.state_dict()
    assert edit.base_hash == plain.base_hash  # same weights; zero_cond_t is config, not a weight


@pytest.mark.parametrize(
    "metadata",
    [{"variant": "qwen-image-edit-2511"}, {"zero_cond_t": "true"}, {"zero_cond_t": True}],
    ids=["variant", "zero_cond_t json", "zero_cond_t bool"],
)
def test_zero_cond_t_hints(metadata: dict) -> None:
    assert load_dit(random_weights(TINY), metadata=metadata).cfg.zero_cond_t is True


def test_other_releases_and_no_hint_keep_zero_cond_t_off() -> None:
    weights = meta_weights()
    assert infer_qwen_config(weights).zero_cond_t is False
    assert infer_qwen_config(weights, {"variant": "qwen-image-edit-2509"}).zero_cond_t is False


def test_bad_or_contradicting_zero_cond_t_hints_are_named() -> None:
    weights = random_weights(TINY)
    with pytest.raises(ValueError, match=r"'variant' = 'qwen-image-edit-2600' is not a Qwen-Image release.*2511"):
        infer_qwen_config(weights, {"variant": "qwen-image-edit-2600"})
    with pytest.raises(ValueError, match=r"'zero_cond_t' = 1 is not a JSON boolean"):
        infer_qwen_config(weights, {"zero_cond_t": "1"})
    marked = {**weights, EDIT_2511_MARKER: torch.tensor([])}
    with pytest.raises(ValueError, match=r"given both ways.*__index_timestep_zero__.*True.*'zero_cond_t'\": False"):
        infer_qwen_config(marked, {"zero_cond_t": "false"})


def test_save_then_load_keeps_the_hints(tmp_path: Path) -> None:
    # axes_dim, theta and zero_cond_t are invisible in shapes: save_dit's config metadata carries them.
    cfg = replace(TINY, axes_dim=[2, 8, 6], theta=500, zero_cond_t=True)
    model = load_dit(random_weights(cfg), metadata={"axes_dim": "[2, 8, 6]", "theta": "500", "zero_cond_t": "true"})
    assert model.cfg == cfg
    save_dit(model, tmp_path / "qwen.safetensors")
    loaded = load_dit(tmp_path / "qwen.safetensors")
    assert loaded.cfg == cfg and loaded.base_hash == model.base_hash
    assert load_dit(tmp_path / "qwen.safetensors", metadata={"theta": "700"}).cfg.theta == 700  # top level wins


# --- config from shapes at real size (meta tensors: no memory) ------------------------------


def test_released_shapes_give_the_released_config(released: dict[str, torch.Tensor]) -> None:
    cfg = infer_qwen_config(released)
    assert cfg == QwenImageConfig() and qwen_variant(cfg) == "qwen-image"
    assert (cfg.hidden_size, cfg.num_layers, cfg.patch_features) == (3072, 60, 64)
    with torch.device("meta"):
        ours = QwenImageDiT(cfg).state_dict()
    assert shapes(ours) == shapes(released)  # diffusers' and our model: same keys, same shapes
    assert detect_architecture(released) == "qwen_image"
    # One block fewer is no longer the release.
    trimmed = {key: t for key, t in released.items() if not key.startswith("transformer_blocks.59.")}
    assert qwen_variant(infer_qwen_config(trimmed)) == "qwen-image-custom"


def test_edit_2511_is_invisible_in_shapes(released: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        edit_2511 = dict(QwenImageTransformer2DModel(zero_cond_t=True).state_dict())
    assert shapes(edit_2511) == shapes(released)
    assert infer_qwen_config(edit_2511) == infer_qwen_config(released)  # so it needs the marker or a hint
    comfy_2511 = strip_prefix({**single_file(edit_2511), COMFY_PREFIX + EDIT_2511_MARKER: torch.tensor([])})
    assert qwen_variant(infer_qwen_config(comfy_2511)) == "qwen-image-edit-2511"
    assert qwen_variant(infer_qwen_config(edit_2511, {"variant": "qwen-image-edit-2511"})) == "qwen-image-edit-2511"


# --- shapes that cannot be Qwen-Image ----------------------------------------------------------


def meta_weights(cfg: QwenImageConfig = TINY) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(QwenImageDiT(cfg).state_dict())


def test_bad_shapes_list_what_was_seen() -> None:
    weights = meta_weights()
    weights["transformer_blocks.0.attn.norm_q.weight"] = torch.empty(12, device="meta")
    with pytest.raises(ValueError) as error:
        infer_qwen_config(weights)
    message = str(error.value)
    assert "hidden size 32 is not a multiple of head_dim 12" in message
    assert "Saw num_layers 2, hidden 32, head_dim 12" in message and "'txt_norm.weight'" in message
    assert "Expected transformer_blocks.0..num_layers-1 without gaps, img_in.weight [hidden" in message


@pytest.mark.parametrize(
    "key, shape, problem",
    [
        ("txt_norm.weight", (20,), r"txt_in.weight is \[32, 24\] and txt_norm.weight \[20\]"),
        ("transformer_blocks.0.img_mlp.net.0.proj.weight", (96, 32), r"'transformer_blocks.0.img_mlp.net.0.proj.weight' is \[96, 32\], not \[4 x hidden"),
        ("img_in.weight", (32, 48), r"img_in takes 48 features per token and proj_out gives 16"),
        ("txt_in.weight", (32,), r"'txt_in.weight' has shape \[32\], expected 2 dimensions"),
    ],
    ids=["text width", "mlp width", "extra input channels", "ndim"],
)
def test_inconsistent_shapes_are_named(key: str, shape: tuple[int, ...], problem: str) -> None:
    weights = {**meta_weights(), key: torch.empty(shape, device="meta")}
    with pytest.raises(ValueError, match=rf"not a loadable Qwen-Image checkpoint: {problem}.*Saw num_layers 2"):
        infer_qwen_config(weights)


def test_missing_blocks_are_named() -> None:
    weights = {key: t for key, t in meta_weights(replace(TINY, num_layers=3)).items() if ".1." not in key}
    with pytest.raises(ValueError, match=r"transformer_blocks \[1\] are missing.*Saw num_layers 3"):
        infer_qwen_config(weights)


def test_rope_axes_must_fit_head_dim() -> None:
    with pytest.raises(ValueError, match=r"axes_dim \[4, 4, 4\] must be even sizes summing to head_dim 16"):
        infer_qwen_config(meta_weights(), {"axes_dim": "[4, 4, 4]"})


def test_layered_and_controlnet_checkpoints_are_refused() -> None:
    layered = {**meta_weights(), "time_text_embed.addition_t_embedding.weight": torch.empty(2, 32, device="meta")}
    with pytest.raises(ValueError, match="Qwen-Image-Layered's layer-index embedding"):
        infer_qwen_config(layered)
    controlnet = {key: t for key, t in meta_weights().items() if not key.startswith(("norm_out.", "proj_out."))}
    controlnet["controlnet_x_embedder.weight"] = torch.empty(32, 16, device="meta")
    assert detect_architecture(controlnet) == "qwen_image"  # the same blocks, hence a dedicated message
    with pytest.raises(ValueError, match="marks a Qwen-Image ControlNet"):
        infer_qwen_config(controlnet)


# --- detection ---------------------------------------------------------------


def test_detection_never_confuses_qwen_image(monkeypatch: pytest.MonkeyPatch, released) -> None:
    layouts = layouts_by_architecture(monkeypatch)  # Z-Image, Flux.1 and Flux.2 in each of their layouts
    weights = random_weights(TINY)
    layouts["qwen_image"] = [weights, strip_prefix(single_file(weights)), released]
    for expected, found in layouts.items():
        for keys in found:
            assert [name for name, arch in ARCHITECTURES.items() if arch.matches(set(keys))] == [expected]


def test_look_alikes_are_not_qwen_image() -> None:
    # Qwen-Image 2.1 (another architecture: SwiGLU, shared modulation, no txt_norm) and
    # NucleusMoE-Image (Qwen-Image's embedders, single-stream blocks) share many names.
    with torch.device("meta"):
        qwen21 = QwenImage21Transformer2DModel(
            num_layers=2, attention_head_dim=16, num_attention_heads=2, context_in_dim=24, axes_dims_rope=(4, 6, 6)
        ).state_dict()
        nucleus = NucleusMoEImageTransformer2DModel(  # width 128: its MLP rounds its width down to 128s
            num_layers=2, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=24,
            axes_dims_rope=(16, 24, 24), moe_enabled=False,
        ).state_dict()
    for keys in (qwen21, nucleus):
        assert {"img_in.weight", "transformer_blocks.0.attn.norm_q.weight"} <= set(keys)
        with pytest.raises(ValueError, match="unrecognised DiT checkpoint"):
            detect_architecture(keys)


def test_unknown_architecture_lists_every_signature() -> None:
    with pytest.raises(ValueError) as error:
        detect_architecture(["blocks.0.mlp.weight"])
    message = str(error.value)
    assert "qwen_image: txt_norm.weight, img_in.weight, transformer_blocks.0.img_mod.1.weight" in message
    assert all(f"{name}:" in message for name in ("zimage", "flux", "flux2"))
