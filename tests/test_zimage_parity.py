"""Our Z-Image DiT, loaded through the loader, against diffusers' `ZImageTransformer2DModel`.

Weights are random at realistic scale (non-zero adaLN, pad tokens and biases, norm
gains around 1) so that no path is silently a no-op. Negative controls prove the
comparison is sensitive: a one-row RoPE shift, swapped q/k and ignored caption
lengths must each break parity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import save_file

from dit_trainer.training.models.loader import load_dit, to_comfy_layout_zimage

CAP_FEAT_DIM = 24
FP32_TOL = 1e-4  # max |error| relative to max |output|
SENSITIVITY = 1e-2  # every negative control must exceed this
# bf16 keeps 8 significant bits (relative rounding ~2e-3) per weight and activation;
# four blocks of residual updates, softmax and norms compound that to ~1.5e-2 of the
# output scale here. 5e-2 leaves headroom yet stays below every negative control (>= 0.09).
BF16_TOL = 5e-2


@dataclass(frozen=True)
class Case:
    in_channels: int
    dim: int
    n_heads: int
    axes_dims: tuple[int, int, int]
    latent_hw: tuple[int, int]
    caption_lens: tuple[int, int]


CASES = {
    # 3x5 = 15 patches (image pad tokens), captions 40 and 5: pad to 64 and 32, so the
    # short one is masked in the context refiner and the joint sequence.
    "odd-grid-ragged-captions": Case(4, 64, 4, (4, 6, 6), (6, 10), (40, 5)),
    # 4x4 patches, equal captions (no mask), 16 channels, non-default RoPE split.
    "even-grid-equal-captions": Case(16, 96, 6, (8, 4, 4), (8, 8), (7, 7)),
    # 8x8 = 64 patches and captions of 32 and 64 tokens: no pad tokens at all, mask only.
    "no-padding-masked": Case(4, 64, 4, (4, 6, 6), (16, 16), (32, 64)),
}


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial: fan-in-scaled matrices, gains near 1, non-zero biases and pad tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "pad_token" in name:
                param.copy_(0.5 * noise)
            elif param.ndim == 1 and ("norm" in name or name == "cap_embedder.0.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise * min(0.2, max(0.02, param.shape[1] ** -0.5)))


def reference_model(case: Case) -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(
        in_channels=case.in_channels,
        dim=case.dim,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=case.n_heads,
        n_kv_heads=case.n_heads,
        cap_feat_dim=CAP_FEAT_DIM,
        axes_dims=list(case.axes_dims),
    )
    randomise_(model, seed=case.dim + case.in_channels)
    return model.eval()


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    h, w = case.latent_hw
    x = torch.randn(2, case.in_channels, h, w, generator=gen)
    sigma = torch.tensor([0.3, 0.85])
    lens = torch.tensor(case.caption_lens)
    context = torch.randn(2, max(case.caption_lens), CAP_FEAT_DIM, generator=gen)
    context[torch.arange(context.shape[1])[None, :] >= lens[:, None]] = 0.0  # the engine's contract
    return x, sigma, context, lens


def run_reference(model: ZImageTransformer2DModel, x, sigma, context, lens) -> torch.Tensor:
    """diffusers' convention -> ours: t = 1 - sigma, frame axis, per-sample captions, output negated."""
    with torch.no_grad():
        out = model(
            [sample.unsqueeze(1) for sample in x],
            1.0 - sigma,
            [caption[:n] for caption, n in zip(context, lens.tolist())],
            return_dict=False,
        )[0]
    return -torch.stack(out).squeeze(2)


@cache
def setup(name: str) -> tuple[ZImageTransformer2DModel, tuple[torch.Tensor, ...], torch.Tensor]:
    case = CASES[name]
    reference = reference_model(case)
    inputs = make_inputs(case)
    expected = run_reference(reference, *inputs)
    # The relative metric below is only meaningful for an O(1) output.
    assert 0.1 < expected.abs().max() < 100, f"degenerate reference output scale {expected.abs().max()}"
    return reference, inputs, expected


def hints(name: str) -> dict[str, str]:
    """axes_dims cannot be read from shapes; real checkpoints carry it (or use the default)."""
    return {"axes_dims": json.dumps(list(CASES[name].axes_dims))}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def run_ours(model: torch.nn.Module, x, sigma, context, lens) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(x.to(dtype), sigma, context.to(dtype), lens).float()


def write_comfy_file(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """A ComfyUI-style single file: fused layout under `model.diffusion_model.`."""
    fused = to_comfy_layout_zimage(state_dict)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in fused.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", CASES)
def test_diffusers_state_dict_matches_reference(name: str) -> None:
    reference, inputs, expected = setup(name)
    model = load_dit(reference.state_dict(), metadata=hints(name))
    assert relative_error(run_ours(model, *inputs), expected) < FP32_TOL


@pytest.mark.parametrize("name", CASES)
def test_comfy_file_matches_reference(name: str, tmp_path: Path) -> None:
    reference, inputs, expected = setup(name)
    path = write_comfy_file(reference.state_dict(), tmp_path / "zimage.safetensors", hints(name))
    model = load_dit(path)
    assert relative_error(run_ours(model, *inputs), expected) < FP32_TOL


@pytest.mark.parametrize("name", CASES)
def test_bf16_model_close_to_fp32_reference(name: str) -> None:
    reference, inputs, expected = setup(name)
    model = load_dit(reference.state_dict(), dtype=torch.bfloat16, metadata=hints(name))
    assert relative_error(run_ours(model, *inputs), expected) < BF16_TOL


# --- negative controls: each must break parity -------------------------------

CONTROL = "odd-grid-ragged-captions"


def test_shifted_rope_rows_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, inputs, _ = setup(CONTROL)
    ours = run_ours(load_dit(reference.state_dict(), metadata=hints(CONTROL)), *inputs)
    original = reference.patchify_and_embed

    def shifted(*args, **kwargs):
        out = list(original(*args, **kwargs))
        one_row = torch.tensor([0, 1, 0], dtype=torch.int32)
        # Image patches only; pad tokens sit at (0, 0, 0) and stay there.
        out[3] = [ids + one_row * (ids[:, :1] > 0) for ids in out[3]]
        return tuple(out)

    monkeypatch.setattr(reference, "patchify_and_embed", shifted)
    assert relative_error(ours, run_reference(reference, *inputs)) > SENSITIVITY


def test_swapped_q_k_is_detected() -> None:
    reference, inputs, expected = setup(CONTROL)
    state_dict = to_comfy_layout_zimage(reference.state_dict())
    key = "layers.0.attention.qkv.weight"
    q, k, v = state_dict[key].chunk(3, dim=0)
    state_dict[key] = torch.cat([k, q, v], dim=0)
    model = load_dit(state_dict, metadata=hints(CONTROL))
    assert relative_error(run_ours(model, *inputs), expected) > SENSITIVITY


def test_ignored_caption_lengths_are_detected() -> None:
    reference, (x, sigma, context, _), expected = setup(CONTROL)
    model = load_dit(reference.state_dict(), metadata=hints(CONTROL))
    assert relative_error(run_ours(model, x, sigma, context, None), expected) > SENSITIVITY
