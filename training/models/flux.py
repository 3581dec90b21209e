"""Flux.1 and Flux.2 diffusion transformers, with ComfyUI's / BFL's module names.

One file serves both families because ComfyUI runs both through one `Flux` class
(`comfy/ldm/flux/model.py`): the double-stream / single-stream blocks are the same
MMDiT with a few switches, chosen here by `FluxConfig.family`:

  Flux.1 (dev, schnell, Kontext)       Flux.2 (dev, klein 4B / 9B)
  per-block adaLN: double_blocks.N.    model-wide shared adaLN:
    img_mod.lin / txt_mod.lin,           double_stream_modulation_img.lin /
    single_blocks.N.modulation.lin       _txt.lin, single_stream_modulation.lin
  GELU(tanh) MLPs                      SwiGLU MLPs (img_mlp.0 and the MLP part of
                                         linear1 output 2 x mlp_hidden: gate | value)
  biases everywhere                    no biases anywhere
  vector_in (CLIP-L pooled vector)     no vector_in
  guidance_in on dev / Kontext         guidance_in on dev, not on klein
  3-axis RoPE (index, row, col)        4-axis RoPE (index, row, col, text position)
  16-ch 1/8 latents, 2x2 patches       128-ch latents (VAE output already
                                         patchified), patch 1

Each double-stream block gives image and text tokens their own weights and attends
over the joint sequence [text, image]; single-stream blocks then run the joint
sequence through one fused linear1 (q | k | v | mlp-in) and linear2 (attention-out |
mlp-out). The final layer reads the image tokens only.

Token layout, as ComfyUI and diffusers build it:
  image patches  "b c (h ph) (w pw) -> b (h w) (c ph pw)", odd latent sizes padded
                 circularly to the patch size (`common_dit.pad_to_patch_size`), the
                 output cropped back;
  text ids       Flux.1 (0, 0, 0); Flux.2 (0, 0, 0, token index);
  image ids      Flux.1 (0, row, col); Flux.2 (0, row, col, 0);
  references     extra image tokens after the target's (Kontext / Flux.2 edit), with
                 the same timestep modulation, dropped from the output. Flux.1: index 1,
                 placed side by side like ComfyUI's default "offset" method (one
                 reference sits at (1, row, col), as diffusers' FluxKontextPipeline
                 has it); Flux.2: index 10 * (i + 1) for reference i, like BFL's
                 sampling code and diffusers' Flux2Pipeline.
Text tokens past each row's `context_lens` are batch padding and are masked as
attention keys, so a padded batch gives each sample what it gets alone.

Timestep convention: the engine's sigma is the model's timestep (ComfyUI's Flux
model sampling uses sigma directly); it and the guidance value (e.g. 3.5) are scaled
by 1000 inside the sinusoidal embedding. The network predicts noise - x0, which is
the engine's flow-matching target, so no conversion is needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...kernels.attention import attention
from .patches import patchify, unpatchify

FAMILIES = ("flux1", "flux2")
TIME_FEATURES = 256  # sinusoidal width of the timestep and guidance embeddings
TIME_FACTOR = 1000.0  # sigma and guidance are scaled by this inside the embedding
NORM_EPS = 1e-6
FLUX2_REFERENCE_INDEX_STEP = 10  # Flux.2 reference i sits at RoPE index 10 * (i + 1)
FP16_MAX = 65504.0


@dataclass
class FluxConfig:
    """Field names as ComfyUI's FluxParams; defaults: Flux.1-dev."""

    family: str = "flux1"  # "flux1" (dev / schnell / Kontext) or "flux2" (dev, klein 4B / 9B)
    in_channels: int = 16  # latent channels (Flux.1: 16 at 1/8; Flux.2: 128 at 1/16, patchified by ComfyUI's VAE)
    patch_size: int = 2  # latent cells per token side (Flux.1: 2; Flux.2: 1)
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0  # Flux.2: 3.0 (SwiGLU)
    context_in_dim: int = 4096  # text-state width (T5-XXL 4096; Flux.2 dev 15360, klein 4B 7680, klein 9B 12288)
    vec_in_dim: int = 768  # pooled-vector width (CLIP-L); 0 = no vector_in (Flux.2)
    guidance_embed: bool = True  # guidance_in present (Flux.1-dev / Kontext / Flux.2 dev); False: schnell, klein
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])  # RoPE split of head_dim (Flux.2: [32] * 4)
    theta: int = 10000  # RoPE base (Flux.2: 2000)
    qkv_bias: bool = True  # Flux.2: no biases anywhere

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def rope_axes(self) -> int:
        """Position axes: (index, row, col), plus the text position on Flux.2."""
        return 3 if self.family == "flux1" else 4

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent value and the fix."""
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        positive = ("in_channels", "patch_size", "hidden_size", "num_heads", "context_in_dim", "theta")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.depth < 0 or self.depth_single_blocks < 0 or self.vec_in_dim < 0:
            raise ValueError(
                f"depth {self.depth}, depth_single_blocks {self.depth_single_blocks} and vec_in_dim "
                f"{self.vec_in_dim} must not be negative"
            )
        if self.mlp_hidden_dim < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for hidden_size {self.hidden_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.axes_dim) != self.rope_axes:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} has {len(self.axes_dim)} entries; family {self.family} "
                f"positions tokens on {self.rope_axes} axes"
            )
        if sum(self.axes_dim) != self.head_dim or any(dim % 2 for dim in self.axes_dim):
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must be even sizes summing to head_dim {self.head_dim} "
                f"(hidden_size {self.hidden_size} / num_heads {self.num_heads})"
            )
        if self.family == "flux1" and self.vec_in_dim == 0:
            raise ValueError("vec_in_dim = 0 on family flux1: Flux.1 reads the CLIP-L pooled vector (768)")
        if self.family == "flux2" and (self.vec_in_dim or self.qkv_bias):
            raise ValueError(
                f"family flux2 has no vector_in and no biases, got vec_in_dim {self.vec_in_dim} and "
                f"qkv_bias {self.qkv_bias}; set vec_in_dim=0 and qkv_bias=False"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# --- embeddings and position encoding ---------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of TIME_FACTOR * t, t (B,) -> (B, dim), fp32 (ComfyUI / BFL)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = TIME_FACTOR * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


def rope_rotations(ids: torch.Tensor, axes_dim: list[int], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, head_dim / 2), fp32, for positions ids (L, n_axes).

    Axis i rotates its own axes_dim[i] channels with frequencies theta^(-2j / axes_dim[i]);
    angles are formed in float64 and rounded once, as ComfyUI's and diffusers' tables are.
    """
    angles = []
    for axis, axis_dim in enumerate(axes_dim):
        exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=ids.device) / axis_dim
        angles.append(ids[:, axis, None].double() / theta**exponents)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j + 1) of x (B, L, H, D) in fp32; cos / sin (L, D/2)."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, L, H, D/2)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2)


def text_ids(n_tokens: int, rope_axes: int, device: torch.device) -> torch.Tensor:
    """(n_tokens, rope_axes) positions: Flux.1 all zero; Flux.2 (0, 0, 0, token index)."""
    ids = torch.zeros(n_tokens, rope_axes, device=device)
    if rope_axes == 4:
        ids[:, 3] = torch.arange(n_tokens, device=device)
    return ids


def image_ids(
    grid_h: int, grid_w: int, rope_axes: int, device: torch.device, index: int = 0, row: int = 0, col: int = 0
) -> torch.Tensor:
    """(grid_h * grid_w, rope_axes) positions (index, row + r, col + c[, 0]), row-major like the tokens."""
    ids = torch.zeros(grid_h, grid_w, rope_axes, device=device)
    ids[..., 0] = index
    ids[..., 1] = row + torch.arange(grid_h, device=device)[:, None]
    ids[..., 2] = col + torch.arange(grid_w, device=device)[None, :]
    return ids.flatten(0, 1)


# --- blocks -----------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm in fp32 (as BFL's), gain named `scale` like BFL's checkpoints."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """The per-stream projections of a double-stream block; the attention itself is joint."""

    def __init__(self, cfg: FluxConfig, bias: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.norm = QKNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, hidden) -> q, k, v (B, L, H, D), q and k RMS-normed."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = self.norm(q, k)
        return q, k, v


class Modulation(nn.Module):
    """adaLN: silu(vec) -> shift, scale, gate (x2 for a double block), each (B, 1, hidden)."""

    def __init__(self, hidden_size: int, double: bool, bias: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(hidden_size, self.multiplier * hidden_size, bias=bias)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class SwiGLU(nn.Module):
    """Flux.2's gated activation: silu(first half) * second half of the last axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


def mlp_activation(cfg: FluxConfig) -> nn.Module:
    return nn.GELU(approximate="tanh") if cfg.family == "flux1" else SwiGLU()


def mlp_in_dim(cfg: FluxConfig) -> int:
    """Width of the MLP's first projection: SwiGLU needs value and gate halves."""
    return cfg.mlp_hidden_dim if cfg.family == "flux1" else 2 * cfg.mlp_hidden_dim


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The blocks' affine-free LayerNorm (eps 1e-6)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations overflow in the later blocks; ComfyUI clamps them the same way."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return x


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotations: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """RoPE (fp32) then attention over q, k, v (B, L, H, D) -> (B, L, H * D)."""
    q = apply_rope(q, *rotations).to(v.dtype)
    k = apply_rope(k, *rotations).to(v.dtype)
    return attention(q, k, v, key_mask, backend=backend).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights and one joint attention over [text, image]."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        bias = cfg.family == "flux1"
        per_block_modulation = cfg.family == "flux1"
        self.img_mod = Modulation(cfg.hidden_size, double=True, bias=bias) if per_block_modulation else None
        self.img_attn = SelfAttention(cfg, bias)
        self.img_mlp = nn.Sequential(
            nn.Linear(cfg.hidden_size, mlp_in_dim(cfg), bias=bias),
            mlp_activation(cfg),
            nn.Linear(cfg.mlp_hidden_dim, cfg.hidden_size, bias=bias),
        )
        self.txt_mod = Modulation(cfg.hidden_size, double=True, bias=bias) if per_block_modulation else None
        self.txt_attn = SelfAttention(cfg, bias)
        self.txt_mlp = nn.Sequential(
            nn.Linear(cfg.hidden_size, mlp_in_dim(cfg), bias=bias),
            mlp_activation(cfg),
            nn.Linear(cfg.mlp_hidden_dim, cfg.hidden_size, bias=bias),
        )
        self.backend = "auto"

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        rotations: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        shared_mod: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, hidden), txt (B, T, hidden), vec (B, hidden); rotations for [text, image].

        shared_mod: Flux.2's model-wide (image, text) modulations; Flux.1 blocks compute
        their own from vec. Returns the updated (img, txt).
        """
        img_mod, txt_mod = shared_mod if shared_mod is not None else (self.img_mod(vec), self.txt_mod(vec))
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod

        img_q, img_k, img_v = self.img_attn.heads(modulate(layer_norm(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(layer_norm(txt), txt_shift1, txt_scale1))
        attn = joint_attention(
            torch.cat([txt_q, img_q], dim=1),
            torch.cat([txt_k, img_k], dim=1),
            torch.cat([txt_v, img_v], dim=1),
            rotations,
            key_mask,
            self.backend,
        )
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(layer_norm(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2))
        return clamp_fp16(img), clamp_fp16(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (ViT-22B style): linear1 = q|k|v|mlp-in."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        bias = cfg.family == "flux1"
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.linear1 = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size + mlp_in_dim(cfg), bias=bias)
        self.linear2 = nn.Linear(cfg.hidden_size + cfg.mlp_hidden_dim, cfg.hidden_size, bias=bias)
        self.norm = QKNorm(cfg.head_dim)
        self.mlp_act = mlp_activation(cfg)
        self.modulation = Modulation(cfg.hidden_size, double=False, bias=bias) if cfg.family == "flux1" else None
        self.backend = "auto"

    def forward(
        self,
        x: torch.Tensor,
        vec: torch.Tensor,
        rotations: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        shared_mod: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x (B, T + N, hidden) joint [text, image]; shared_mod: Flux.2's model-wide modulation."""
        shift, scale, gate = shared_mod if shared_mod is not None else self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split(
            [3 * self.hidden_size, self.linear1.out_features - 3 * self.hidden_size], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = self.norm(q, k)
        attn = joint_attention(q, k, v, rotations, key_mask, self.backend)
        return clamp_fp16(x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


# --- the model --------------------------------------------------------------


class FluxDiT(nn.Module):
    """Flux.1 / Flux.2 transformer; `forward(x, sigma, context, context_lens, ...)` -> noise - x0."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        bias = cfg.family == "flux1"
        patch_features = cfg.in_channels * cfg.patch_size**2
        self.img_in = nn.Linear(patch_features, cfg.hidden_size, bias=bias)
        self.time_in = MLPEmbedder(TIME_FEATURES, cfg.hidden_size, bias=bias)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, cfg.hidden_size, bias=bias) if cfg.vec_in_dim else None
        self.guidance_in = MLPEmbedder(TIME_FEATURES, cfg.hidden_size, bias=bias) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, cfg.hidden_size, bias=bias)
        if cfg.family == "flux2":
            self.double_stream_modulation_img = Modulation(cfg.hidden_size, double=True, bias=False)
            self.double_stream_modulation_txt = Modulation(cfg.hidden_size, double=True, bias=False)
            self.single_stream_modulation = Modulation(cfg.hidden_size, double=False, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg.hidden_size, patch_features, bias=bias)
        self.gradient_checkpointing = False

    @property
    def architecture(self) -> str:
        return "flux" if self.cfg.family == "flux1" else "flux2"

    @property
    def conditioning_fields(self) -> tuple[str, ...]:
        """The optional conditioning keywords this model reads."""
        fields = ("pooled",) if self.vector_in is not None else ()
        fields += ("guidance",) if self.guidance_in is not None else ()
        return fields + ("reference_latents",)

    def set_attention_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, (DoubleStreamBlock, SingleStreamBlock)):
                module.backend = backend

    def _run(self, block: nn.Module, *args) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # --- tokens ---

    def patchify(self, latents: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) -> tokens (B, gh * gw, C * p * p) and the grid gh, gw (patches.py)."""
        return patchify(latents, self.cfg.patch_size)

    def unpatchify(self, tokens: torch.Tensor, grid_h: int, grid_w: int, h: int, w: int) -> torch.Tensor:
        """Inverse of patchify, cropped back to (B, C, h, w)."""
        return unpatchify(tokens, (grid_h, grid_w), (h, w), self.cfg.patch_size, self.cfg.in_channels)

    def reference_tokens(self, references: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference latents -> tokens (B, R, C * p * p) and their positions (R, rope_axes).

        Flux.1 (Kontext): all at index 1, each placed beside or below the previous ones,
        ComfyUI's "offset" method (offsets in latent cells, rounded to tokens).
        Flux.2: reference i at index 10 * (i + 1), no offset (BFL, diffusers Flux2Pipeline).
        """
        cfg, p = self.cfg, self.cfg.patch_size
        tokens, ids = [], []
        placed_h = placed_w = 0  # Flux.1: extent of the references placed so far, in latent cells
        for i, ref in enumerate(references):
            if ref.ndim != 4 or ref.shape[0] != batch or ref.shape[1] != cfg.in_channels:
                raise ValueError(
                    f"reference_latents[{i}] has shape {tuple(ref.shape)}; expected ({batch}, "
                    f"{cfg.in_channels}, h, w): the batch and channels of x, any size"
                )
            ref_tokens, grid_h, grid_w = self.patchify(ref)
            ref_h, ref_w = ref.shape[-2:]
            if cfg.family == "flux1":
                row_offset = col_offset = 0
                if ref_h + placed_h > ref_w + placed_w:
                    col_offset = placed_w
                else:
                    row_offset = placed_h
                placed_h = max(placed_h, ref_h + row_offset)
                placed_w = max(placed_w, ref_w + col_offset)
                position = dict(index=1, row=(row_offset + p // 2) // p, col=(col_offset + p // 2) // p)
            else:
                position = dict(index=FLUX2_REFERENCE_INDEX_STEP * (i + 1))
            tokens.append(ref_tokens)
            ids.append(image_ids(grid_h, grid_w, cfg.rope_axes, ref.device, **position))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)

    # --- conditioning vector ---

    def conditioning_vector(
        self, sigma: torch.Tensor, pooled: torch.Tensor | None, guidance: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """vec (B, hidden) = time_in(sigma) [+ guidance_in(guidance)] [+ vector_in(pooled)]."""
        batch = sigma.shape[0]
        vec = self.time_in(timestep_embedding(sigma).to(dtype))
        # ComfyUI: no guidance value on a guidance model adds nothing; a value given to a
        # model without guidance_in (schnell, klein) is ignored, as FluxGuidance there is.
        if self.guidance_in is not None and guidance is not None:
            guidance = torch.as_tensor(guidance, device=sigma.device).reshape(-1).expand(batch)
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        if self.vector_in is not None:
            if pooled is None:
                raise ValueError(
                    f"Flux.1 needs the CLIP-L pooled vector (pooled, shape ({batch}, {self.cfg.vec_in_dim})): "
                    "connect the CLIP-L pooled output / DualCLIPLoader type flux"
                )
            if tuple(pooled.shape) != (batch, self.cfg.vec_in_dim):
                raise ValueError(
                    f"pooled has shape {tuple(pooled.shape)}, expected ({batch}, {self.cfg.vec_in_dim}): "
                    "the CLIP-L pooled output, one row per sample"
                )
            vec = vec + self.vector_in(pooled.to(dtype))
        return vec

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        context_lens: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        reference_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching target.

        x: noisy latents (B, C, H, W), any H, W (padded to the patch size, cropped back).
        sigma: noise level per sample (B,), 0 = clean, 1 = pure noise.
        context: text-encoder states (B, L, context_in_dim), zero past each length.
        context_lens: valid text tokens per sample (B,); None means all L.
        pooled: CLIP-L pooled vector (B, vec_in_dim); Flux.1 only, required there.
        guidance: distilled guidance value per sample (B,), e.g. 3.5; read by guidance_in models.
        reference_latents: list of (B, C, h_i, w_i) latents of reference images (edit models).
        Returns noise - x0, shape (B, C, H, W), for the target tokens only.
        """
        cfg = self.cfg
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, this {self.architecture} model takes {cfg.in_channels}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_in_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)}, expected ({b}, L, {cfg.context_in_dim}): "
                "text states of the text encoder this model was trained with"
            )
        device, n_txt = x.device, context.shape[1]

        img, grid_h, grid_w = self.patchify(x)
        n_target = img.shape[1]
        img_pos = image_ids(grid_h, grid_w, cfg.rope_axes, device)
        if reference_latents:
            ref_tokens, ref_pos = self.reference_tokens([ref.to(x.dtype) for ref in reference_latents], b)
            img = torch.cat([img, ref_tokens], dim=1)
            img_pos = torch.cat([img_pos, ref_pos], dim=0)
        positions = torch.cat([text_ids(n_txt, cfg.rope_axes, device), img_pos], dim=0)
        rotations = rope_rotations(positions, cfg.axes_dim, cfg.theta)

        key_mask = None
        if context_lens is not None:
            lens = context_lens.to(device)
            if lens.shape != (b,) or int(lens.min()) < 0 or int(lens.max()) > n_txt:
                raise ValueError(
                    f"context_lens {lens.tolist()} must hold {b} values in 0..{n_txt} (the context's token count)"
                )
            txt_valid = torch.arange(n_txt, device=device)[None, :] < lens[:, None]  # (B, L)
            if not txt_valid.all():
                key_mask = torch.cat([txt_valid, txt_valid.new_ones(b, img.shape[1])], dim=1)

        vec = self.conditioning_vector(sigma.to(device), pooled, guidance, x.dtype)
        img = self.img_in(img)
        txt = self.txt_in(context.to(x.dtype))

        double_mod = single_mod = None
        if cfg.family == "flux2":
            double_mod = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec))
            single_mod = self.single_stream_modulation(vec)
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rotations, key_mask, double_mod)
        joint = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            joint = self._run(block, joint, vec, rotations, key_mask, single_mod)

        out = self.final_layer(joint[:, n_txt : n_txt + n_target], vec)  # target tokens only
        return self.unpatchify(out, grid_h, grid_w, h, w)
