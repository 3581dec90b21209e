"""Our Flux.1 / Flux.2 DiT against diffusers' `FluxTransformer2DModel` / `Flux2Transformer2DModel`.

Weights are random at realistic scale (fan-in-scaled matrices, norm gains near 1,
non-zero biases and modulation) in our BFL / ComfyUI layout; diffusers' own single-file
converters map them to diffusers' names, loaded strictly, so the key mapping is
diffusers', not ours. Token packing and RoPE ids for the reference come from diffusers'
pipelines (FluxPipeline, FluxKontextPipeline, Flux2Pipeline). Our model runs a padded
batch of two prompts of different lengths; diffusers runs each sample alone, unpadded.
Negative controls prove the comparison is sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2Pipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_flux_transformer_checkpoint_to_diffusers,
)

from dit_trainer.training.models.flux import FluxConfig, FluxDiT

FP32_TOL = 1e-4  # max |error| relative to max |reference|
SENSITIVITY = 1e-2  # every negative control must exceed this
# bf16 keeps 8 significant bits per weight and activation; four blocks of residual
# updates, softmax and norms compound that to ~7e-3 of the output scale here.
BF16_TOL = 2e-2
# diffusers' Flux.1 converter splits single_blocks.N.linear1 at the released widths
# (inner_dim 3072, mlp_ratio 4, hard-coded); see widen_linear1.
RELEASED_FLUX1_HIDDEN = 3072
RELEASED_FLUX1_MLP_HIDDEN = 4 * 3072

CONFIGS = {
    "flux1-dev": FluxConfig(
        family="flux1", in_channels=16, patch_size=2, hidden_size=64, num_heads=2, depth=2,
        depth_single_blocks=2, mlp_ratio=4.0, context_in_dim=24, vec_in_dim=12, guidance_embed=True,
        axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
    ),
    "flux1-schnell": FluxConfig(
        family="flux1", in_channels=16, patch_size=2, hidden_size=96, num_heads=4, depth=2,
        depth_single_blocks=2, mlp_ratio=4.0, context_in_dim=24, vec_in_dim=12, guidance_embed=False,
        axes_dim=[4, 10, 10], theta=10000, qkv_bias=True,
    ),
    "flux2-dev": FluxConfig(
        family="flux2", in_channels=32, patch_size=1, hidden_size=64, num_heads=2, depth=2,
        depth_single_blocks=2, mlp_ratio=3.0, context_in_dim=40, vec_in_dim=0, guidance_embed=True,
        axes_dim=[8, 8, 8, 8], theta=2000, qkv_bias=False,
    ),
    "flux2-klein": FluxConfig(
        family="flux2", in_channels=32, patch_size=1, hidden_size=96, num_heads=4, depth=2,
        depth_single_blocks=2, mlp_ratio=3.0, context_in_dim=40, vec_in_dim=0, guidance_embed=False,
        axes_dim=[6, 6, 6, 6], theta=2000, qkv_bias=False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    config: str
    latent_hw: tuple[int, int]
    text_lens: tuple[int, int]
    guidance: tuple[float, float] | None = None  # raw values, e.g. 3.5
    reference_hws: tuple[tuple[int, int], ...] = ()


CASES = {
    # 6x10 latents = 3x5 tokens; prompts of 7 and 3 tokens, the short one padded and masked.
    "flux1-dev-odd-grid-ragged-text": Case("flux1-dev", (6, 10), (7, 3), guidance=(3.5, 1.5)),
    # 7x9 latents: padded circularly to 8x10 (4x5 tokens), the output cropped back.
    "flux1-dev-odd-latent": Case("flux1-dev", (7, 9), (5, 5), guidance=(3.5, 3.5)),
    "flux1-schnell": Case("flux1-schnell", (8, 8), (6, 2)),
    # Kontext: one reference of another size than the target, at index 1.
    "flux1-kontext": Case("flux1-dev", (6, 10), (7, 3), guidance=(2.5, 2.5), reference_hws=((8, 6),)),
    # Two references, placed side by side by ComfyUI's "offset" method.
    "flux1-kontext-two-refs": Case("flux1-dev", (4, 4), (4, 6), guidance=(2.5, 4.0), reference_hws=((4, 6), (6, 4))),
    "flux2-dev-odd-grid-ragged-text": Case("flux2-dev", (3, 5), (9, 4), guidance=(4.0, 2.0)),
    "flux2-klein": Case("flux2-klein", (4, 4), (5, 5)),
    "flux2-dev-one-ref": Case("flux2-dev", (3, 5), (6, 3), guidance=(4.0, 4.0), reference_hws=((4, 4),)),
    "flux2-klein-two-refs": Case("flux2-klein", (4, 3), (5, 8), reference_hws=((3, 5), (2, 2))),
}


@dataclass
class Inputs:
    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    context_lens: torch.Tensor
    pooled: torch.Tensor | None
    guidance: torch.Tensor | None
    reference_latents: list[torch.Tensor]

    def conditioning(self) -> dict:
        return dict(pooled=self.pooled, guidance=self.guidance, reference_latents=self.reference_latents or None)


# --- models ------------------------------------------------------------------


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial: fan-in-scaled matrices, gains near 1, non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise * min(0.2, max(0.02, param.shape[1] ** -0.5)))


def widen_linear1(weight: torch.Tensor, cfg: FluxConfig) -> torch.Tensor:
    """Zero-pad linear1's q | k | v | mlp-in rows to the released widths diffusers' converter splits at."""
    parts = weight.split([cfg.hidden_size] * 3 + [cfg.mlp_hidden_dim])
    widths = [RELEASED_FLUX1_HIDDEN] * 3 + [RELEASED_FLUX1_MLP_HIDDEN]
    # F.pad lists the last dimension first: pad rows only, at the end.
    padded = [F.pad(part, (0, 0) * (part.ndim - 1) + (0, width - len(part))) for part, width in zip(parts, widths)]
    return torch.cat(padded)


def to_diffusers_state_dict(model: FluxDiT) -> dict[str, torch.Tensor]:
    """Our BFL-named weights through diffusers' own single-file converter."""
    cfg = model.cfg
    checkpoint = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if cfg.family == "flux2":
        return convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    for i in range(cfg.depth_single_blocks):
        for param in ("weight", "bias"):
            key = f"single_blocks.{i}.linear1.{param}"
            checkpoint[key] = widen_linear1(checkpoint[key], cfg)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"keys diffusers' Flux.1 converter does not know: {sorted(checkpoint)}"
    for i in range(cfg.depth_single_blocks):
        for param in ("weight", "bias"):
            for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
                key = f"single_transformer_blocks.{i}.{name}.{param}"
                converted[key] = converted[key][: cfg.hidden_size]
            key = f"single_transformer_blocks.{i}.proj_mlp.{param}"
            converted[key] = converted[key][: cfg.mlp_hidden_dim]
    return converted


def diffusers_model(cfg: FluxConfig) -> torch.nn.Module:
    common = dict(
        patch_size=1,  # Flux.1's 2x2 patches are packed by the pipeline, outside the model
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=tuple(cfg.axes_dim),
    )
    if cfg.family == "flux1":
        return FluxTransformer2DModel(in_channels=4 * cfg.in_channels, pooled_projection_dim=cfg.vec_in_dim, **common)
    return Flux2Transformer2DModel(in_channels=cfg.in_channels, mlp_ratio=cfg.mlp_ratio, rope_theta=cfg.theta, **common)


@cache
def models(config: str) -> tuple[FluxDiT, torch.nn.Module]:
    cfg = CONFIGS[config]
    ours = FluxDiT(cfg)
    randomise_(ours, seed=cfg.hidden_size + len(config))
    reference = diffusers_model(cfg)
    reference.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    return ours.eval(), reference.eval()


# --- inputs and the reference run --------------------------------------------


def make_inputs(case: Case) -> Inputs:
    cfg = CONFIGS[case.config]
    gen = torch.Generator().manual_seed(7)
    lens = torch.tensor(case.text_lens)
    context = torch.randn(2, max(case.text_lens), cfg.context_in_dim, generator=gen)
    context[torch.arange(context.shape[1])[None, :] >= lens[:, None]] = 0.0  # the engine's contract
    return Inputs(
        x=torch.randn(2, cfg.in_channels, *case.latent_hw, generator=gen),
        sigma=torch.tensor([0.3, 0.85]),
        context=context,
        context_lens=lens,
        pooled=torch.randn(2, cfg.vec_in_dim, generator=gen) if cfg.vec_in_dim else None,
        guidance=torch.tensor(case.guidance) if case.guidance else None,
        reference_latents=[torch.randn(2, cfg.in_channels, h, w, generator=gen) for h, w in case.reference_hws],
    )


def pad_to_patch(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """ComfyUI's common_dit.pad_to_patch_size (circular)."""
    h, w = latents.shape[-2:]
    return F.pad(latents, (0, (-w) % patch, 0, (-h) % patch), mode="circular")


def flux1_tokens(
    latents: torch.Tensor, index: int = 0, row: int = 0, col: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPipeline's packing and ids of (1, C, H, W) latents; ids (index, row + r, col + c)."""
    latents = pad_to_patch(latents, 2)
    b, c, h, w = latents.shape
    tokens = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    ids[:, 0] = index  # FluxKontextPipeline.prepare_latents: references at index 1
    ids[:, 1] += row
    ids[:, 2] += col
    return tokens, ids


def comfy_offset_positions(reference_hws: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """ComfyUI Flux._forward, ref_latents_method "offset": (row, col) token offsets per reference."""
    h = w = 0
    offsets = []
    for ref_h, ref_w in reference_hws:
        h_offset = w_offset = 0
        if ref_h + h > ref_w + w:
            w_offset = w
        else:
            h_offset = h
        h = max(h, ref_h + h_offset)
        w = max(w, ref_w + w_offset)
        offsets.append(((h_offset + 1) // 2, (w_offset + 1) // 2))
    return offsets


def run_reference(
    reference: torch.nn.Module,
    cfg: FluxConfig,
    inputs: Inputs,
    *,
    sample_x: list[torch.Tensor] | None = None,
    sample_context: list[torch.Tensor] | None = None,
    row_shift: int = 0,
    reference_index_zero: bool = False,
) -> torch.Tensor:
    """diffusers, one sample at a time with its unpadded prompt -> (B, C, H, W).

    sample_x / sample_context: per-sample (1, C, H, W) latents and (1, L_i, D) prompts to
    use instead of slices of `inputs` (gradient tests pass leaf tensors).
    row_shift / reference_index_zero: negative controls (target rows shifted by one,
    references at index 0 on top of the target).
    """
    outputs = []
    for i in range(inputs.x.shape[0]):
        x = inputs.x[i : i + 1] if sample_x is None else sample_x[i]
        n_txt = int(inputs.context_lens[i])
        context = inputs.context[i : i + 1, :n_txt] if sample_context is None else sample_context[i]
        refs = [ref[i : i + 1] for ref in inputs.reference_latents]
        if cfg.family == "flux1":
            tokens, img_ids = flux1_tokens(x, row=row_shift)
            ref_parts = [
                flux1_tokens(ref, index=0 if reference_index_zero else 1, row=row, col=col)
                for ref, (row, col) in zip(refs, comfy_offset_positions([r.shape[-2:] for r in refs]))
            ]
            txt_ids = torch.zeros(n_txt, 3)  # FluxPipeline.encode_prompt
        else:
            tokens, img_ids = Flux2Pipeline._pack_latents(x), Flux2Pipeline._prepare_latent_ids(x)[0].float()
            unpack_ids = img_ids[None].long()
            img_ids = img_ids + torch.tensor([0, row_shift, 0, 0])
            ref_parts = []
            if refs:
                ref_ids = Flux2Pipeline._prepare_image_ids(refs)[0].float()
                if reference_index_zero:
                    ref_ids[:, 0] = 0
                ref_parts = [(torch.cat([Flux2Pipeline._pack_latents(ref) for ref in refs], dim=1), ref_ids)]
            txt_ids = Flux2Pipeline._prepare_text_ids(context)[0].float()
        n_target = tokens.shape[1]
        kwargs = dict(
            hidden_states=torch.cat([tokens, *(part[0] for part in ref_parts)], dim=1),
            encoder_hidden_states=context,
            timestep=inputs.sigma[i : i + 1],  # diffusers scales sigma by 1000 inside, as ComfyUI does
            img_ids=torch.cat([img_ids, *(part[1] for part in ref_parts)], dim=0),
            txt_ids=txt_ids,
            guidance=None if inputs.guidance is None else inputs.guidance[i : i + 1],
            return_dict=False,
        )
        if cfg.family == "flux1":
            kwargs["pooled_projections"] = inputs.pooled[i : i + 1]
        out = reference(**kwargs)[0][:, :n_target]
        if cfg.family == "flux1":
            h, w = pad_to_patch(x, 2).shape[-2:]
            outputs.append(FluxPipeline._unpack_latents(out, h, w, 1)[..., : x.shape[2], : x.shape[3]])
        else:
            outputs.append(Flux2Pipeline._unpack_latents_with_ids(out, unpack_ids))
    return torch.cat(outputs)


def run_ours(model: FluxDiT, inputs: Inputs, **overrides) -> torch.Tensor:
    kwargs = dict(context_lens=inputs.context_lens, **inputs.conditioning())
    kwargs.update(overrides)
    with torch.no_grad():
        return model(inputs.x, inputs.sigma, inputs.context, **kwargs)


@cache
def setup(name: str) -> tuple[FluxDiT, torch.nn.Module, Inputs, torch.Tensor]:
    case = CASES[name]
    ours, reference = models(case.config)
    inputs = make_inputs(case)
    with torch.no_grad():
        expected = run_reference(reference, ours.cfg, inputs)
    # The relative metric below is only meaningful for an O(1) output.
    assert 0.1 < expected.abs().max() < 100, f"degenerate reference output scale {expected.abs().max()}"
    return ours, reference, inputs, expected


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_matches(label: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = relative_error(actual, expected)
    print(f"{label}: max relative error {error:.2e}")
    assert error <= FP32_TOL, f"{label}: max relative error {error:.2e} > {FP32_TOL}"


def assert_detected(label: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = relative_error(actual, expected)
    print(f"{label}: max relative error {error:.2e} (negative control)")
    assert error > SENSITIVITY, f"{label}: the comparison missed the fault ({error:.2e} <= {SENSITIVITY})"


# --- parity --------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_padded_batch_matches_diffusers_per_sample(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    assert_matches(name, run_ours(ours, inputs), expected)


@pytest.mark.parametrize("name", ["flux1-dev-odd-grid-ragged-text", "flux2-dev-one-ref"])
def test_input_gradients_match_diffusers(name: str) -> None:
    ours, reference, inputs, _ = setup(name)
    projection = torch.randn(inputs.x.shape, generator=torch.Generator().manual_seed(3))

    x = inputs.x.clone().requires_grad_()
    context = inputs.context.clone().requires_grad_()
    out = ours(x, inputs.sigma, context, inputs.context_lens, **inputs.conditioning())
    (out * projection).sum().backward()

    sample_x = [inputs.x[i : i + 1].clone().requires_grad_() for i in range(2)]
    lens = inputs.context_lens.tolist()
    sample_context = [inputs.context[i : i + 1, :n].clone().requires_grad_() for i, n in enumerate(lens)]
    expected = run_reference(reference, ours.cfg, inputs, sample_x=sample_x, sample_context=sample_context)
    (expected * projection).sum().backward()

    assert_matches(f"{name} d/dx", x.grad, torch.cat([leaf.grad for leaf in sample_x]))
    for i, leaf in enumerate(sample_context):
        n = leaf.shape[1]
        assert_matches(f"{name} d/dcontext[{i}]", context.grad[i : i + 1, :n], leaf.grad)
        # Padding tokens are masked keys and their own outputs are dropped: no gradient.
        assert torch.all(context.grad[i, n:] == 0)


@pytest.mark.parametrize("name", ["flux1-kontext-two-refs", "flux2-klein-two-refs"])
def test_bf16_model_close_to_fp32_reference(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    model = FluxDiT(ours.cfg).to(torch.bfloat16).eval()
    model.load_state_dict(ours.state_dict())
    # sigma and guidance stay fp32, as the engine passes them: in bf16, sigma 0.3 would
    # become 0.30078, a timestep of 300.8 instead of 300.
    bf16 = Inputs(
        x=inputs.x.bfloat16(),
        sigma=inputs.sigma,
        context=inputs.context.bfloat16(),
        context_lens=inputs.context_lens,
        pooled=None if inputs.pooled is None else inputs.pooled.bfloat16(),
        guidance=inputs.guidance,
        reference_latents=[ref.bfloat16() for ref in inputs.reference_latents],
    )
    out = run_ours(model, bf16)
    assert out.dtype == torch.bfloat16
    error = relative_error(out.float(), expected)
    print(f"{name} bf16: max relative error {error:.2e}")
    assert error <= BF16_TOL


def test_gradient_checkpointing_changes_nothing() -> None:
    ours, _, inputs, _ = setup("flux2-dev-one-ref")
    results = []
    for enabled in (False, True):
        ours.gradient_checkpointing = enabled
        x = inputs.x.clone().requires_grad_()
        out = ours(x, inputs.sigma, inputs.context, inputs.context_lens, **inputs.conditioning())
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    ours.gradient_checkpointing = False
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-6)


# --- conditioning contract -------------------------------------------------------


@pytest.mark.parametrize(
    "config,architecture,fields",
    [
        ("flux1-dev", "flux", ("pooled", "guidance", "reference_latents")),
        ("flux1-schnell", "flux", ("pooled", "reference_latents")),
        ("flux2-dev", "flux2", ("guidance", "reference_latents")),
        ("flux2-klein", "flux2", ("reference_latents",)),
    ],
)
def test_architecture_and_conditioning_fields(config: str, architecture: str, fields: tuple[str, ...]) -> None:
    ours, _ = models(config)
    assert ours.architecture == architecture
    assert ours.conditioning_fields == fields


@pytest.mark.parametrize("name", ["flux1-schnell", "flux2-klein"])
def test_guidance_is_ignored_without_guidance_in(name: str) -> None:
    ours, _, inputs, _ = setup(name)
    assert torch.equal(run_ours(ours, inputs, guidance=torch.tensor([3.5, 1.0])), run_ours(ours, inputs))


def test_flux1_without_pooled_names_the_fix() -> None:
    ours, _, inputs, _ = setup("flux1-schnell")
    with pytest.raises(ValueError, match="CLIP-L pooled.*DualCLIPLoader type flux"):
        run_ours(ours, inputs, pooled=None)


def test_module_names_are_bfl_names() -> None:
    flux1 = set(models("flux1-dev")[0].state_dict())
    assert {
        "img_in.bias", "txt_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias",
        "guidance_in.in_layer.weight", "double_blocks.1.img_mod.lin.weight", "double_blocks.0.txt_mod.lin.bias",
        "double_blocks.0.img_attn.qkv.bias", "double_blocks.0.txt_attn.proj.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.norm.key_norm.scale",
        "double_blocks.0.img_mlp.0.weight", "double_blocks.0.txt_mlp.2.bias", "single_blocks.1.linear1.weight",
        "single_blocks.0.linear2.bias", "single_blocks.0.norm.query_norm.scale",
        "single_blocks.0.modulation.lin.weight",
        "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias",
    } <= flux1  # fmt: skip
    flux2 = set(models("flux2-dev")[0].state_dict())
    assert {
        "double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
        "single_stream_modulation.lin.weight", "guidance_in.out_layer.weight",
    } <= flux2  # fmt: skip
    per_block_modulation = (".img_mod.lin.weight", ".txt_mod.lin.weight", ".modulation.lin.weight")
    assert not [key for key in flux2 if key.endswith(per_block_modulation)]
    assert not [key for key in flux2 if key.endswith(".bias") or key.startswith("vector_in.")]


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(axes_dim=[8, 12, 8]), r"axes_dim \[8, 12, 8\].*head_dim 32"),
        (dict(num_heads=3), "hidden_size 64 is not divisible by num_heads 3"),
        (dict(family="flux3"), "family 'flux3'"),
        (dict(family="flux2", axes_dim=[8, 8, 8, 8]), "vec_in_dim 12 and qkv_bias True"),
        (dict(family="flux2"), r"axes_dim \[8, 12, 12\] has 3 entries"),
    ],
)
def test_bad_configs_name_the_values(changes: dict, message: str) -> None:
    fields = CONFIGS["flux1-dev"].to_dict() | changes
    with pytest.raises(ValueError, match=message):
        FluxConfig(**fields)


# --- negative controls: each must break parity -------------------------------------

CONTROL_FLUX1 = "flux1-kontext"
CONTROL_FLUX2 = "flux2-dev-one-ref"


@pytest.mark.parametrize("name", [CONTROL_FLUX1, CONTROL_FLUX2])
def test_shifted_rope_rows_are_detected(name: str) -> None:
    ours, reference, inputs, _ = setup(name)
    with torch.no_grad():
        shifted = run_reference(reference, ours.cfg, inputs, row_shift=1)
    assert_detected(f"{name} rows shifted", run_ours(ours, inputs), shifted)


@pytest.mark.parametrize("name", [CONTROL_FLUX1, CONTROL_FLUX2])
def test_references_at_index_zero_are_detected(name: str) -> None:
    ours, reference, inputs, _ = setup(name)
    with torch.no_grad():
        collided = run_reference(reference, ours.cfg, inputs, reference_index_zero=True)
    assert_detected(f"{name} references at index 0", run_ours(ours, inputs), collided)


@pytest.mark.parametrize("name", [CONTROL_FLUX1, CONTROL_FLUX2])
def test_ignored_context_lens_are_detected(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    assert_detected(f"{name} no text mask", run_ours(ours, inputs, context_lens=None), expected)


@pytest.mark.parametrize("name", [CONTROL_FLUX1, CONTROL_FLUX2])
def test_dropped_guidance_is_detected(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    assert_detected(f"{name} guidance dropped", run_ours(ours, inputs, guidance=None), expected)


@pytest.mark.parametrize("name", [CONTROL_FLUX1, CONTROL_FLUX2])
def test_swapped_q_k_is_detected(name: str) -> None:
    ours, _, inputs, expected = setup(name)
    swapped = FluxDiT(ours.cfg).eval()
    state_dict = ours.state_dict()
    key = "double_blocks.0.img_attn.qkv.weight"
    q, k, v = state_dict[key].chunk(3, dim=0)
    swapped.load_state_dict({**state_dict, key: torch.cat([k, q, v], dim=0)})
    assert_detected(f"{name} q/k swapped", run_ours(swapped, inputs), expected)


def test_patch_features_in_ph_pw_c_order_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI packs patch features as (c, ph, pw); Z-Image's (ph, pw, c) order must not pass."""
    ours, _, inputs, expected = setup("flux1-dev-odd-grid-ragged-text")
    p, c = ours.cfg.patch_size, ours.cfg.in_channels

    def patchify(latents):
        b, _, h, w = latents.shape
        tokens = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return tokens.reshape(b, (h // p) * (w // p), p * p * c), h // p, w // p

    def unpatchify(tokens, grid_h, grid_w, h, w):
        latents = tokens.view(tokens.shape[0], grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return latents.reshape(tokens.shape[0], c, h, w)

    monkeypatch.setattr(ours, "patchify", patchify)
    monkeypatch.setattr(ours, "unpatchify", unpatchify)
    assert_detected("patch features (ph, pw, c)", run_ours(ours, inputs), expected)
