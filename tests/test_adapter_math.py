"""LoRA / DoRA math: identity at init, multiplier 0, stock-ComfyUI equivalence of exported files."""

import pytest
import torch
import torch.nn as nn

from comfy_merge import comfy_key_map, comfy_merge, comfy_patched_weights
from safetensors.torch import load_file
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from dit_trainer.training.network.comfy_format import PREFIX, adapter_state_dict, load_adapter, save_adapter
from dit_trainer.training.network.lora import LoRAModule
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig

VARIANTS = [
    dict(algo="lora"),
    dict(algo="lora", use_rslora=True, alpha=4.0),
    dict(algo="dora", dora_axis="input"),
    dict(algo="dora", dora_axis="output"),
]


ZIMAGE_LAYOUT = dict(n_layers=2, dim=48, n_refiner_layers=1)  # tiny_model's, for ComfyUI's key map


@pytest.fixture
def one_cpu_thread():
    """PiSSA's init runs an SVD; MKL's threaded SVD spin-waits when the 2 CPU cores are shared
    (0.8 s for a 144 x 48 matrix under load, 1 ms on one thread). Same result either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> ZImageDiT:
    torch.manual_seed(seed)
    cfg = ZImageConfig(in_channels=4, dim=48, n_layers=2, n_refiner_layers=1, n_heads=3, ffn_dim=128, cap_feat_dim=12, axes_dims=[4, 6, 6])
    model = ZImageDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.normal_(1.0, 0.1)
    return model.requires_grad_(False).eval()


def model_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 6, 8, generator=g), torch.tensor([0.2, 0.7]), torch.randn(2, 5, 12, generator=g)


def randomise_adapters(network: LoRANetwork, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters:
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.3)
            if adapter.magnitude is not None:
                adapter.magnitude.mul_(1 + 0.2 * torch.randn(adapter.magnitude.shape, generator=g))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_fresh_adapter_is_exact_identity(variant):
    model = tiny_model()
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        base_out = model(x, sigma, ctx)
        LoRANetwork(model, "zimage", NetworkConfig(rank=4, **{"alpha": 1.0, **variant})).attach()
        adapted_out = model(x, sigma, ctx)
    assert torch.equal(base_out, adapted_out)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_multiplier_zero_and_disabled_are_exact_noops(variant):
    model = tiny_model()
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        base_out = model(x, sigma, ctx)
        network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, **{"alpha": 1.0, **variant})).attach()
        randomise_adapters(network)
        assert not torch.equal(model(x, sigma, ctx), base_out)  # the adapter does something
        network.set_multiplier(0.0)
        assert torch.equal(model(x, sigma, ctx), base_out)
        network.set_multiplier(1.0)
        network.set_enabled(False)
        assert torch.equal(model(x, sigma, ctx), base_out)


STYLE_CASES = [
    *[(variant, style) for variant in VARIANTS for style in ("comfy", "kohya")],
    # PEFT files: ComfyUI maps transformer.<diffusers name> (q/k/v slices of the fused qkv)
    # but ignores PEFT's lora_magnitude_vector, so only LoRA files apply there.
    *[(variant, "peft") for variant in VARIANTS[:2]],
    *[(dict(algo="lora", split_qkv=True), style) for style in ("comfy", "kohya", "peft")],
    *[(dict(algo="lora", init="pissa"), style) for style in ("comfy", "kohya", "peft")],
]


def case_id(case) -> str:
    variant, style = case
    return "-".join(str(x) for x in variant.values()) + "-" + style


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("case", STYLE_CASES, ids=case_id)
def test_exported_file_reproduces_engine_in_comfyui_merge(tmp_path, case, strength, one_cpu_thread):
    """Every adapted layer: stock ComfyUI's loading + merge of our file (against the ORIGINAL
    checkpoint weights) == the engine's layer output (fp32, 1e-5 relative), in every key style."""
    variant, style = case
    model = tiny_model()
    checkpoint = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, **{"alpha": 2.0, **variant})).attach()
    randomise_adapters(network)
    network.set_multiplier(strength)
    tensors = load_file(str(save_adapter(network, tmp_path / "adapter.safetensors", style=style)))
    key_map = comfy_key_map(checkpoint, zimage=ZIMAGE_LAYOUT)
    patched, not_loaded = comfy_patched_weights(checkpoint, tensors, key_map, strength)
    assert not not_loaded, f"ComfyUI would log 'lora key not loaded' for {not_loaded}"
    g = torch.Generator().manual_seed(5)
    for adapter in network.adapters:
        base = adapter.base
        x = torch.randn(3, 7, base.in_features, generator=g)
        with torch.no_grad():
            engine_out = base(x)  # hooked forward: base + adapter
            comfy_out = nn.functional.linear(x, patched[f"{PREFIX}{adapter.name}.weight"], base.bias)
        rel = (engine_out - comfy_out).abs().max() / engine_out.abs().max()
        assert rel < 1e-5, f"{adapter.name}: relative error {rel:.2e}"


def test_comfy_merge_is_sensitive_to_a_wrong_dora_fold(tmp_path):
    """Negative control: the output axis exported without the fold does not match in ComfyUI."""
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, algo="dora", dora_axis="output")).attach()
    randomise_adapters(network)
    tensors = adapter_state_dict(network)
    adapter = network.adapters[0]
    tensors[f"{PREFIX}{adapter.name}.dora_scale"] = adapter.magnitude.detach()[:, None]
    x = torch.randn(4, adapter.base.in_features)
    with torch.no_grad():
        merged = comfy_merge(adapter.base.weight, tensors, PREFIX + adapter.name, 1.0)
        err = (adapter.base(x) - x @ merged.t()).abs().max() / adapter.base(x).abs().max()
    assert err > 1e-3


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_save_load_round_trip(tmp_path, variant):
    model = tiny_model()
    cfg = NetworkConfig(rank=4, **{"alpha": 2.0, **variant})
    network = LoRANetwork(model, "zimage", cfg).attach()
    randomise_adapters(network)
    x, sigma, ctx = model_inputs()
    with torch.no_grad():
        expected = model(x, sigma, ctx)
    path = save_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    fresh = LoRANetwork(model, "zimage", cfg).attach()
    load_adapter(fresh, path)
    with torch.no_grad():
        got = model(x, sigma, ctx)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_rslora_mismatch_is_a_hard_error(tmp_path):
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, use_rslora=True)).attach()
    path = save_adapter(network, tmp_path / "a.safetensors")
    network.detach_from_model()
    plain = LoRANetwork(model, "zimage", NetworkConfig(rank=4))
    with pytest.raises(ValueError, match="use_rslora"):
        load_adapter(plain, path)


def test_training_step_moves_only_adapter_parameters():
    model = tiny_model()
    network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, algo="dora")).attach().train()
    base_params = {n: p.clone() for n, p in model.named_parameters()}
    x, sigma, ctx = model_inputs()
    loss = model(x, sigma, ctx).square().mean()
    loss.backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())
    torch.optim.SGD(network.parameters(), lr=0.1).step()
    for n, p in model.named_parameters():
        assert torch.equal(p, base_params[n])


def test_rank_larger_than_layer_is_rejected():
    with pytest.raises(ValueError, match="rank 9 must be between 1 and min"):
        LoRAModule("x", nn.Linear(8, 16), rank=9, alpha=1)
