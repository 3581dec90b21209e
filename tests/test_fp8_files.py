"""Pre-quantised checkpoints (ComfyUI fp8 e4m3fn, scaled_fp8, comfy_quant) load as float8 and match
the dequantised reference; other quantised formats are refused with an error naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit_trainer.training.models.blocks import block_linear_names
from dit_trainer.training.models.loader import COMFY_PREFIX, load_dit
from dit_trainer.training.models.quantization import FP8_DTYPE, Float8Linear, dequantize, quantize_fp8

from tiny_models import ARCHITECTURES, tiny_inputs, tiny_model

FORMATS = ("fp8_e4m3fn", "scaled_fp8", "comfy_quant")


def comfy_quant_tag(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def quantised_file(model: torch.nn.Module, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    """Write `model` as ComfyUI writes `fmt` (block Linear weights in float8); returns the dequantised state dict."""
    tensors = dict(model.state_dict())
    reference = dict(tensors)
    for layer in block_linear_names(model):
        key = f"{layer}.weight"
        if fmt == "fp8_e4m3fn":  # a plain cast, no scale
            data, scale = tensors[key].to(FP8_DTYPE), None
        else:
            data, scale = quantize_fp8(tensors[key], per_row=False)
        tensors[key] = data
        reference[key] = dequantize(data, scale, torch.float32)
        if fmt == "scaled_fp8":
            tensors[f"{layer}.scale_weight"] = scale
            tensors[f"{layer}.scale_input"] = torch.ones(())
        elif fmt == "comfy_quant":
            tensors[f"{layer}.weight_scale"] = scale
            tensors[f"{layer}.input_scale"] = torch.ones(())
            tensors[f"{layer}.comfy_quant"] = comfy_quant_tag("float8_e4m3fn")
    if fmt == "scaled_fp8":
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8_DTYPE)  # the marker: its dtype names the fp8 type
    save_file({COMFY_PREFIX + key: value.contiguous() for key, value in tensors.items()}, str(path))
    return reference


def forward(model: torch.nn.Module, reference_model: torch.nn.Module) -> torch.Tensor:
    x, sigma, inputs = tiny_inputs(reference_model)
    with torch.no_grad():
        return model(x, sigma, **inputs)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_comfyui_fp8_file_loads_as_float8_and_matches_the_dequantised_reference(
        tmp_path: Path, architecture: str, fmt: str) -> None:
    path = tmp_path / f"{architecture}_{fmt}.safetensors"
    reference = load_dit(quantised_file(tiny_model(architecture), fmt, path))
    loaded = load_dit(path)  # fp32 compute, no quantise option: the file's float8 weights stay float8
    float8 = {name: module for name, module in loaded.named_modules() if isinstance(module, Float8Linear)}
    assert set(float8) == set(block_linear_names(loaded))
    assert all(module.weight.dtype == FP8_DTYPE for module in float8.values())
    assert torch.equal(forward(loaded, reference), forward(reference, reference))
    # Asking for fp8 storage of an fp8 file keeps the stored values; nothing is quantised twice.
    again = load_dit(path, quantize="fp8_scaled")
    for name, module in float8.items():
        twin = again.get_submodule(name)
        assert torch.equal(twin.weight.view(torch.uint8), module.weight.view(torch.uint8))
        assert torch.equal(twin.weight_scale, module.weight_scale)
    assert fmt.replace("_", " ").split()[0] in " ".join(loaded.stored_quantization).replace("_", " ")


def test_a_scaled_fp8_file_never_fails_with_a_missing_keys_message(tmp_path: Path) -> None:
    path = tmp_path / "scaled.safetensors"
    quantised_file(tiny_model("flux"), "scaled_fp8", path)
    assert load_dit(path).stored_quantization == ["ComfyUI scaled_fp8"]


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({COMFY_PREFIX + key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("change,named", [
    (lambda t, layer: t.update({f"{layer}.comfy_quant": comfy_quant_tag("nvfp4")}), "comfy_quant format 'nvfp4'"),
    (lambda t, layer: t.update({f"{layer}.weight": t[f"{layer}.weight"].to(torch.int8),
                                f"{layer}.weight_scale": torch.ones(())}), "torch.int8"),
    (lambda t, layer: t.update({f"{layer}.weight.absmax": torch.ones(4)}), "bitsandbytes nf4"),
    (lambda t, layer: t.update({f"{layer}.weight": t[f"{layer}.weight"].to(FP8_DTYPE),
                                f"{layer}.weight_scale": torch.ones(2, 2)}), "block-scaled fp8"),
    (lambda t, layer: t.update({f"{layer}.scale_weight": torch.ones(())}), "no float8 weight beside them"),
])
def test_other_quantised_formats_are_named_with_what_to_convert_to(tmp_path: Path, change, named: str) -> None:
    model = tiny_model("zimage")
    tensors = dict(model.state_dict())
    change(tensors, block_linear_names(model)[0])
    with pytest.raises(ValueError, match="convert it to bf16") as error:
        load_dit(write(tmp_path / "q.safetensors", tensors))
    assert named in str(error.value)


def test_gguf_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev-Q4_K_S.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF"):
        load_dit(path)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_scaled"])
def test_an_fp8_model_saved_by_save_dit_loads_back_bit_for_bit(tmp_path: Path, fmt: str) -> None:
    from dit_trainer.training.models.loader import save_dit

    model = load_dit(tiny_model("qwen_image").state_dict(), quantize=fmt)
    save_dit(model, tmp_path / "fp8.safetensors")
    again = load_dit(tmp_path / "fp8.safetensors")
    assert again.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert again.state_dict()[key].dtype == tensor.dtype
        assert torch.equal(again.state_dict()[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
