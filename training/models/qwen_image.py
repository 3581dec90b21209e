"""Qwen-Image / Qwen-Image-Edit diffusion transformer, with ComfyUI's module names.

An MMDiT of `num_layers` dual-stream blocks and nothing else (no single-stream
blocks): image and text tokens keep their own weights (`img_mod` / `txt_mod` adaLN,
`attn.to_q|k|v` / `attn.add_q|k|v_proj`, `img_mlp` / `txt_mlp`) and meet in one joint
attention over [text, image]. Text states (Qwen2.5-VL-7B, 3584 wide) pass `txt_norm`
(RMSNorm) and `txt_in`; the timestep alone conditions the adaLN (no pooled vector,
no guidance input on the released models). The final layer reads the image tokens.

Module paths are those of ComfyUI's `comfy/ldm/qwen_image/model.py`, which equal
diffusers' `QwenImageTransformer2DModel` state-dict names, so one checkpoint layout and
adapter keys need no renaming: `img_in`, `txt_norm`, `txt_in`,
`time_text_embed.timestep_embedder.linear_1|2`, `transformer_blocks.N.img_mod.1`,
`.txt_mod.1`, `.attn.to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out`,
`.attn.norm_q|norm_k|norm_added_q|norm_added_k`, `.img_mlp.net.0.proj`, `.img_mlp.net.2`,
`.txt_mlp.*`, `norm_out.linear`, `proj_out`.

Token layout, as diffusers' QwenImagePipeline / QwenImageEditPipeline build it:
  image patches  "b c (h ph) (w pw) -> b (h w) (c ph pw)"; odd latent sizes are padded
                 circularly to the patch size (ComfyUI's `pad_to_patch_size`) and the
                 output cropped back;
  image RoPE     (frame, row, col) on axes_dim = [16, 56, 56], rows and columns centred
                 ("scale_rope"): a grid of h rows puts row r at r - ceil(h / 2), so rows
                 run -ceil(h/2) .. floor(h/2) - 1 (diffusers' QwenEmbedRope);
  text RoPE      token j at (s + j, s + j, s + j) on all three axes, s = the largest
                 max(h // 2, w // 2) over all image grids (target and references), i.e.
                 just past the largest positive image position;
  references     (Edit, Edit-2509 / 2511) extra image tokens after the target's, reference
                 i at frame index i + 1 with its own centred grid, as diffusers' img_shapes
                 [[target, ref_1, ...]] and ComfyUI's ref_latents_method "index" do; the
                 output holds the target tokens only.
Text tokens past each row's `context_lens` are batch padding, masked as attention
keys, so a padded batch gives each sample what it gets alone. (Padding never moves a
valid token's RoPE position: text positions count from s.)

Two places where ComfyUI's `process_img` / `_forward` (0.3.64) position tokens
differently from diffusers, whose positions this file follows (its transformer_qwenimage.py
carries the Qwen-Image team's copyright, i.e. their reference code): on an odd grid ComfyUI centres rows (columns) at
r - floor(h / 2), one higher than diffusers, and it starts the text at s of the target
grid alone, ignoring larger references. Even grids with references no larger than the
target are positioned identically by both.

Timestep convention: the engine's sigma is the model's timestep (diffusers' pipelines
pass scheduler timestep / 1000 = sigma; ComfyUI's ModelSamplingFlux gives sigma), scaled
by 1000 inside the sinusoidal embedding. The network predicts the flow velocity
noise - x0 (ComfyUI's CONST sampling: x0 = x - sigma * output), the engine's target, so
no conversion is needed.

zero_cond_t (Qwen-Image-Edit-2511; diffusers' `zero_cond_t`, the "index_timestep_zero"
reference method of ComfyUI releases after 0.3.64): the reference tokens' adaLN (img_mod)
reads the embedding of t = 0, the target tokens' that of sigma; the text stream and the
final layer read sigma's. Without references this is the plain model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .flux import TIME_FEATURES, clamp_fp16, joint_attention, layer_norm, modulate, rope_rotations, timestep_embedding
from .patches import patchify, unpatchify
from .zimage import RMSNorm

NORM_EPS = 1e-6  # every RMSNorm and LayerNorm of the model
MLP_RATIO = 4  # GELU(tanh) MLP hidden width = 4 * hidden


@dataclass
class QwenImageConfig:
    """Defaults: the released Qwen-Image (20B). Names follow ComfyUI's QwenImageTransformer2DModel args."""

    in_channels: int = 16  # latent channels (Wan 2.1 VAE, one frame); tokens pack 2x2 -> 64 features
    patch_size: int = 2
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128  # hidden = num_heads * head_dim = 3072
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B text-state width
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])  # RoPE split of head_dim: frame, row, col
    theta: int = 10000
    zero_cond_t: bool = False  # Qwen-Image-Edit-2511: reference tokens modulated at t = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.patch_size**2

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent value and the fix."""
        for name in ("in_channels", "patch_size", "num_heads", "head_dim", "joint_attention_dim", "theta"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.num_layers < 0:
            raise ValueError(f"num_layers = {self.num_layers} must not be negative")
        if len(self.axes_dim) != 3:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} has {len(self.axes_dim)} entries; Qwen-Image positions "
                "tokens on 3 axes (frame, row, col), e.g. [16, 56, 56]"
            )
        if sum(self.axes_dim) != self.head_dim or any(dim < 2 or dim % 2 for dim in self.axes_dim):
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must be even sizes summing to head_dim {self.head_dim}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# --- positions ----------------------------------------------------------------


def image_positions(grid_h: int, grid_w: int, frame: int, device: torch.device) -> torch.Tensor:
    """(grid_h * grid_w, 3) RoPE positions (frame, row, col), row-major like the tokens.

    Rows and columns are centred as diffusers' QwenEmbedRope(scale_rope=True): row r of
    h sits at r - ceil(h / 2), e.g. h = 3 -> -2, -1, 0 and h = 4 -> -2, -1, 0, 1.
    """
    rows = torch.arange(grid_h, device=device) - (grid_h - grid_h // 2)
    cols = torch.arange(grid_w, device=device) - (grid_w - grid_w // 2)
    positions = torch.empty(grid_h, grid_w, 3, device=device)
    positions[..., 0] = frame
    positions[..., 1] = rows[:, None]
    positions[..., 2] = cols[None, :]
    return positions.flatten(0, 1)


def text_positions(n_tokens: int, start: int, device: torch.device) -> torch.Tensor:
    """(n_tokens, 3) RoPE positions: token j at start + j on every axis."""
    return (start + torch.arange(n_tokens, device=device, dtype=torch.float32))[:, None].expand(-1, 3)


def text_start(grids: list[tuple[int, int]]) -> int:
    """The first text position: past the largest positive image position, over all grids (diffusers)."""
    return max(max(grid_h // 2, grid_w // 2) for grid_h, grid_w in grids)


# --- modulation over target / reference tokens ---------------------------------


def modulate_image(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, n_target: int | None) -> torch.Tensor:
    """x * (1 + scale) + shift over image tokens x (B, N, D).

    n_target None: shift / scale (B, 1, D) for every token. Otherwise (zero_cond_t) they
    are (2, B, 1, D): [0] for the target tokens x[:, :n_target], [1] (t = 0) for the references.
    """
    if n_target is None:
        return modulate(x, shift, scale)
    target = modulate(x[:, :n_target], shift[0], scale[0])
    references = modulate(x[:, n_target:], shift[1], scale[1])
    return torch.cat([target, references], dim=1)


def gate_image(gate: torch.Tensor, x: torch.Tensor, n_target: int | None) -> torch.Tensor:
    """gate * x, with gate split over target / reference tokens as in modulate_image."""
    if n_target is None:
        return gate * x
    return torch.cat([gate[0] * x[:, :n_target], gate[1] * x[:, n_target:]], dim=1)


# --- blocks ---------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FEATURES, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class QwenTimestepProjEmbeddings(nn.Module):
    """sigma (B,) -> temb (B, hidden): sinusoidal [cos | sin] of 1000 * sigma, then an MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(hidden_size)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(sigma).to(dtype))


class GELU(nn.Module):
    """Projection then tanh-approximate GELU (ComfyUI's / diffusers' `net.0`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a Dropout(0) in ComfyUI and diffusers; an Identity keeps net.2's index.
        self.net = nn.ModuleList([GELU(dim, MLP_RATIO * dim), nn.Identity(), nn.Linear(MLP_RATIO * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Attention(nn.Module):
    """Per-stream q/k/v projections and RMS qk-norms; one joint attention over [text, image]."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.to_q = nn.Linear(hidden, hidden)
        self.to_k = nn.Linear(hidden, hidden)
        self.to_v = nn.Linear(hidden, hidden)
        self.add_q_proj = nn.Linear(hidden, hidden)
        self.add_k_proj = nn.Linear(hidden, hidden)
        self.add_v_proj = nn.Linear(hidden, hidden)
        self.norm_q = RMSNorm(cfg.head_dim, NORM_EPS)
        self.norm_k = RMSNorm(cfg.head_dim, NORM_EPS)
        self.norm_added_q = RMSNorm(cfg.head_dim, NORM_EPS)
        self.norm_added_k = RMSNorm(cfg.head_dim, NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden)])  # ComfyUI's to_out.1 is a Dropout(0)
        self.to_add_out = nn.Linear(hidden, hidden)
        self.backend = "auto"

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, H, D)."""
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        rotations: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, hidden), txt (B, T, hidden); rotations for [text, image] -> (img_out, txt_out)."""
        img_q = self.norm_q(self.heads(self.to_q(img)))
        img_k = self.norm_k(self.heads(self.to_k(img)))
        txt_q = self.norm_added_q(self.heads(self.add_q_proj(txt)))
        txt_k = self.norm_added_k(self.heads(self.add_k_proj(txt)))
        out = joint_attention(
            torch.cat([txt_q, img_q], dim=1),
            torch.cat([txt_k, img_k], dim=1),
            torch.cat([self.heads(self.add_v_proj(txt)), self.heads(self.to_v(img))], dim=1),
            rotations,
            key_mask,
            self.backend,
        )  # (B, T + N, hidden)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class QwenImageTransformerBlock(nn.Module):
    """Dual-stream block: adaLN (shift, scale, gate) x 2 per stream around joint attention and an MLP."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.img_mlp = FeedForward(hidden)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.txt_mlp = FeedForward(hidden)
        self.attn = Attention(cfg)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rotations: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        n_target: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, hidden), txt (B, T, hidden) -> updated (img, txt).

        temb: (B, hidden); or with n_target (zero_cond_t) (2, B, hidden) = the embeddings of
        sigma and of t = 0: image tokens from n_target on (the references) take the second,
        the target tokens and the text stream the first.
        """
        img_params = self.img_mod(temb)[..., None, :]  # (B, 1, 6 hidden) or (2, B, 1, 6 hidden)
        txt_params = self.txt_mod(temb if n_target is None else temb[0])[:, None, :]
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_params.chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_params.chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            modulate_image(layer_norm(img), img_shift1, img_scale1, n_target),
            modulate(layer_norm(txt), txt_shift1, txt_scale1),
            rotations,
            key_mask,
        )
        img = img + gate_image(img_gate1, img_attn, n_target)
        txt = txt + txt_gate1 * txt_attn

        img_mlp = self.img_mlp(modulate_image(layer_norm(img), img_shift2, img_scale2, n_target))
        img = img + gate_image(img_gate2, img_mlp, n_target)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2))
        return clamp_fp16(img), clamp_fp16(txt)


class LastLayer(nn.Module):
    """Final adaLN: silu(temb) -> (scale, shift), scale first (diffusers' AdaLayerNormContinuous)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


# --- the model ---------------------------------------------------------------------


class QwenImageDiT(nn.Module):
    """Qwen-Image / Qwen-Image-Edit transformer; `forward(x, sigma, context, context_lens, ...)` -> noise - x0."""

    architecture = "qwen_image"
    conditioning_fields: tuple[str, ...] = ("reference_latents",)  # text states besides (conditioning.py)

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.img_in = nn.Linear(cfg.patch_features, hidden)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, NORM_EPS)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, hidden)
        self.time_text_embed = QwenTimestepProjEmbeddings(hidden)
        self.transformer_blocks = nn.ModuleList(QwenImageTransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = LastLayer(hidden)
        self.proj_out = nn.Linear(hidden, cfg.patch_features)
        self.gradient_checkpointing = False

    def set_attention_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def _run(self, block: QwenImageTransformerBlock, *args) -> tuple[torch.Tensor, torch.Tensor]:
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

    def check_latents(self, name: str, latents: torch.Tensor, batch: int) -> None:
        if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"{name} has shape {tuple(latents.shape)}; expected ({batch}, {self.cfg.in_channels}, h, w): "
                "one-frame model-space latents (drop the Wan VAE's frame axis), the batch of x"
            )

    def text_key_mask(self, context_lens: torch.Tensor | None, batch: int, n_txt: int, n_img: int,
                      device: torch.device) -> torch.Tensor | None:
        """(B, T + N) bool key mask, True = attend, or None when no text token is padding."""
        if context_lens is None:
            return None
        lens = context_lens.to(device)
        if lens.shape != (batch,) or int(lens.min()) < 0 or int(lens.max()) > n_txt:
            raise ValueError(
                f"context_lens {lens.tolist()} must hold {batch} values in 0..{n_txt} (the context's token count)"
            )
        txt_valid = torch.arange(n_txt, device=device)[None, :] < lens[:, None]  # (B, T)
        if txt_valid.all():
            return None
        return torch.cat([txt_valid, txt_valid.new_ones(batch, n_img)], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        context_lens: torch.Tensor | None = None,
        reference_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching target.

        x: noisy latents (B, in_channels, H, W), any H, W (padded to the patch size, cropped back).
        sigma: noise level per sample (B,), 0 = clean, 1 = pure noise; the model's own timestep.
        context: Qwen2.5-VL text states (B, L, joint_attention_dim), zero past each length.
        context_lens: valid text tokens per sample (B,); None means all L.
        reference_latents: list of (B, in_channels, h_i, w_i) latents of the images to edit
            (Qwen-Image-Edit), any sizes; reference i is image frame i + 1.
        Returns noise - x0, shape (B, in_channels, H, W), for the target tokens only.
        """
        cfg = self.cfg
        self.check_latents("x", x, x.shape[0])
        b, _, h, w = x.shape
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)}, expected ({b}, L, {cfg.joint_attention_dim}): "
                "Qwen2.5-VL text states, as ComfyUI's Qwen-Image text encoder gives them"
            )
        device, n_txt = x.device, context.shape[1]

        img, grid_h, grid_w = self.patchify(x)
        n_target = img.shape[1]
        tokens, grids = [img], [(grid_h, grid_w)]
        for i, ref in enumerate(reference_latents or []):
            self.check_latents(f"reference_latents[{i}]", ref, b)
            ref_tokens, ref_h, ref_w = self.patchify(ref.to(x.dtype))
            tokens.append(ref_tokens)
            grids.append((ref_h, ref_w))
        img = torch.cat(tokens, dim=1)
        positions = torch.cat(
            [text_positions(n_txt, text_start(grids), device)]
            + [image_positions(gh, gw, frame, device) for frame, (gh, gw) in enumerate(grids)]
        )
        rotations = rope_rotations(positions, cfg.axes_dim, cfg.theta)
        key_mask = self.text_key_mask(context_lens, b, n_txt, img.shape[1], device)

        sigma = sigma.to(device=device, dtype=torch.float32).reshape(-1).expand(b)
        split = n_target if cfg.zero_cond_t and len(grids) > 1 else None
        if split is None:
            temb = self.time_text_embed(sigma, x.dtype)  # (B, hidden)
        else:
            temb = self.time_text_embed(torch.cat([sigma, torch.zeros_like(sigma)]), x.dtype).unflatten(0, (2, b))

        img = self.img_in(img)
        txt = self.txt_in(self.txt_norm(context.to(x.dtype)))
        for block in self.transformer_blocks:
            img, txt = self._run(block, img, txt, temb, rotations, key_mask, split)

        out = self.proj_out(self.norm_out(img[:, :n_target], temb if split is None else temb[0]))
        return self.unpatchify(out, grid_h, grid_w, h, w)
