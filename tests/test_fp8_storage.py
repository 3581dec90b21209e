"""fp8 base storage: quantisation error bounds, the fp8 Linear, DoRA on fp8, and training on an fp8 base."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_trainer.training.config import TrainConfig
from dit_trainer.training.loop import train
from dit_trainer.training.models.blocks import block_linear_names
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.models.quantization import (
    FP8_DTYPE,
    FP8_RELATIVE_ERROR,
    FP8_SUBNORMAL_ERROR,
    Float8Linear,
    dequantize,
    quantize_fp8,
    quantized_bytes,
)
from dit_trainer.training.network.lora import DORA_EPS, LoRAModule
from dit_trainer.training.network.network import NetworkConfig, seeded_network

from tiny_models import ARCHITECTURES, tiny_data, tiny_inputs, tiny_model


def row_scaled_matrix(rows: int = 48, cols: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span 10^-4 .. 10^2, one zero row, and one outlier: where per-row scales matter."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 2, rows)[:, None]
    weight[3] = 0.0
    weight[7, 5] = 900.0
    return weight


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_every_value_is_within_the_e4m3fn_rounding_bound(per_row: bool) -> None:
    weight = row_scaled_matrix()
    data, scale = quantize_fp8(weight, per_row)
    assert data.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == ((weight.shape[0], 1) if per_row else ())
    restored = dequantize(data, scale, torch.float32)
    # Round to nearest: 2^-4 relative for normal values, half a subnormal step (in scale units) below.
    bound = torch.maximum(FP8_RELATIVE_ERROR * weight.abs(), FP8_SUBNORMAL_ERROR * scale.expand_as(weight))
    error = (restored - weight).abs()
    assert bool((error <= bound * (1 + 1e-6)).all()), float((error - bound).max())
    assert torch.equal(restored[3], torch.zeros_like(restored[3]))  # a zero row stays exactly zero
    assert float(restored.abs().max()) == pytest.approx(900.0, rel=FP8_RELATIVE_ERROR)  # the outlier: no clipping


def test_per_row_scales_keep_small_rows_that_one_scale_flushes() -> None:
    weight = row_scaled_matrix()
    tensor_error = (dequantize(*quantize_fp8(weight, False), torch.float32) - weight).norm(dim=1) / weight.norm(dim=1)
    row_error = (dequantize(*quantize_fp8(weight, True), torch.float32) - weight).norm(dim=1) / weight.norm(dim=1)
    small = weight.abs().amax(dim=1) < 1e-2  # far below the outlier row: per-tensor scale sends them to subnormals
    small[3] = False  # the zero row has no relative error
    assert float(tensor_error[small].min()) > 0.1
    assert float(row_error[small].max()) < FP8_RELATIVE_ERROR


def float8_pair(per_row: bool, bias: bool = True) -> tuple[Float8Linear, nn.Linear]:
    """An fp8 Linear and the fp32 Linear holding exactly its dequantised weight."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(24, 16, generator=gen) * torch.linspace(0.01, 1.0, 24)[:, None]
    data, scale = quantize_fp8(weight, per_row)
    fp8 = Float8Linear(16, 24, bias=bias, dtype=torch.float32)
    reference = nn.Linear(16, 24, bias=bias)
    with torch.no_grad():
        fp8.weight.copy_(data)
        fp8.weight_scale = scale
        reference.weight.copy_(dequantize(data, scale, torch.float32))
        if bias:
            fp8.bias.copy_(torch.randn(24, generator=gen))
            reference.bias.copy_(fp8.bias)
    return fp8.requires_grad_(False), reference.requires_grad_(False)


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_float8_linear_equals_the_dequantised_linear_and_saves_only_fp8(per_row: bool) -> None:
    fp8, reference = float8_pair(per_row)
    x = torch.randn(3, 5, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp8(x)
    (grad_fp8,) = torch.autograd.grad(out.square().sum(), x)
    expected = reference(x)
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(out, expected)
    torch.testing.assert_close(grad_fp8, grad_ref, rtol=1e-6, atol=1e-6)
    # What the backward keeps is the fp8 data and its scale, never a dequantised copy of the weight.
    assert {t.dtype for t in saved if t.numel() >= fp8.weight.numel()} == {FP8_DTYPE}


def test_float8_linear_computes_in_the_autocast_dtype() -> None:
    fp8, reference = float8_pair(per_row=True)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
        expected = F.linear(x.bfloat16(), dequantize(fp8.weight, fp8.weight_scale, torch.bfloat16), fp8.bias.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_dora_on_an_fp8_base_equals_dora_on_the_dequantised_base(axis: str, per_row: bool) -> None:
    fp8, reference = float8_pair(per_row, bias=False)
    adapters = []
    for base in (fp8, reference):
        torch.manual_seed(5)
        adapter = LoRAModule("layer", base, rank=4, alpha=4, algo="dora", dora_axis=axis)
        with torch.no_grad():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=torch.Generator().manual_seed(6)))
        adapter.attach()
        adapters.append(adapter)
    on_fp8, on_reference = adapters
    # The magnitude starts at the norm of the DEQUANTISED weight (an exact identity at init).
    dim = 0 if axis == "input" else 1
    torch.testing.assert_close(on_fp8.magnitude, reference.weight.norm(dim=dim) + DORA_EPS, rtol=1e-6, atol=0)
    torch.testing.assert_close(on_fp8.magnitude, on_reference.magnitude, rtol=1e-6, atol=0)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    outs, grads = [], []
    for adapter, base in zip(adapters, (fp8, reference)):
        out = base(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [adapter.lora_A, adapter.lora_B, adapter.magnitude]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on_fp8.adapted_weight(), on_reference.adapted_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_scaled"])
def test_loading_quantises_every_block_linear_and_nothing_else(architecture: str, fmt: str) -> None:
    model = tiny_model(architecture)
    source = model.state_dict()
    loaded = load_dit(source, dtype=torch.bfloat16, quantize=fmt)
    modules = dict(loaded.named_modules())
    expected = set(block_linear_names(loaded))
    assert {name for name, module in modules.items() if isinstance(module, Float8Linear)} == expected
    for name in expected:
        layer = modules[name]
        assert layer.weight.dtype == FP8_DTYPE
        assert layer.weight_scale.shape == (() if fmt == "fp8_e4m3fn" else (layer.out_features, 1))
        original = source[f"{name}.weight"]
        bound = FP8_RELATIVE_ERROR * original.abs() + FP8_SUBNORMAL_ERROR * layer.weight_scale
        assert bool(((dequantize(layer.weight, layer.weight_scale, torch.float32) - original).abs() <= bound).all())
    floats = [t for n, t in loaded.state_dict().items() if n.rsplit(".", 1)[0] not in expected]
    assert {t.dtype for t in floats if t.is_floating_point()} == {torch.bfloat16}
    assert loaded.base_hash == load_dit(source).base_hash  # the same weights, whatever the storage
    # One byte per weight plus a float32 scale per tensor or per row: a quarter of fp32, half of bf16.
    scales = sum(1 if fmt == "fp8_e4m3fn" else modules[n].out_features for n in expected)
    assert quantized_bytes(loaded) == sum(source[f"{n}.weight"].numel() for n in expected) + 4 * scales


def train_tiny(storage: str | None, steps: int = 30) -> list[float]:
    model = tiny_model("zimage")
    data = tiny_data(model)
    base = load_dit(model.state_dict(), dtype=torch.bfloat16, quantize=storage)
    network = seeded_network(base, "zimage", NetworkConfig(rank=4, alpha=4), seed=3).attach()
    cfg = TrainConfig(steps=steps, batch_size=2, lr=3e-3, seed=11, mixed_precision="bf16", max_grad_norm=1.0)
    return train(base, network, data, cfg).losses


# Stated tolerance: fp8 storage changes each weight by <= 2^-4 relative, which moves this tiny
# model's losses by a few percent at most; the trajectory must not drift further as it trains.
FP8_TRAINING_TOLERANCE = 0.05


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "fp8_scaled"])
def test_training_on_an_fp8_base_ends_within_tolerance_of_bf16(storage: str) -> None:
    bf16 = torch.tensor(train_tiny(None))
    fp8 = torch.tensor(train_tiny(storage))
    assert bool(torch.isfinite(fp8).all())
    relative = (fp8 - bf16).abs() / bf16.abs()
    assert float(relative.max()) <= FP8_TRAINING_TOLERANCE, relative.tolist()
    assert float(fp8[-5:].mean()) < float(fp8[:5].mean())  # it trains


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_quantising_by_row_chunks_equals_one_pass_and_leaves_the_input_alone(monkeypatch, per_row: bool) -> None:
    from dit_trainer.training.models import quantization

    weight = row_scaled_matrix()
    original = weight.clone()
    whole = quantize_fp8(weight, per_row)
    monkeypatch.setattr(quantization, "QUANTIZE_CHUNK_ELEMENTS", 3 * weight.shape[1])  # 16 chunks of 3 rows
    chunked = quantize_fp8(weight, per_row)
    assert torch.equal(chunked[0].view(torch.uint8), whole[0].view(torch.uint8))
    assert torch.equal(chunked[1], whole[1])
    assert torch.equal(weight, original)  # an fp32 input is never divided in place
