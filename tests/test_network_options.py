"""Network options with kohya / PEFT semantics: LoRA+, RS-LoRA, dropouts, max-norm, DoRA fallbacks, inits, Conv."""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comfy_merge import comfy_merge
from dit_trainer.training.network.comfy_format import adapter_state_dict
from dit_trainer.training.network.conv_lora import LoRAConvModule
from dit_trainer.training.network.lora import DORA_EPS, LoRAModule
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from test_adapter_math import model_inputs, randomise_adapters, tiny_model
from test_adapter_math import one_cpu_thread  # noqa: F401  (pytest fixture, used by name)


def identity_adapter(rank: int = 4, alpha: float = 4.0, **options) -> LoRAModule:
    """A = [I | 0], B = [I; 0]: rank channel j carries input j to output j, so dropout masks are visible."""
    base = nn.Linear(6, 5, bias=False)
    nn.init.zeros_(base.weight)
    adapter = LoRAModule("probe", base, rank=rank, alpha=alpha, **options)
    with torch.no_grad():
        adapter.lora_A.copy_(torch.eye(rank, 6))
        adapter.lora_B.copy_(torch.eye(5, rank))
    adapter.attach()
    return adapter


# --- LoRA+ -------------------------------------------------------------------------


def test_loraplus_puts_only_B_at_the_higher_lr():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, algo="dora", loraplus_lr_ratio=16.0))
    groups = {g["name"]: g for g in network.param_groups(1e-4)}
    assert set(groups) == {"lora_A", "lora_B", "magnitude"}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert groups["lora_A"]["lr"] == groups["magnitude"]["lr"] == 1e-4
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["lora_B"] == {id(a.lora_B) for a in network.adapters}
    assert ids["lora_A"] == {id(a.lora_A) for a in network.adapters}
    assert ids["magnitude"] == {id(a.magnitude) for a in network.adapters}
    # Every trainable parameter is in exactly one group, and a torch optimizer keeps the rates.
    assert sum(len(v) for v in ids.values()) == len(list(network.parameters()))
    optimizer = torch.optim.AdamW(network.param_groups(1e-4))
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-4, 1e-4, 16e-4])


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_loraplus_off_keeps_one_lr(ratio):
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, loraplus_lr_ratio=ratio))
    groups = network.param_groups(3e-4)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B"]  # no DoRA: no magnitude group
    assert all(g["lr"] == 3e-4 for g in groups)


# --- RS-LoRA -----------------------------------------------------------------------


def test_default_alpha_is_one_not_rank():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=8))
    assert {a.alpha for a in network.adapters} == {1.0}
    assert {a.scale for a in network.adapters} == {1.0 / 8}


def test_rslora_scale_and_stored_alpha():
    base = nn.Linear(32, 32)
    assert LoRAModule("a", base, rank=16, alpha=8).scale == 8 / 16
    assert LoRAModule("a", base, rank=16, alpha=8, use_rslora=True).scale == 8 / 4
    assert LoRAModule("a", base, rank=16, alpha=0, use_rslora=True).scale == 1.0  # alpha 0 -> sqrt(r)
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=4, alpha=3.0, use_rslora=True))
    tensors = adapter_state_dict(network)
    alpha = tensors["diffusion_model.layers.0.attention.qkv.alpha"].item()
    assert alpha / 4 == pytest.approx(3.0 / math.sqrt(4))  # a plain alpha / r reader gets alpha / sqrt(r)


# --- dropouts ----------------------------------------------------------------------


def test_network_dropout_zeroes_rank_activations_and_rescales():
    torch.manual_seed(0)
    adapter = identity_adapter(dropout=0.5).train()
    x = torch.ones(64, 6)
    delta = adapter.base(x)  # base weight is zero: output is the adapter's delta
    # kept entries are scale / (1 - p) = 1 * 2, dropped are 0, independently per element
    values = set(delta[:, :4].unique().tolist())
    assert values == {0.0, 2.0}
    assert torch.equal(delta[:, 4], torch.zeros(64))
    adapter.eval()
    assert torch.equal(adapter.base(x)[:, :4], torch.ones(64, 4))


def test_rank_dropout_mask_is_per_sample_and_rank_and_rescales():
    torch.manual_seed(0)
    adapter = identity_adapter(rank_dropout=0.25).train()
    x = torch.ones(16, 7, 6)  # (batch, tokens, in)
    delta = adapter.base(x)[..., :4]
    scale = torch.tensor(1.0 / (1.0 - 0.25)).item()  # in float32, as the layer computes it
    assert set(delta.unique().tolist()) <= {0.0, scale}
    # One draw per (sample, rank channel): identical over the sample's tokens.
    assert torch.equal(delta, delta[:, :1].expand_as(delta))
    kept = (delta[:, 0] > 0).float().mean()
    assert 0.5 < kept < 0.95
    assert torch.equal(adapter.eval().base(x)[..., :4], torch.ones(16, 7, 4))


def test_module_dropout_skips_the_whole_adapter():
    torch.manual_seed(0)
    adapter = identity_adapter(module_dropout=0.5).train()
    x = torch.ones(3, 6)
    outcomes = [adapter.base(x) for _ in range(200)]
    skipped = sum(bool(torch.equal(o, torch.zeros(3, 5))) for o in outcomes)
    applied = sum(bool(torch.equal(o[:, :4], torch.ones(3, 4))) for o in outcomes)
    assert skipped + applied == 200 and 60 < skipped < 140
    adapter.eval()
    assert all(torch.equal(adapter.base(x)[:, :4], torch.ones(3, 4)) for _ in range(20))


def test_dropouts_reach_the_adapters_from_the_config():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, dropout=0.1, rank_dropout=0.2, module_dropout=0.3))
    assert {(a.dropout, a.rank_dropout, a.module_dropout) for a in network.adapters} == {(0.1, 0.2, 0.3)}
    with pytest.raises(ValueError, match="rank_dropout=1.0 must be in"):
        LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, rank_dropout=1.0))


# --- max-norm ----------------------------------------------------------------------


def kohya_max_norm(downs, ups, scales, max_norm):
    """sd-scripts networks/lora.py apply_max_norm_regularization, on materialised up @ down."""
    keys_scaled, norms, ratios = 0, [], []
    for down, up, scale in zip(downs, ups, scales):
        updown = (up @ down) * scale
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired / norm
        if ratio != 1:
            keys_scaled += 1
        norms.append((updown.norm() * ratio).item())
        ratios.append(ratio.item())
    return keys_scaled, sum(norms) / len(norms), max(norms), ratios


def test_max_norm_matches_kohya():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=4, alpha=2.0))
    randomise_adapters(network)
    with torch.no_grad():
        network.adapters[0].lora_B.mul_(0.01)  # one small adapter stays untouched
    downs = [a.lora_A.detach().clone() for a in network.adapters]
    ups = [a.lora_B.detach().clone() for a in network.adapters]
    max_norm = 1.0
    keys, mean, top, ratios = kohya_max_norm(downs, ups, [a.scale for a in network.adapters], max_norm)
    assert 0 < keys < len(network.adapters)
    stats = network.apply_max_norm(max_norm)
    assert stats.keys_scaled == keys
    assert stats.mean_norm == pytest.approx(mean, rel=1e-5)
    assert stats.max_norm == pytest.approx(top, rel=1e-5) and stats.max_norm <= max_norm * (1 + 1e-6)
    for adapter, down, up, ratio in zip(network.adapters, downs, ups, ratios):
        torch.testing.assert_close(adapter.lora_A.detach(), down * math.sqrt(ratio))
        torch.testing.assert_close(adapter.lora_B.detach(), up * math.sqrt(ratio))


def test_max_norm_rejects_pissa_and_bad_values(one_cpu_thread):
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match="init='pissa'"):
        network.apply_max_norm(1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2)).apply_max_norm(0.0)


# --- DoRA fallbacks ----------------------------------------------------------------


def test_dora_disabled_per_reason_with_one_log_line_each(caplog):
    cfg = NetworkConfig(rank=2, algo="dora", rank_dropout=0.1, dropout=0.1, split_qkv=True)
    with caplog.at_level(logging.WARNING, logger="dit_trainer.training.network.network"):
        network = LoRANetwork(tiny_model(), "zimage", cfg)
    assert {a.algo for a in network.adapters} == {"lora"}
    lines = [r.getMessage() for r in caplog.records if "DoRA disabled" in r.getMessage()]
    assert sorted(lines) == sorted(
        [
            "DoRA disabled on 10 modules (plain LoRA there): dropout is set",
            "DoRA disabled on 10 modules (plain LoRA there): rank_dropout is set",
            "DoRA disabled on 2 modules (plain LoRA there): split_qkv splits the layer",
        ]
    )
    split_only = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, algo="dora", split_qkv=True))
    algos = {a.name: a.algo for a in split_only.adapters}
    assert algos["layers.0.attention.qkv"] == "lora" and algos["layers.0.attention.out"] == "dora"


def test_direct_dora_with_dropout_is_refused():
    with pytest.raises(ValueError, match="DoRA cannot be combined"):
        LoRAModule("x", nn.Linear(8, 8), rank=2, alpha=1, algo="dora", dropout=0.1)


# --- split q / k / v ---------------------------------------------------------------


def test_split_qkv_is_one_lora_per_slice():
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=3, alpha=2.0, split_qkv=True)).attach()
    randomise_adapters(network)
    adapter = network.by_name()["layers.0.attention.qkv"]
    assert adapter.split_dims == [48, 48, 48] and adapter.lora_A.shape == (9, 48)
    x = torch.randn(5, 48)
    with torch.no_grad():
        got = adapter.base(x)
    w0 = adapter.base.weight
    expected = []
    for part in range(3):
        rows = slice(48 * part, 48 * (part + 1))
        a_p = adapter.lora_A[3 * part : 3 * (part + 1)]
        b_p = adapter.lora_B[rows]
        expected.append(x @ w0[rows].t() + adapter.scale * (x @ a_p.t()) @ b_p.t())
    torch.testing.assert_close(got, torch.cat(expected, dim=-1))
    # Exported fused: A stacked, B block-diagonal, alpha * 3 keeps alpha / rank.
    tensors = adapter_state_dict(network)
    key = "diffusion_model.layers.0.attention.qkv"
    up = tensors[f"{key}.lora_B.weight"]
    assert up.shape == (144, 9) and torch.count_nonzero(up[:48, 3:]) == 0 and torch.count_nonzero(up[48:96, :3]) == 0
    assert tensors[f"{key}.alpha"].item() == pytest.approx(3 * 2.0)


# --- inits -------------------------------------------------------------------------


def test_orthogonal_init_has_orthonormal_rows():
    adapter = LoRAModule("x", nn.Linear(16, 8), rank=4, alpha=1, init="orthogonal")
    torch.testing.assert_close(adapter.lora_A @ adapter.lora_A.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert torch.count_nonzero(adapter.lora_B) == 0


def test_pissa_moves_the_top_singular_part_and_detach_restores_w0_exactly(one_cpu_thread):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        base_out = model(x, sigma, ctx)
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=3, alpha=1.5, init="pissa")).attach()
    adapter = network.adapters[0]
    w0 = before[f"{adapter.name}.weight"]
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(adapter.scale * adapter.lora_B @ adapter.lora_A, top, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.base.weight, w0 - top, atol=1e-5, rtol=1e-4)  # residual base
    with torch.no_grad():
        assert (model(x, sigma, ctx) - base_out).abs().max() < 1e-4 * base_out.abs().max()
        network.set_multiplier(0.0)  # strength 0 is the original layer, not the residual
        assert (model(x, sigma, ctx) - base_out).abs().max() < 1e-4 * base_out.abs().max()
    network.detach_from_model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("options", [dict(algo="dora"), dict(split_qkv=True)])
def test_pissa_is_rejected_with_dora_or_split(options):
    with pytest.raises(ValueError, match="init='pissa'"):
        LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, init="pissa", **options))


def test_pissa_is_rejected_on_a_float8_base():
    base = nn.Linear(8, 8, bias=False)
    base.weight.data = base.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8"):
        LoRAModule("x", base, rank=2, alpha=1, init="pissa")


def test_dora_magnitude_starts_from_the_dequantised_base():
    base = nn.Linear(16, 8, bias=False)
    weight = (torch.randn(8, 16) * 0.5).to(torch.float8_e4m3fn)
    base.weight = nn.Parameter(weight, requires_grad=False)
    base.weight_scale = torch.tensor(0.37)
    for axis, dim in (("input", 0), ("output", 1)):
        adapter = LoRAModule("x", base, rank=2, alpha=1, algo="dora", dora_axis=axis)
        live = weight.float() * 0.37
        torch.testing.assert_close(adapter.magnitude.detach(), live.norm(dim=dim) + DORA_EPS)
        torch.testing.assert_close(adapter.dora_norm(), live.norm(dim=dim))


# --- Conv --------------------------------------------------------------------------


def test_conv_adapter_equals_its_comfyui_merge():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    adapter = LoRAConvModule("conv", conv, rank=2, alpha=3.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    adapter.attach()
    x = torch.randn(2, 4, 9, 9)
    down, up = adapter.export_factors()
    tensors = {"c.lora_A.weight": down, "c.lora_B.weight": up, "c.alpha": torch.tensor(adapter.export_alpha())}
    for strength in (1.0, 0.5):
        adapter.multiplier = strength
        merged = comfy_merge(conv.weight, tensors, "c", strength)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), F.conv2d(x, merged, conv.bias, stride=2, padding=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, conv.weight)  # the adapter does something


def test_dora_is_linear_only(caplog):
    from test_network_selection import ConvToy

    cfg = NetworkConfig(rank=2, algo="dora", conv_dim=2, include_patterns=[r"layers\.0\.conv"])
    with caplog.at_level(logging.WARNING, logger="dit_trainer.training.network.network"):
        network = LoRANetwork(ConvToy(), "zimage", cfg)
    algos = {a.name: a.algo for a in network.adapters}
    assert algos == {"layers.0.attention.qkv": "dora", "layers.0.conv": "lora"}
    assert "DoRA disabled on 1 modules (plain LoRA there): Conv layer (DoRA is Linear-only)" in caplog.text


def test_conv_rank_dropout_masks_channels_per_sample():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1, bias=False)
    nn.init.zeros_(conv.weight)
    adapter = LoRAConvModule("conv", conv, rank=3, alpha=3.0, rank_dropout=0.5)
    with torch.no_grad():
        adapter.lora_A.copy_(torch.eye(3)[:, :, None, None])
        adapter.lora_B.copy_(torch.eye(3)[:, :, None, None])
    adapter.attach()
    out = adapter.train().base(torch.ones(8, 3, 4, 4))
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))  # same decision at every pixel
