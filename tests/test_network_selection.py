"""Target selection: default targets of the real architectures, patterns, per-layer rank / alpha, verbose."""

import logging

import pytest
import torch
import torch.nn as nn

from dit_trainer.training.models.flux import FluxConfig, FluxDiT
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.network.targets import module_kinds, select_modules
from test_adapter_math import tiny_model


def flux_modules(family: str = "flux1", depth: int = 19, depth_single_blocks: int = 38) -> list[tuple[str, str]]:
    """(name, kind) of the engine's own Flux model at the released width and the given depth, built on
    the meta device (no memory): the layout the targets are applied to is the real one."""
    config = FluxConfig(depth=depth, depth_single_blocks=depth_single_blocks)
    if family == "flux2":
        config = FluxConfig(family="flux2", in_channels=128, patch_size=1, hidden_size=6144, num_heads=48, depth=depth,
                            depth_single_blocks=depth_single_blocks, mlp_ratio=3.0, context_in_dim=15360,
                            vec_in_dim=0, axes_dim=[32, 32, 32, 32], theta=2000, qkv_bias=False)
    with torch.device("meta"):
        return module_kinds(FluxDiT(config))


def qwen_image_modules(blocks: int = 60) -> list[tuple[str, str]]:
    """ComfyUI's Qwen-Image layout (comfy/ldm/qwen_image/model.py; diffusers names)."""
    names = [("img_in", "linear"), ("txt_in", "linear"), ("txt_norm", "other"), ("proj_out", "linear")]
    names += [("time_text_embed.timestep_embedder.linear_1", "linear"), ("time_text_embed.timestep_embedder.linear_2", "linear")]
    names += [("norm_out.linear", "linear")]
    for i in range(blocks):
        b = f"transformer_blocks.{i}"
        names += [(f"{b}.img_mod.1", "linear"), (f"{b}.txt_mod.1", "linear"), (f"{b}.img_norm1", "other")]
        for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            names.append((f"{b}.attn.{p}", "linear"))
        names += [(f"{b}.attn.norm_q", "other"), (f"{b}.attn.norm_added_k", "other")]
        for stream in ("img", "txt"):
            names += [(f"{b}.{stream}_mlp.net.0.proj", "linear"), (f"{b}.{stream}_mlp.net.2", "linear")]
    return names


def zimage_modules() -> list[tuple[str, str]]:
    """The released Z-Image layout (30 layers, 2 + 2 refiners), from our model class on the meta device."""
    with torch.device("meta"):
        return module_kinds(ZImageDiT(ZImageConfig()))


def count(modules, architecture, **options) -> int:
    options = {"rank": 4, "alpha": 1.0, **options}
    return len(select_modules(modules, architecture, **options).chosen)


def test_flux1_default_targets_are_the_228_block_linears():
    modules = flux_modules()
    assert count(modules, "flux") == 19 * 8 + 38 * 2 == 228
    chosen = select_modules(modules, "flux", rank=4, alpha=1.0).names
    assert not [n for n in chosen if "mod" in n or "_in" in n or "final" in n]
    # exclude_mod=False adds img_mod / txt_mod per double block and modulation per single block.
    assert count(modules, "flux", exclude_mod=False) == 228 + 19 * 2 + 38


def test_qwen_image_default_targets_are_attention_and_mlps():
    modules = qwen_image_modules()
    assert count(modules, "qwen_image") == 60 * 12
    assert count(modules, "qwen_image", exclude_mod=False) == 60 * 14


def test_zimage_real_layout_counts():
    modules = zimage_modules()
    assert sum(1 for _, kind in modules if kind == "linear") > 180  # the layout is real, not empty
    assert count(modules, "zimage") == 30 * 5
    assert count(modules, "zimage", train_refiners=True) == 30 * 5 + 4 * 5
    assert count(modules, "zimage", exclude_mod=False) == 30 * 6
    # Only the noise refiners are modulated; the context refiners have no adaLN.
    assert count(modules, "zimage", exclude_mod=False, train_refiners=True) == 30 * 6 + 4 * 5 + 2


def test_zimage_small_model_selection():
    model = tiny_model()  # 2 layers, 1 + 1 refiners
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=2))
    block = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    assert network.names == [f"layers.{i}.{p}" for i in range(2) for p in block]
    refiners = LoRANetwork(model, "zimage", NetworkConfig(rank=2, train_refiners=True))
    assert len(refiners.names) == 20


def test_include_overrides_exclude_and_excludes_apply():
    modules = zimage_modules()
    excluded = select_modules(modules, "zimage", rank=4, alpha=1.0, exclude_patterns=[r"layers\.\d+\.feed_forward\..*"])
    assert len(excluded.chosen) == 30 * 2
    assert ("layers.0.feed_forward.w1", "exclude_patterns") in excluded.skipped
    both = select_modules(
        modules,
        "zimage",
        rank=4,
        alpha=1.0,
        exclude_patterns=[r"layers\.\d+\.feed_forward\..*"],
        include_patterns=[r"layers\.0\.feed_forward\.w2", r"x_embedder", r"layers\.3\.adaLN_modulation\.0"],
    )
    names = both.names
    assert "layers.0.feed_forward.w2" in names and "layers.1.feed_forward.w2" not in names
    assert "x_embedder" in names  # include adds layers outside the default targets
    assert "layers.3.adaLN_modulation.0" in names  # and overrides the modulation exclude
    assert len(names) == 30 * 2 + 3


def test_fullmatch_not_search():
    modules = zimage_modules()
    # "attention.qkv" alone matches nothing: patterns fullmatch the whole dotted name.
    assert count(modules, "zimage", exclude_patterns=[r"attention\.qkv"]) == 150
    assert count(modules, "zimage", exclude_patterns=[r".*attention\.qkv"]) == 120


def test_invalid_regex_names_the_option():
    with pytest.raises(ValueError, match=r"include_patterns: invalid regex '\('"):
        select_modules(zimage_modules(), "zimage", rank=4, alpha=1.0, include_patterns=["("])


def test_rank_and_alpha_patterns_first_fullmatch_wins():
    modules = zimage_modules()
    selection = select_modules(
        modules,
        "zimage",
        rank=4,
        alpha=1.0,
        rank_pattern={r"layers\.0\..*": 8, r"layers\.\d+\.attention\.qkv": 16, r"layers\.1\.feed_forward\.w3": 0},
        alpha_pattern={r".*feed_forward.*": 2.0, r"layers\.0\.feed_forward\.w1": 99.0},
    )
    by_name = {c.name: c for c in selection.chosen}
    assert by_name["layers.0.attention.qkv"].rank == 8  # first entry wins over the qkv one
    assert by_name["layers.5.attention.qkv"].rank == 16
    assert by_name["layers.5.attention.out"].rank == 4
    assert by_name["layers.0.feed_forward.w1"].alpha == 2.0  # the later, more specific entry never wins
    assert by_name["layers.0.attention.out"].alpha == 1.0
    assert "layers.1.feed_forward.w3" not in by_name  # rank 0 skips the layer
    assert ("layers.1.feed_forward.w3", "rank 0 from rank_pattern") in selection.skipped


class ConvToy(nn.Module):
    """A Z-Image-named block with a Conv layer next to it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].attention = nn.Module()
        self.layers[0].attention.qkv = nn.Linear(8, 24)
        self.layers[0].conv = nn.Conv2d(4, 6, 3, padding=1)


def test_conv_layers_need_conv_dim():
    model = ConvToy()
    skipped = LoRANetwork(model, "zimage", NetworkConfig(rank=2, include_patterns=[r"layers\.0\.conv"]))
    assert skipped.names == ["layers.0.attention.qkv"]
    assert ("layers.0.conv", "Conv layer and conv_dim is 0") in skipped.skipped
    conv = LoRANetwork(model, "zimage", NetworkConfig(rank=2, conv_dim=3, conv_alpha=1.5, include_patterns=[r"layers\.0\.conv"]))
    adapter = conv.by_name()["layers.0.conv"]
    assert (adapter.kind, adapter.rank, adapter.alpha) == ("conv", 3, 1.5)
    assert conv.by_name()["layers.0.attention.qkv"].rank == 2


def test_verbose_lists_every_module_and_the_skipped(caplog):
    model = ConvToy()
    cfg = NetworkConfig(rank=2, alpha=0.5, verbose=True, include_patterns=[r"layers\.0\.conv"], rank_pattern={r".*qkv": 3})
    with caplog.at_level(logging.INFO, logger="dit_trainer.training.network.network"):
        LoRANetwork(model, "zimage", cfg)
    text = caplog.text
    assert "adapted layers.0.attention.qkv: linear, rank 3, alpha 0.5, lora" in text
    assert "skipped layers.0.conv: Conv layer and conv_dim is 0" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dit_trainer.training.network.network"):
        LoRANetwork(model, "zimage", NetworkConfig(rank=2, include_patterns=[r"layers\.0\.conv"]))
    assert "adapted layers.0.attention.qkv" not in caplog.text  # only with verbose


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="no layer of the zimage model matches"):
        LoRANetwork(ConvToy(), "zimage", NetworkConfig(rank=2, exclude_patterns=[".*"]))
    with pytest.raises(ValueError, match="known: "):
        select_modules([], "sdxl", rank=4, alpha=1.0)
