"""LoHa / LoKr: ComfyUI-exact files, lycoris-lora's weight change, no-op init, import, training and resume."""

import pytest
import torch
import torch.nn as nn
from lycoris.modules.loha import LohaModule as LycorisLoha
from lycoris.modules.lokr import LokrModule as LycorisLokr
from safetensors.torch import load_file, save_file

from comfy_merge import comfy_key_map, comfy_merge, comfy_patched_weights
from dit_trainer.training.network.comfy_format import PREFIX, adapter_state_dict, load_adapter_into, save_adapter
from dit_trainer.training.network.file_config import config_for_file
from dit_trainer.training.network.loha import LoHaModule
from dit_trainer.training.network.lokr import LoKrModule, factorization
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from test_adapter_math import ZIMAGE_LAYOUT, model_inputs, tiny_model
from test_resume import assert_same_state, fresh, interrupted_then_resumed, run_config

VARIANTS = {
    "loha": dict(algo="loha"),
    "lokr-decomposed-w2": dict(algo="lokr", lokr_factor=4),
    "lokr-full-w2": dict(algo="lokr", lokr_factor=4, lokr_full_matrix=True),
    "lokr-balanced": dict(algo="lokr"),
}


def randomise(network_or_adapter, seed: int = 3, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network_or_adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def conv_adapter(variant: dict, rank: int = 2, alpha: float = 3.0):
    torch.manual_seed(0)
    base = nn.Conv2d(8, 12, 3, padding=1).requires_grad_(False)
    options = {k: v for k, v in variant.items() if k != "algo"}
    if variant["algo"] == "loha":
        adapter = LoHaModule("c", base, rank, alpha)
    else:
        adapter = LoKrModule("c", base, rank, alpha, factor=options.get("lokr_factor", -1),
                             full_matrix=options.get("lokr_full_matrix", False))
    randomise(adapter)
    return base, adapter.attach() or adapter


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("style", ["comfy", "kohya"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_linear_file_merged_by_comfyui_reproduces_the_engine(tmp_path, variant, style, strength):
    """Every adapted Linear: ComfyUI's LoHa / LoKr merge of our file == the engine's layer output (fp32)."""
    model = tiny_model()
    checkpoint = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=2, alpha=3.0, **variant)).attach()
    randomise(network)
    network.set_multiplier(strength)
    tensors = load_file(str(save_adapter(network, tmp_path / "a.safetensors", style=style)))
    assert any(".hada_w1_a" in k or ".lokr_w1" in k for k in tensors)
    patched, not_loaded = comfy_patched_weights(checkpoint, tensors, comfy_key_map(checkpoint, zimage=ZIMAGE_LAYOUT),
                                                strength)
    assert not not_loaded, f"ComfyUI would log 'lora key not loaded' for {not_loaded}"
    g = torch.Generator().manual_seed(5)
    for adapter in network.adapters:
        x = torch.randn(3, 7, adapter.base.in_features, generator=g)
        with torch.no_grad():
            engine = adapter.base(x)
            comfy = nn.functional.linear(x, patched[f"{PREFIX}{adapter.name}.weight"], adapter.base.bias)
        assert not torch.equal(engine, adapter._base_forward(x))  # the adapter does something
        rel = (engine - comfy).abs().max() / engine.abs().max()
        assert rel < 1e-5, f"{adapter.name}: relative error {rel:.2e}"


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_conv_file_merged_by_comfyui_reproduces_the_engine(variant, strength):
    base, adapter = conv_adapter(variant)
    adapter.multiplier = strength
    tensors = {f"c.{k}": v for k, v in adapter.file_tensors().items()}
    tensors["c.alpha"] = torch.tensor(adapter.export_alpha())
    merged = comfy_merge(base.weight, tensors, "c", strength)
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        engine = base(x)
        comfy = base._conv_forward(x, merged, base.bias)
    rel = (engine - comfy).abs().max() / engine.abs().max()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def lycoris_twin(adapter, variant: dict):
    """lycoris-lora's module on the same base with our factors (its own shapes and scale rule)."""
    if variant["algo"] == "loha":
        twin = LycorisLoha("t", adapter.base, lora_dim=adapter.rank, alpha=adapter.alpha)
    else:
        twin = LycorisLokr("t", adapter.base, lora_dim=adapter.rank, alpha=adapter.alpha,
                           factor=variant.get("lokr_factor", -1), full_matrix=variant.get("lokr_full_matrix", False))
    state = twin.state_dict()
    for key, tensor in adapter.file_tensors().items():
        state[key] = tensor.reshape(state[key].shape)  # LyCORIS keeps a full Conv w2 4-D
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_weight_change_equals_lycoris_for_the_same_factors(variant, kind):
    if kind == "conv":
        _, adapter = conv_adapter(variant)
    else:
        network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, alpha=3.0, **variant))
        randomise(network)
        adapter = network.adapters[0]
    twin = lycoris_twin(adapter, variant)
    assert set(twin.state_dict()) >= set(adapter.file_tensors())  # the same tensor names ...
    # get_weight: the scaled dW LyCORIS's own forward adds (its get_diff_weight multiplies the scale in once more).
    with torch.no_grad():
        expected = twin.get_weight(adapter.base.weight.shape)
    torch.testing.assert_close(adapter.delta_weight(), expected.float(), rtol=1e-6, atol=1e-7)  # ... and dW


def test_factorization_matches_lycoris():
    from lycoris.functional.general import factorization as lycoris_factorization

    for dim in (1, 7, 48, 128, 144, 250, 360, 3072, 3840):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_fresh_adapter_is_an_exact_no_op(variant):
    model = tiny_model()
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        base = model(x, sigma, ctx)
        LoRANetwork(model, "zimage", NetworkConfig(rank=2, alpha=3.0, **variant)).attach()
        assert torch.equal(model(x, sigma, ctx), base)
    _, conv = conv_adapter(variant)
    for key in conv.FILE_KEYS:  # fresh init of the conv too
        getattr(conv, key).data.copy_(getattr(type(conv)("c2", conv.base, 2, 3.0), key))
    assert torch.equal(conv.delta_weight(), torch.zeros_like(conv.base.weight))


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_file_round_trip_through_the_file_shaped_network(tmp_path, variant):
    """SampleWithLoRA's path: a network shaped from the file alone, loaded from it, gives the same layers."""
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=2, alpha=3.0, **variant))
    randomise(network)
    path = save_adapter(network, tmp_path / "a.safetensors")
    cfg = config_for_file(model, "zimage", path)
    assert cfg.algo == variant["algo"]
    twin = LoRANetwork(model, "zimage", cfg)
    report = load_adapter_into(twin, path)
    assert sorted(report.loaded) == sorted(network.names)
    for mine, theirs in zip(network.adapters, twin.adapters):
        torch.testing.assert_close(theirs.delta_weight(), mine.delta_weight(), rtol=1e-6, atol=1e-7)


def test_lycoris_style_files_load(tmp_path):
    """LyCORIS / musubi files: lycoris_ prefix, decompose_both w1 (w1_a @ w1_b), 4-D Conv w2, no alpha."""
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(algo="lokr", rank=2, alpha=2.0, lokr_factor=4))
    randomise(network)
    g = torch.Generator().manual_seed(9)
    tensors, expected = {}, {}
    for adapter in network.adapters:
        key = "lycoris_" + adapter.name.replace(".", "_")
        w1 = adapter.lokr_w1.detach()
        w1_a = torch.randn(w1.shape[0], 2, generator=g)
        w1_b = torch.randn(2, w1.shape[1], generator=g)
        tensors |= {f"{key}.lokr_w1_a": w1_a, f"{key}.lokr_w1_b": w1_b,
                    f"{key}.lokr_w2_a": adapter.lokr_w2_a.detach(), f"{key}.lokr_w2_b": adapter.lokr_w2_b.detach(),
                    f"{key}.alpha": torch.tensor(2.0)}
        prefix = key
        expected[adapter.name] = comfy_merge(adapter.base.weight, tensors, prefix, 1.0) - adapter.base.weight
    save_file(tensors, str(tmp_path / "lycoris.safetensors"))
    fresh_network = LoRANetwork(model, "zimage", NetworkConfig(algo="lokr", rank=2, alpha=2.0, lokr_factor=4))
    report = load_adapter_into(fresh_network, tmp_path / "lycoris.safetensors")
    assert report.styles == ["lycoris"]
    for adapter in fresh_network.adapters:
        torch.testing.assert_close(adapter.delta_weight(), expected[adapter.name], rtol=1e-5, atol=1e-6)


def test_full_conv_w2_written_4d_by_lycoris_loads_without_alpha(tmp_path):
    variant = dict(algo="lokr", lokr_full_matrix=True)
    base, adapter = conv_adapter(variant)
    w2 = adapter.lokr_w2.detach().reshape(adapter.lokr_w2.shape[0], -1, 3, 3)
    tensors = {"c.lokr_w1": adapter.lokr_w1.detach() * 0.5, "c.lokr_w2": w2}
    expected = comfy_merge(base.weight, tensors, "c", 1.0) - base.weight
    from dit_trainer.training.network.importer import group_file
    from dit_trainer.training.network.key_names import Alias
    from dit_trainer.training.network.product_import import load_products, product_of

    pieces, _, _, unknown = group_file("f", tensors, {"c": ("c", Alias("c"), "bare")})
    assert not unknown
    fresh_adapter = LoKrModule("c", base, 2, 3.0, full_matrix=True)
    load_products("f", {"c": fresh_adapter}, {"c": product_of("f", "c", pieces["c"])})
    torch.testing.assert_close(fresh_adapter.delta_weight(), expected, rtol=1e-6, atol=1e-7)


def test_lora_network_refuses_a_loha_file_naming_the_algo(tmp_path):
    model = tiny_model()
    path = save_adapter(LoRANetwork(model, "zimage", NetworkConfig(algo="loha", rank=2)), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="algo='loha'"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(rank=2)), path)
    with pytest.raises(ValueError, match="scale"):
        load_adapter_into(LoRANetwork(model, "zimage", NetworkConfig(algo="loha", rank=2, alpha=5.0)), path)


def test_tucker_and_weight_decomposed_files_are_refused_with_the_reason(tmp_path):
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(algo="loha", rank=2))
    tensors = adapter_state_dict(network)
    first = next(k for k in tensors if k.endswith(".hada_w1_a")).removesuffix(".hada_w1_a")
    tensors[f"{first}.hada_t1"] = torch.zeros(2, 2, 1, 1)
    tensors[f"{first}.hada_t2"] = torch.zeros(2, 2, 1, 1)
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="Tucker"):
        load_adapter_into(network, tmp_path / "t.safetensors")
    tensors = adapter_state_dict(network)
    tensors[f"{first}.dora_scale"] = torch.ones(1, 48)
    save_file(tensors, str(tmp_path / "wd.safetensors"))
    with pytest.raises(ValueError, match="weight-decomposed LoHa / LoKr"):
        load_adapter_into(network, tmp_path / "wd.safetensors")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(loraplus_lr_ratio=16.0), "LoRA\\+ raises the lr of LoRA's up matrix"),
        (dict(dropout=0.1), "network dropout"),
        (dict(split_qkv=True), "split_qkv"),
        (dict(init="pissa"), "init"),
    ],
)
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lora_only_options_are_refused_with_the_reason(algo, options, match):
    with pytest.raises(ValueError, match=match):
        NetworkConfig(algo=algo, **options)


def test_peft_export_is_refused():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(algo="lokr", rank=2))
    with pytest.raises(ValueError, match="style 'peft'"):
        adapter_state_dict(network, style="peft")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_rank_dropout_drops_whole_output_rows_in_train_mode_only(algo):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False).requires_grad_(False)
    nn.init.zeros_(base.weight)
    cls = LoHaModule if algo == "loha" else LoKrModule
    adapter = cls("p", base, 2, 2.0, rank_dropout=0.5)
    randomise(adapter)
    adapter.attach()
    x = torch.randn(4, 16)
    with torch.no_grad():
        adapter.eval()
        full = base(x)
        adapter.train()
        dropped = base(x)
    kept = (dropped != 0).all(dim=0)
    assert 0 < int(kept.sum()) < 12  # some rows dropped, for every sample alike
    assert ((dropped == 0).all(dim=0) | kept).all()
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * 2.0)  # 1 / (1 - p)


@pytest.mark.parametrize("variant", [VARIANTS["loha"], VARIANTS["lokr-decomposed-w2"]], ids=["loha", "lokr"])
def test_tiny_run_learns_and_resumes_bit_for_bit(tmp_path, variant):
    network_cfg = NetworkConfig(rank=2, alpha=2.0, rank_dropout=0.1, module_dropout=0.1, **variant)
    cfg = run_config(ema_decay=0.0)
    model, network, data = fresh(network_cfg)
    straight = train_run(model, network, data, cfg, tmp_path / "straight")
    first, last = sum(straight.losses[:5]) / 5, sum(straight.losses[-5:]) / 5
    assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    resumed_network, resumed = interrupted_then_resumed(tmp_path / "split", network_cfg, cfg)
    assert resumed.losses == straight.losses
    assert_same_state(resumed_network.state_dict(), network.state_dict(), exact=True)


def train_run(model, network, data, cfg, run_dir):
    from dit_trainer.training.loop import train

    return train(model, network, data, cfg, run_dir=run_dir)


def test_loha_gradients_equal_autograd_of_the_plain_product():
    """The factor-saving backward of LoHa's dW gives autograd's gradients of (w1_a w1_b) * (w2_a w2_b)."""
    from dit_trainer.training.network.loha import _HadamardWeight

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((12, 3), (3, 20), (12, 3), (3, 20))]
    torch.autograd.gradcheck(_HadamardWeight.apply, factors)
    upstream = torch.randn(12, 20, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((_HadamardWeight.apply(*factors) * upstream).sum(), factors)
    w1_a, w1_b, w2_a, w2_b = factors
    plain = torch.autograd.grad((((w1_a @ w1_b) * (w2_a @ w2_b)) * upstream).sum(), factors)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_posthoc_ema_merges_checkpoint_files_that_load_back(tmp_path, algo):
    """EMAMerge's merge of LoHa / LoKr checkpoints: the factors averaged key by key, alpha kept, loadable."""
    from dit_trainer.training.posthoc_ema import merge_adapter_files

    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(algo=algo, rank=2, alpha=2.0))
    paths = []
    for seed in range(3):
        randomise(network, seed=seed)
        paths.append(save_adapter(network, tmp_path / f"step{seed}.safetensors"))
    tensors, _ = merge_adapter_files(paths, "beta", beta=0.5)
    files = [load_file(str(p)) for p in paths]
    for key, merged in tensors.items():
        if key.endswith(".alpha"):
            assert torch.equal(merged, files[0][key])
        else:
            expected = (files[0][key] * 0.5 + files[1][key] * 0.5) * 0.5 + files[2][key] * 0.5
            torch.testing.assert_close(merged, expected)
    save_file(tensors, str(tmp_path / "merged.safetensors"))
    loaded = LoRANetwork(model, "zimage", config_for_file(model, "zimage", tmp_path / "merged.safetensors"))
    assert sorted(load_adapter_into(loaded, tmp_path / "merged.safetensors").loaded) == sorted(network.names)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_max_norm_caps_the_weight_change(variant):
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, alpha=3.0, **variant))
    randomise(network, std=1.0)
    before = {a.name: a.delta_weight() for a in network.adapters}
    cap = 0.5 * min(float(d.norm()) for d in before.values())  # every adapter is above it
    stats = network.apply_max_norm(cap)
    assert stats.keys_scaled == len(network.adapters)
    for adapter in network.adapters:
        after = adapter.delta_weight()
        assert float(after.norm()) == pytest.approx(cap, rel=1e-5)
        torch.testing.assert_close(after, before[adapter.name] * (cap / float(before[adapter.name].norm())),
                                   rtol=1e-5, atol=1e-7)  # the same direction
