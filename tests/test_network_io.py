"""Export / import: round trips per key style, q/k/v fused <-> split, foreign files, consistency errors, metadata."""

import json
import logging

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file, save_file

from comfy_merge import comfy_key_map, comfy_patched_weights
from dit_trainer.training.models.loader import to_split_layout_zimage
from dit_trainer.training.network.comfy_format import PREFIX, adapter_state_dict, export_adapter, load_adapter, load_adapter_into
from dit_trainer.training.network.file_config import config_for_file
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from test_adapter_math import VARIANTS, ZIMAGE_LAYOUT, model_inputs, randomise_adapters, tiny_model
from test_adapter_math import one_cpu_thread  # noqa: F401  (pytest fixture, used by name)

QKV = "layers.0.attention.qkv"


def outputs(model) -> torch.Tensor:
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        return model(x, sigma, ctx)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def trained(cfg: NetworkConfig, seed: int = 2):
    model = tiny_model()
    network = LoRANetwork(model, "zimage", cfg).attach()
    randomise_adapters(network, seed)
    return model, network


def reload(model, network, path, cfg: NetworkConfig):
    """Detach `network`, build a fresh one from `cfg` and load `path` into it."""
    network.detach_from_model()
    fresh = LoRANetwork(model, "zimage", cfg).attach()
    return fresh, load_adapter_into(fresh, path)


ROUND_TRIPS = [(v, s) for v in VARIANTS for s in ("comfy", "kohya")] + [
    (VARIANTS[0], "peft"),
    (VARIANTS[1], "peft"),
    (VARIANTS[3], "peft"),  # output-axis DoRA: PEFT's lora_magnitude_vector
    (dict(algo="lora", split_qkv=True), "comfy"),
    (dict(algo="lora", split_qkv=True), "kohya"),
    (dict(algo="lora", split_qkv=True), "peft"),
    (dict(algo="lora", init="pissa"), "comfy"),
    (dict(algo="lora", init="pissa"), "peft"),
]


def option_id(value) -> str:
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.mark.parametrize("variant,style", ROUND_TRIPS, ids=option_id)
def test_round_trip_gives_identical_outputs(tmp_path, variant, style, one_cpu_thread):
    cfg = NetworkConfig(rank=4, **{"alpha": 2.0, **variant})
    model, network = trained(cfg)
    expected = outputs(model)
    path = export_adapter(network, tmp_path / "a.safetensors", style=style)
    fresh, report = reload(model, network, path, cfg)
    assert len(report.loaded) == len(fresh.adapters) and not report.not_in_file
    # Exact where the file holds the network's own tensors; a rescaled B (PEFT's folded scale)
    # or a DoRA magnitude recovered through norms rounds in the last bits.
    assert rel_err(outputs(model), expected) <= 1e-6


def test_input_axis_dora_cannot_be_written_as_peft(tmp_path):
    _, network = trained(NetworkConfig(rank=4, algo="dora", dora_axis="input"))
    with pytest.raises(ValueError, match="PEFT / diffusers DoRA is output-axis only.*style='comfy'"):
        export_adapter(network, tmp_path / "a.safetensors", style="peft")


def test_split_file_continues_in_a_fused_network_and_back(tmp_path):
    split_cfg = NetworkConfig(rank=2, alpha=1.0, split_qkv=True)
    model, network = trained(split_cfg)
    expected = outputs(model)
    path = export_adapter(network, tmp_path / "split.safetensors")
    # The fused file's qkv is rank 3 * 2 with alpha 3 * 1; a fused network of that rank loads it as is.
    fused_cfg = NetworkConfig(rank=2, alpha=1.0, rank_pattern={r".*attention\.qkv": 6}, alpha_pattern={r".*attention\.qkv": 3.0})
    fused, report = reload(model, network, path, fused_cfg)
    assert rel_err(outputs(model), expected) == 0.0
    # ... and a fused network's file goes back into a split one when B is block-diagonal.
    path2 = export_adapter(fused, tmp_path / "fused.safetensors")
    split_again, report = reload(model, fused, path2, split_cfg)
    assert QKV in report.qkv_converted
    assert rel_err(outputs(model), expected) == 0.0


def test_general_fused_lora_does_not_fit_a_split_network(tmp_path):
    # Fused qkv at rank 6 = 3 * 2 and the same alpha / rank as the split network: only B's layout differs.
    fused_cfg = NetworkConfig(rank=2, alpha=1.0, rank_pattern={r".*qkv": 6}, alpha_pattern={r".*qkv": 3.0})
    model, network = trained(fused_cfg)
    path = export_adapter(network, tmp_path / "fused.safetensors")
    network.detach_from_model()
    split = LoRANetwork(model, "zimage", NetworkConfig(rank=2, alpha=1.0, split_qkv=True))
    with pytest.raises(ValueError, match="not block-diagonal.*split_qkv=False"):
        load_adapter_into(split, path)


def test_peft_slices_load_into_a_split_network(tmp_path):
    """Our PEFT export of a fused qkv is q/k/v slices sharing A: a split network takes A per slice."""
    model, network = trained(NetworkConfig(rank=2, alpha=1.0))
    expected = outputs(model)
    path = export_adapter(network, tmp_path / "peft.safetensors", style="peft")
    _, report = reload(model, network, path, NetworkConfig(rank=2, alpha=1.0, split_qkv=True))
    assert QKV in report.qkv_converted and QKV in report.rescaled
    assert rel_err(outputs(model), expected) <= 1e-6


def musubi_style_file(path, network, rank=2, alpha=1.0, seed=0, qkv_as_diffusers=True):
    """A hand-written foreign file: q/k/v as separate diffusers LoRAs (ai-toolkit / musubi Z-Image
    after ComfyUI conversion), the rest as kohya lora_unet_ keys."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for adapter in network.adapters:
        out_features, in_features = adapter.base.weight.shape
        if adapter.name.endswith("attention.qkv") and qkv_as_diffusers:
            block = adapter.name[: -len("qkv")]
            for part in ("to_q", "to_k", "to_v"):
                key = f"transformer.{block}{part}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.2
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_features // 3, rank, generator=g) * 0.2
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            key = "lora_unet_" + adapter.name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) * 0.2
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * 0.2
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_foreign_file_matches_what_comfyui_applies(tmp_path):
    """kohya keys + separate diffusers q/k/v LoRAs: the engine after import == ComfyUI's merge of the file."""
    model = tiny_model()
    checkpoint = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    probe = LoRANetwork(model, "zimage", NetworkConfig(rank=2))
    path = musubi_style_file(tmp_path / "foreign.safetensors", probe)
    # Separate q/k/v LoRAs of rank 2 fuse to rank 6 (A stacked, B block-diagonal, same alpha / rank).
    fused_cfg = NetworkConfig(rank=2, rank_pattern={r".*qkv": 6}, alpha_pattern={r".*qkv": 3.0})
    network = LoRANetwork(model, "zimage", fused_cfg).attach()
    report = load_adapter_into(network, path)
    assert report.styles == ["diffusers", "kohya"] and len(report.qkv_converted) == 2
    tensors = load_file(str(path))
    patched, not_loaded = comfy_patched_weights(checkpoint, tensors, comfy_key_map(checkpoint, zimage=ZIMAGE_LAYOUT), 1.0)
    assert not not_loaded
    for adapter in network.adapters:
        x = torch.randn(4, adapter.base.in_features)
        with torch.no_grad():
            ours = adapter.base(x)
            comfy = torch.nn.functional.linear(x, patched[f"{PREFIX}{adapter.name}.weight"], adapter.base.bias)
        assert rel_err(ours, comfy) < 1e-5, adapter.name
    # The same file in a split network: each slice is one of its LoRAs.
    network.detach_from_model()
    split = LoRANetwork(model, "zimage", NetworkConfig(rank=2, split_qkv=True)).attach()
    load_adapter_into(split, path)
    qkv = split.by_name()[QKV]
    x = torch.randn(4, 48)
    with torch.no_grad():
        merged = patched[f"{PREFIX}{QKV}.weight"]
        assert rel_err(qkv.base(x), x @ merged.t()) < 1e-5


def test_rank_mismatch_names_the_fixes(tmp_path):
    model = tiny_model()
    path = musubi_style_file(tmp_path / "foreign.safetensors", LoRANetwork(model, "zimage", NetworkConfig(rank=2)))
    with pytest.raises(ValueError, match=r"has rank 6 .* set rank=6 .*split_qkv=True with rank=2"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=2)), path)


def test_alpha_mismatch_names_the_files_alpha(tmp_path):
    model, network = trained(NetworkConfig(rank=4, alpha=2.0))
    path = export_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    with pytest.raises(ValueError, match=r"scale alpha / rank is 0.5 but the network's is 0.25; set alpha to the file's \(alpha 2"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=1.0)), path)


@pytest.mark.parametrize("file_rslora", [True, False])
def test_rslora_mismatch_is_a_hard_error_naming_both_fixes(tmp_path, file_rslora):
    model, network = trained(NetworkConfig(rank=4, alpha=2.0, use_rslora=file_rslora))
    path = export_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    other = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=2.0, use_rslora=not file_rslora))
    if file_rslora:  # stored alpha = 2 * sqrt(4) = 4
        fixes = r"set use_rslora=True with alpha=2\.0 .* keep use_rslora=False and set alpha=4"
    else:  # stored alpha 2; RS-LoRA alpha giving 2 / 4: 2 / sqrt(4) = 1
        fixes = r"set use_rslora=False with alpha=2, or keep use_rslora=True and set alpha=1"
    with pytest.raises(ValueError, match=fixes):
        load_adapter_into(other, path)


def test_suspicious_alpha_hint_without_flag(tmp_path, caplog):
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=2.0))
    tensors = adapter_state_dict(network)  # alpha 2 = sqrt(4) everywhere, and no metadata at all
    save_file(tensors, str(tmp_path / "a.safetensors"))
    with caplog.at_level(logging.WARNING):
        report = load_adapter_into(network, tmp_path / "a.safetensors")
    assert any("alpha = sqrt(rank)" in w for w in report.warnings)
    assert "may come from an RS-LoRA run" in caplog.text
    rs_network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=4.0, use_rslora=True))
    with pytest.raises(ValueError, match="use_rslora_flag missing.*Note: .*alpha = sqrt\\(rank\\)"):
        load_adapter_into(rs_network, tmp_path / "a.safetensors")
    # alpha 1 at rank 4 is not sqrt(r): no hint
    plain = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=1.0))
    save_file(adapter_state_dict(plain), str(tmp_path / "b.safetensors"))
    assert not load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=4)), tmp_path / "b.safetensors").warnings


def test_dora_network_and_plain_file_is_a_hard_error(tmp_path):
    model, network = trained(NetworkConfig(rank=4))
    path = export_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    with pytest.raises(ValueError, match="network is DoRA .* no dora_scale .* algo='lora'"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=4, algo="dora")), path)


def test_partial_dora_file_lists_the_missing_keys(tmp_path):
    model, network = trained(NetworkConfig(rank=4, algo="dora"))
    tensors = adapter_state_dict(network)
    del tensors[f"{PREFIX}{QKV}.dora_scale"]
    del tensors[f"{PREFIX}layers.1.feed_forward.w2.dora_scale"]
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"use_rslora_flag": "false"})
    network.detach_from_model()
    fresh = LoRANetwork(model, "zimage", NetworkConfig(rank=4, algo="dora"))
    missing = rf"{PREFIX}layers\.0\.attention\.qkv\.dora_scale, {PREFIX}layers\.1\.feed_forward\.w2\.dora_scale"
    with pytest.raises(ValueError, match=rf"partial DoRA .* 2 DoRA modules .*{missing}"):
        load_adapter_into(fresh, tmp_path / "a.safetensors")
    assert all(torch.count_nonzero(a.lora_B) == 0 for a in fresh.adapters)  # nothing was half-loaded


def test_dora_file_into_lora_network_warns_and_ignores_magnitudes(tmp_path, caplog):
    model, network = trained(NetworkConfig(rank=4, algo="dora"))
    path = export_adapter(network, tmp_path / "a.safetensors")
    lora_B = {a.name: a.lora_B.detach().clone() for a in network.adapters}
    network.detach_from_model()
    plain = LoRANetwork(model, "zimage", NetworkConfig(rank=4))
    with caplog.at_level(logging.WARNING):
        report = load_adapter_into(plain, path)
    assert len(report.dora_ignored) == 10 and "magnitudes" in caplog.text and "ignored" in caplog.text
    assert all(torch.equal(a.lora_B, lora_B[a.name]) for a in plain.adapters)


def test_dora_axis_mismatch_names_the_axis(tmp_path):
    model, network = trained(NetworkConfig(rank=4, algo="dora", dora_axis="output"))
    path = export_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    with pytest.raises(ValueError, match="output axis but the network uses dora_axis='input'; set dora_axis='output'"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=4, algo="dora")), path)


def test_unknown_keys_and_text_encoder_keys(tmp_path):
    model, network = trained(NetworkConfig(rank=4))
    tensors = adapter_state_dict(network)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "te.safetensors"))
    report = load_adapter_into(network, tmp_path / "te.safetensors")
    assert report.ignored_keys == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    tensors = adapter_state_dict(network)
    tensors[f"{PREFIX}x_embedder.lora_A.weight"] = torch.zeros(4, 16)
    tensors[f"{PREFIX}x_embedder.lora_B.weight"] = torch.zeros(48, 4)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="2 keys match no layer .*include_patterns"):
        load_adapter_into(network, tmp_path / "extra.safetensors")
    # LoHa keys on an adapted layer of a LoRA network name the algo that reads them.
    tensors = adapter_state_dict(network)
    tensors[f"{PREFIX}layers.0.feed_forward.w1.hada_w1_a"] = torch.zeros(4, 16)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="LoHa / LoKr tensors must name the whole layer once, without LoRA keys"):
        load_adapter_into(network, tmp_path / "mixed.safetensors")


def test_pissa_continues_only_from_its_own_files(tmp_path, one_cpu_thread):
    model, network = trained(NetworkConfig(rank=2, init="pissa"))
    path = export_adapter(network, tmp_path / "pissa.safetensors")
    expected = outputs(model)
    network.detach_from_model()
    # As a plain rank-2r LoRA against the original base, it loads anywhere ...
    plain = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=2.0)).attach()
    load_adapter_into(plain, path)
    assert rel_err(outputs(model), expected) < 1e-5
    plain.detach_from_model()
    # ... but a PiSSA network refuses a file that is not its own (here: B0's half retrained).
    randomise_adapters(plain, seed=9)
    other = export_adapter(plain, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="PiSSA base factors differ"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=2, init="pissa")), other)


def test_metadata_records_the_training_setup(tmp_path):
    cfg = NetworkConfig(rank=4, alpha=2.0, algo="dora", dora_axis="output", use_rslora=True)
    _, network = trained(cfg)
    extra = {"ss_steps": 42, "training": {"lr": 1e-4}}
    path = export_adapter(network, tmp_path / "a.safetensors", base_hash="abc123", extra_metadata=extra)
    meta = load_adapter(LoRANetwork(tiny_model(), "zimage", cfg), path)
    assert meta["dit_trainer_architecture"] == "zimage"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert (meta["dit_trainer_algo"], meta["dit_trainer_dora_axis"]) == ("dora", "output")
    assert meta["use_rslora_flag"] == "true" and meta["dora_output_axis_folded"] == "true"
    assert meta["ss_base_model_hash"] == "abc123" and meta["ss_steps"] == "42"
    assert json.loads(meta["training"]) == {"lr": 1e-4}
    assert NetworkConfig.from_dict(json.loads(meta["dit_trainer_network"])) == cfg


PEFT_VARIANTS = [
    dict(algo="lora"),
    dict(algo="lora", use_rslora=True),
    dict(algo="dora", dora_axis="output"),
    dict(algo="lora", split_qkv=True),
]


@pytest.mark.parametrize("variant", PEFT_VARIANTS, ids=option_id)
def test_peft_export_loads_in_diffusers_with_the_same_layers(tmp_path, variant):
    """diffusers' own ZImageTransformer2DModel.load_lora_adapter on our PEFT file reproduces every adapted layer."""
    model, network = trained(NetworkConfig(rank=4, alpha=3.0, **variant))
    reference = ZImageTransformer2DModel(
        in_channels=4, dim=48, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=12, axes_dims=[4, 6, 6]
    )
    reference.load_state_dict(to_split_layout_zimage(model.state_dict()))
    path = export_adapter(network, tmp_path / "peft.safetensors", style="peft")
    reference.load_lora_adapter(load_file(str(path)), prefix="transformer", adapter_name="ours")
    modules = dict(reference.named_modules())
    for adapter in network.adapters:
        x = torch.randn(3, adapter.base.in_features)
        with torch.no_grad():
            ours = adapter.base(x)
            if adapter.name.endswith("qkv"):
                block = adapter.name[: -len("qkv")]
                theirs = torch.cat([modules[block + p](x) for p in ("to_q", "to_k", "to_v")], dim=-1)
            else:
                theirs = modules[adapter.name.replace("attention.out", "attention.to_out.0")](x)
        assert rel_err(theirs, ours) < 1e-5, adapter.name
        assert rel_err(theirs, torch.nn.functional.linear(x, adapter.original_weight())) > 1e-3  # the LoRA is applied


@pytest.mark.parametrize("prefix,suffixes", [
    ("base_model.model.", (".lora_A.default.weight", ".lora_B.default.weight")),  # PEFT get_peft_model_state_dict
    ("diffusion_model.", (".lora_A.weight", ".lora_B.weight")),  # ai-toolkit: ComfyUI prefix, diffusers names
    ("", (".lora_down.weight", ".lora_up.weight")),  # bare diffusers names (DiffSynth)
])
def test_other_prefixes_and_suffixes_load_the_same(tmp_path, prefix, suffixes):
    model, network = trained(NetworkConfig(rank=4, alpha=2.0))
    expected = outputs(model)
    tensors = adapter_state_dict(network, style="peft")  # transformer.<diffusers name>.lora_A.weight
    renamed = {}
    for key, value in tensors.items():
        key = prefix + key[len("transformer."):]
        key = key.replace(".lora_A.weight", suffixes[0]).replace(".lora_B.weight", suffixes[1])
        renamed[key] = value
    save_file(renamed, str(tmp_path / "a.safetensors"))
    fresh, report = reload(model, network, tmp_path / "a.safetensors", NetworkConfig(rank=4, alpha=2.0))
    assert len(report.loaded) == 10 and QKV in report.qkv_converted
    assert rel_err(outputs(model), expected) <= 1e-6


def test_config_for_file_samples_any_file_exactly(tmp_path, one_cpu_thread):
    """A foreign file (kohya keys + separate q/k/v LoRAs, no metadata) and a PiSSA file: the network
    built from config_for_file reproduces ComfyUI's merge / the PiSSA engine."""
    model = tiny_model()
    checkpoint = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    probe = LoRANetwork(model, "zimage", NetworkConfig(rank=2, exclude_patterns=[r"layers\.1\..*"]))
    path = musubi_style_file(tmp_path / "foreign.safetensors", probe, rank=2, alpha=1.0)
    cfg = config_for_file(model, "zimage", path)
    assert (cfg.rank, cfg.alpha, cfg.algo) == (2, 1.0, "lora")
    assert cfg.rank_pattern == {r"layers\.0\.attention\.qkv": 6} and cfg.alpha_pattern == {r"layers\.0\.attention\.qkv": 3.0}
    network = LoRANetwork(model, "zimage", cfg).attach()
    assert network.names == probe.names  # exactly the file's layers, layer 1 left alone
    load_adapter_into(network, path)
    patched, _ = comfy_patched_weights(checkpoint, load_file(str(path)), comfy_key_map(checkpoint, zimage=ZIMAGE_LAYOUT), 1.0)
    for adapter in network.adapters:
        x = torch.randn(4, adapter.base.in_features)
        with torch.no_grad():
            comfy = torch.nn.functional.linear(x, patched[f"{PREFIX}{adapter.name}.weight"], adapter.base.bias)
            assert rel_err(adapter.base(x), comfy) < 1e-5, adapter.name
    network.detach_from_model()

    model, pissa = trained(NetworkConfig(rank=2, alpha=1.0, init="pissa", algo="lora"))
    expected = outputs(model)
    pissa_path = export_adapter(pissa, tmp_path / "pissa.safetensors")
    pissa.detach_from_model()
    cfg = config_for_file(model, "zimage", pissa_path)
    assert (cfg.rank, cfg.init) == (4, "kaiming")
    plain = LoRANetwork(model, "zimage", cfg).attach()
    load_adapter_into(plain, pissa_path)
    assert rel_err(outputs(model), expected) < 1e-5


@pytest.mark.parametrize("variant", [dict(algo="dora", dora_axis="output"), dict(algo="lora", use_rslora=True)], ids=option_id)
def test_config_for_file_keeps_dora_axis_and_rslora(tmp_path, variant):
    cfg = NetworkConfig(rank=4, alpha=3.0, rank_pattern={r".*w2": 2}, **variant)
    model, network = trained(cfg)
    expected = outputs(model)
    path = export_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    rebuilt = config_for_file(model, "zimage", path)
    assert (rebuilt.algo, rebuilt.dora_axis, rebuilt.use_rslora) == (cfg.algo, cfg.dora_axis, cfg.use_rslora)
    fresh = LoRANetwork(model, "zimage", rebuilt).attach()
    load_adapter_into(fresh, path)
    assert {a.name: a.rank for a in fresh.adapters} == {a.name: a.rank for a in network.adapters}
    assert rel_err(outputs(model), expected) <= 1e-6
