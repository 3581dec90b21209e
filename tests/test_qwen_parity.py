"""Our Qwen-Image / Qwen-Image-Edit DiT against diffusers' `QwenImageTransformer2DModel`.

ComfyUI's module names are diffusers' names for this model, so our state dict (random
weights at realistic scale) loads into diffusers' model strictly, with no mapping.
Token packing, per-image shapes (`img_shapes`, one entry per image: target first, then
each reference) and the timestep (sigma, as the pipelines' timestep / 1000) follow
diffusers' QwenImagePipeline / QwenImageEditPipeline(Plus); diffusers computes its own
RoPE, so positions are checked against Qwen's reference code, not against ours. Our
model runs a padded batch of two prompts of different lengths; diffusers runs each
sample alone, unpadded. Negative controls prove the comparison is sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from test_flux_parity import BF16_TOL, assert_detected, assert_matches, pad_to_patch, randomise_, relative_error

from dit_trainer.training.models import qwen_image
from dit_trainer.training.models.qwen_image import QwenImageConfig, QwenImageDiT

QK_GAIN = 2.0  # see sharpen_attention_

CONFIGS = {
    "qwen-image": QwenImageConfig(
        in_channels=16, patch_size=2, num_layers=2, num_heads=2, head_dim=32, joint_attention_dim=24,
        axes_dim=[8, 12, 12],
    ),
    "qwen-image-3-heads": QwenImageConfig(
        in_channels=16, patch_size=2, num_layers=2, num_heads=3, head_dim=24, joint_attention_dim=40,
        axes_dim=[4, 10, 10],
    ),
    "qwen-image-edit-2511": QwenImageConfig(
        in_channels=16, patch_size=2, num_layers=2, num_heads=2, head_dim=32, joint_attention_dim=24,
        axes_dim=[8, 12, 12], zero_cond_t=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    config: str
    latent_hw: tuple[int, int]
    text_lens: tuple[int, int]
    reference_hws: tuple[tuple[int, int], ...] = ()


CASES = {
    # 6x10 latents = 3x5 tokens (odd grid: centring differs from an even one); prompts of
    # 7 and 3 tokens, the short one padded and masked.
    "odd-grid-ragged-text": Case("qwen-image", (6, 10), (7, 3)),
    # 7x9 latents: padded circularly to 8x10 (4x5 tokens), the output cropped back.
    "odd-latent": Case("qwen-image-3-heads", (7, 9), (5, 5)),
    "even-grid": Case("qwen-image-3-heads", (8, 8), (6, 2)),
    # Edit: one reference of another size than the target, at frame 1.
    "edit-one-ref": Case("qwen-image", (6, 10), (7, 3), reference_hws=((8, 6),)),
    # Edit-2509: two references at frames 1 and 2; the first is larger than the target, so it
    # sets where the text positions start; the second has odd latent sizes (padded to 3x4 tokens).
    "edit-two-refs": Case("qwen-image", (4, 4), (4, 6), reference_hws=((10, 6), (5, 7))),
    # Edit-2511: the references' adaLN reads t = 0.
    "edit-2511-two-refs": Case("qwen-image-edit-2511", (6, 10), (5, 8), reference_hws=((6, 10), (4, 6))),
    # zero_cond_t without references is the plain model.
    "edit-2511-text-only": Case("qwen-image-edit-2511", (6, 6), (3, 5)),
}


@dataclass
class Inputs:
    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    context_lens: torch.Tensor
    reference_latents: list[torch.Tensor]


# --- models ------------------------------------------------------------------------


def diffusers_model(cfg: QwenImageConfig) -> QwenImageTransformer2DModel:
    assert cfg.theta == 10000, "diffusers' QwenEmbedRope has theta 10000 built in"
    return QwenImageTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.patch_features,  # diffusers takes packed 2x2 patches
        out_channels=cfg.in_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=tuple(cfg.axes_dim),
        zero_cond_t=cfg.zero_cond_t,
    )


def sharpen_attention_(model: QwenImageDiT) -> None:
    """Scale the q/k RMSNorm gains to about 2, so attention logits spread like a trained DiT's.

    With gains near 1, RMS-normed random q and k give logits of std ~1: nearly uniform
    attention, in which an off-by-one RoPE position moves the output by under 1e-2 and the
    position controls below could not tell right from wrong. Gains near 2 give std ~4.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn.norm_" in name:
                param.mul_(QK_GAIN)


@cache
def models(config: str) -> tuple[QwenImageDiT, QwenImageTransformer2DModel]:
    cfg = CONFIGS[config]
    ours = QwenImageDiT(cfg)
    randomise_(ours, seed=cfg.hidden_size + len(config))
    sharpen_attention_(ours)
    reference = diffusers_model(cfg)
    # Same names, same shapes: ComfyUI's layout is diffusers' layout for Qwen-Image.
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), reference.eval()


# --- inputs and the reference run ----------------------------------------------------


def make_inputs(case: Case) -> Inputs:
    cfg = CONFIGS[case.config]
    gen = torch.Generator().manual_seed(7)
    lens = torch.tensor(case.text_lens)
    context = torch.randn(2, max(case.text_lens), cfg.joint_attention_dim, generator=gen)
    context[torch.arange(context.shape[1])[None, :] >= lens[:, None]] = 0.0  # the engine's contract
    return Inputs(
        x=torch.randn(2, cfg.in_channels, *case.latent_hw, generator=gen),
        sigma=torch.tensor([0.3, 0.85]),
        context=context,
        context_lens=lens,
        reference_latents=[torch.randn(2, cfg.in_channels, h, w, generator=gen) for h, w in case.reference_hws],
    )


def run_reference(
    reference: QwenImageTransformer2DModel,
    inputs: Inputs,
    *,
    sample_x: list[torch.Tensor] | None = None,
    sample_context: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """diffusers, one sample at a time with its unpadded prompt -> (B, C, H, W).

    sample_x / sample_context: per-sample (1, C, H, W) latents and (1, L_i, D) prompts to
    use instead of slices of `inputs` (gradient tests pass leaf tensors).
    """
    outputs = []
    for i in range(inputs.x.shape[0]):
        x = inputs.x[i : i + 1] if sample_x is None else sample_x[i]
        n_txt = int(inputs.context_lens[i])
        context = inputs.context[i : i + 1, :n_txt] if sample_context is None else sample_context[i]
        # Target first, then each reference (QwenImageEditPlusPipeline), each padded as ComfyUI pads.
        latents = [pad_to_patch(x, 2)] + [pad_to_patch(ref[i : i + 1], 2) for ref in inputs.reference_latents]
        tokens = [QwenImagePipeline._pack_latents(lat, *lat.shape[:2], *lat.shape[2:]) for lat in latents]
        out = reference(
            hidden_states=torch.cat(tokens, dim=1),
            encoder_hidden_states=context,
            timestep=inputs.sigma[i : i + 1],  # the pipelines pass timestep / 1000 = sigma
            img_shapes=[[(1, lat.shape[2] // 2, lat.shape[3] // 2) for lat in latents]],
            return_dict=False,
        )[0][:, : tokens[0].shape[1]]
        unpacked = QwenImagePipeline._unpack_latents(out, *latents[0].shape[2:], vae_scale_factor=1)  # (1, C, 1, H, W)
        outputs.append(unpacked[:, :, 0, : x.shape[2], : x.shape[3]])
    return torch.cat(outputs)


def run_ours(model: QwenImageDiT, inputs: Inputs, **overrides) -> torch.Tensor:
    kwargs = dict(context_lens=inputs.context_lens, reference_latents=inputs.reference_latents or None)
    kwargs.update(overrides)
    with torch.no_grad():
        return model(inputs.x, inputs.sigma, inputs.context, **kwargs)


@cache
def setup(name: str) -> tuple[QwenImageDiT, QwenImageTransformer2DModel, Inputs, torch.Tensor]:
    case = CASES[name]
    ours, reference = models(case.config)
    inputs = make_inputs(case)
    with torch.no_grad():
        expected = run_reference(reference, inputs)
    # The relative metric below is only meaningful for an O(1) output.
    assert 0.1 < expected.abs().max() < 100, f"degenerate reference output scale {expected.abs().max()}"
    return ours, reference, inputs, expected


# --- parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_padded_batch_matches_diffusers_per_sample(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    out = run_ours(ours, inputs)
    assert out.shape == inputs.x.shape
    assert_matches(name, out, expected)


@pytest.mark.parametrize("name", ["odd-grid-ragged-text", "edit-2511-two-refs"])
def test_input_gradients_match_diffusers(name: str) -> None:
    ours, reference, inputs, _ = setup(name)
    projection = torch.randn(inputs.x.shape, generator=torch.Generator().manual_seed(3))

    x = inputs.x.clone().requires_grad_()
    context = inputs.context.clone().requires_grad_()
    out = ours(x, inputs.sigma, context, inputs.context_lens, reference_latents=inputs.reference_latents or None)
    (out * projection).sum().backward()

    sample_x = [inputs.x[i : i + 1].clone().requires_grad_() for i in range(2)]
    lens = inputs.context_lens.tolist()
    sample_context = [inputs.context[i : i + 1, :n].clone().requires_grad_() for i, n in enumerate(lens)]
    expected = run_reference(reference, inputs, sample_x=sample_x, sample_context=sample_context)
    (expected * projection).sum().backward()

    assert_matches(f"{name} d/dx", x.grad, torch.cat([leaf.grad for leaf in sample_x]))
    for i, leaf in enumerate(sample_context):
        n = leaf.shape[1]
        assert_matches(f"{name} d/dcontext[{i}]", context.grad[i : i + 1, :n], leaf.grad)
        # Padding tokens are masked keys and their own outputs are dropped: no gradient.
        assert torch.all(context.grad[i, n:] == 0)


def test_bf16_model_close_to_fp32_reference() -> None:
    ours, _, inputs, expected = setup("edit-2511-two-refs")
    model = QwenImageDiT(ours.cfg).to(torch.bfloat16).eval()
    model.load_state_dict(ours.state_dict())
    bf16 = replace(
        inputs,
        x=inputs.x.bfloat16(),
        context=inputs.context.bfloat16(),
        reference_latents=[ref.bfloat16() for ref in inputs.reference_latents],
    )  # sigma stays fp32, as the engine passes it
    out = run_ours(model, bf16)
    assert out.dtype == torch.bfloat16
    error = relative_error(out.float(), expected)
    print(f"edit-2511-two-refs bf16: max relative error {error:.2e}")
    assert error <= BF16_TOL


def test_gradient_checkpointing_changes_nothing() -> None:
    ours, _, inputs, _ = setup("edit-2511-two-refs")
    results = []
    for enabled in (False, True):
        ours.gradient_checkpointing = enabled
        x = inputs.x.clone().requires_grad_()
        out = ours(x, inputs.sigma, inputs.context, inputs.context_lens, reference_latents=inputs.reference_latents)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    ours.gradient_checkpointing = False
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_attention_backend_reaches_every_block() -> None:
    ours, _ = models("qwen-image")
    ours.set_attention_backend("sdpa")
    try:
        assert [block.attn.backend for block in ours.transformer_blocks] == ["sdpa"] * ours.cfg.num_layers
    finally:
        ours.set_attention_backend("auto")


# --- names, contract and errors ----------------------------------------------------------


def test_architecture_and_conditioning_fields() -> None:
    ours, _ = models("qwen-image")
    assert ours.architecture == "qwen_image"
    assert ours.conditioning_fields == ("reference_latents",)


def test_module_names_are_comfyui_names() -> None:
    names = set(models("qwen-image")[0].state_dict())
    block = "transformer_blocks.1."
    assert {
        "img_in.weight", "txt_norm.weight", "txt_in.bias", "time_text_embed.timestep_embedder.linear_1.weight",
        "time_text_embed.timestep_embedder.linear_2.bias", "norm_out.linear.weight", "proj_out.bias",
        *(block + name for name in (
            "img_mod.1.weight", "txt_mod.1.bias", "attn.to_q.weight", "attn.to_k.bias", "attn.to_v.weight",
            "attn.to_out.0.weight", "attn.add_q_proj.weight", "attn.add_k_proj.bias", "attn.add_v_proj.weight",
            "attn.to_add_out.bias", "attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight",
            "attn.norm_added_k.weight", "img_mlp.net.0.proj.weight", "img_mlp.net.2.bias",
            "txt_mlp.net.0.proj.bias", "txt_mlp.net.2.weight",
        )),
    } <= names  # fmt: skip
    assert names == set(models("qwen-image")[1].state_dict())  # nothing beyond diffusers' (= ComfyUI's) names


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(axes_dim=[8, 12, 8]), r"axes_dim \[8, 12, 8\].*head_dim 32"),
        (dict(axes_dim=[7, 13, 12]), r"axes_dim \[7, 13, 12\] must be even"),
        (dict(axes_dim=[16, 16]), r"axes_dim \[16, 16\] has 2 entries"),
        (dict(num_heads=0), "num_heads = 0 must be at least 1"),
        (dict(num_layers=-1), "num_layers = -1"),
    ],
)
def test_bad_configs_name_the_values(changes: dict, message: str) -> None:
    fields = CONFIGS["qwen-image"].to_dict() | changes
    with pytest.raises(ValueError, match=message):
        QwenImageConfig(**fields)


def test_default_config_is_the_released_model() -> None:
    cfg = QwenImageConfig()
    assert (cfg.hidden_size, cfg.patch_features, cfg.num_layers, cfg.joint_attention_dim) == (3072, 64, 60, 3584)
    assert cfg.axes_dim == [16, 56, 56] and not cfg.zero_cond_t


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(reference_latents=[torch.zeros(2, 4, 4, 4)]), r"reference_latents\[0\] has shape \(2, 4, 4, 4\)"),
        (dict(reference_latents=[torch.zeros(2, 16, 1, 4, 4)]), r"drop the Wan VAE's frame axis"),
        (dict(context_lens=torch.tensor([9, 1])), r"context_lens \[9, 1\] must hold 2 values in 0..7"),
    ],
)
def test_bad_inputs_name_the_values(overrides: dict, message: str) -> None:
    ours, _, inputs, _ = setup("odd-grid-ragged-text")
    with pytest.raises(ValueError, match=message):
        run_ours(ours, inputs, **overrides)


def test_wrong_text_width_names_the_encoder() -> None:
    ours, _, inputs, _ = setup("odd-grid-ragged-text")
    with pytest.raises(ValueError, match=r"context has shape \(2, 7, 12\), expected \(2, L, 24\): Qwen2.5-VL"):
        ours(inputs.x, inputs.sigma, inputs.context[..., :12])


# --- negative controls: each must break parity ---------------------------------------------

CONTROL_EDIT = "edit-one-ref"
CONTROL_2511 = "edit-2511-two-refs"


@pytest.mark.parametrize("name", ["odd-grid-ragged-text", CONTROL_EDIT])
def test_shifted_rope_rows_are_detected(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, _, inputs, expected = setup(name)
    centred = qwen_image.image_positions

    def shifted(grid_h: int, grid_w: int, frame: int, device: torch.device) -> torch.Tensor:
        return centred(grid_h, grid_w, frame, device) + torch.tensor([0.0, 1.0, 0.0])

    monkeypatch.setattr(qwen_image, "image_positions", shifted)
    assert_detected(f"{name} rows shifted", run_ours(ours, inputs), expected)


def test_comfyui_odd_grid_centring_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI 0.3.x centres a grid of h rows at r - floor(h / 2), diffusers at r - ceil(h / 2)."""
    ours, _, inputs, expected = setup("odd-grid-ragged-text")

    def comfyui_positions(grid_h: int, grid_w: int, frame: int, device: torch.device) -> torch.Tensor:
        # QwenImageTransformer2DModel.process_img: linspace(0, n - 1, n) - n // 2 on each axis
        rows = torch.linspace(0, grid_h - 1, grid_h) - grid_h // 2
        cols = torch.linspace(0, grid_w - 1, grid_w) - grid_w // 2
        row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
        frames = torch.full((grid_h * grid_w,), float(frame))
        return torch.stack([frames, row_grid.flatten(), col_grid.flatten()], dim=-1)

    monkeypatch.setattr(qwen_image, "image_positions", comfyui_positions)
    assert_detected("odd-grid-ragged-text ComfyUI centring", run_ours(ours, inputs), expected)


def test_text_start_from_the_target_alone_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI 0.3.x starts the text past the target grid only; diffusers past the largest grid."""
    ours, _, inputs, expected = setup("edit-two-refs")
    monkeypatch.setattr(qwen_image, "text_start", lambda grids: max(grids[0][0] // 2, grids[0][1] // 2))
    assert_detected("edit-two-refs text start from the target", run_ours(ours, inputs), expected)


@pytest.mark.parametrize("name", [CONTROL_EDIT, CONTROL_2511])
def test_swapped_q_k_is_detected(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    swapped = QwenImageDiT(ours.cfg).eval()
    state_dict = ours.state_dict()
    prefix = "transformer_blocks.0.attn."
    swapped.load_state_dict(
        {**state_dict, prefix + "to_q.weight": state_dict[prefix + "to_k.weight"],
         prefix + "to_k.weight": state_dict[prefix + "to_q.weight"]}
    )  # fmt: skip
    assert_detected(f"{name} q/k swapped", run_ours(swapped, inputs), expected)


@pytest.mark.parametrize("name", ["odd-grid-ragged-text", CONTROL_EDIT])
def test_ignored_context_lens_are_detected(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    assert_detected(f"{name} no text mask", run_ours(ours, inputs, context_lens=None), expected)


@pytest.mark.parametrize("name", [CONTROL_EDIT, CONTROL_2511])
def test_references_at_the_target_frame_are_detected(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, reference, inputs, _ = setup(name)
    frame_freqs = reference.pos_embed._compute_video_freqs
    monkeypatch.setattr(
        reference.pos_embed,
        "_compute_video_freqs",
        lambda frame, height, width, idx=0, device=None: frame_freqs(frame, height, width, 0, device),
    )
    with torch.no_grad():
        collided = run_reference(reference, inputs)
    assert_detected(f"{name} references at frame 0", run_ours(ours, inputs), collided)


def test_zero_cond_t_off_is_detected() -> None:
    ours, _, inputs, expected = setup(CONTROL_2511)
    plain = QwenImageDiT(replace(ours.cfg, zero_cond_t=False)).eval()
    plain.load_state_dict(ours.state_dict())
    assert_detected(f"{CONTROL_2511} zero_cond_t off", run_ours(plain, inputs), expected)
