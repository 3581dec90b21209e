"""Z-Image (Turbo / Base) diffusion transformer, with ComfyUI's module names.

Single-stream DiT: image tokens pass `noise_refiner` blocks (timestep-modulated),
caption tokens pass `context_refiner` blocks (unmodulated), then the joint
sequence [image, caption] passes the main `layers`. Blocks use adaLN scale/tanh-gate
modulation with sandwich RMSNorms, SwiGLU feed-forward, per-head RMS qk-norm and a
3-axis RoPE over (sequence, row, column) positions.

Module paths match ComfyUI's `comfy/ldm/lumina/model.py`, so adapter keys need no
renaming: `layers.N.attention.qkv` (fused q|k|v), `layers.N.attention.out`,
`layers.N.attention.q_norm / k_norm`, `layers.N.feed_forward.w1|w2|w3`,
`layers.N.adaLN_modulation.0`, `x_embedder`, `final_layer.linear`, ...

Token layout follows the reference implementation (diffusers
`ZImageTransformer2DModel`, Tongyi-MAI's release) exactly, because the model attends
to its own padding: each caption is padded to a multiple of 32 with `cap_pad_token`,
the image tokens likewise with `x_pad_token`, and those pad tokens are attended to.
Caption token i sits at RoPE position (1 + i, 0, 0); image patch (h, w) at
(padded caption length + 1, h, w); image pad tokens at (0, 0, 0).

Timestep convention: the network itself sees t = 1 - sigma (1 = clean) and predicts
x0 - noise. `ZImageDiT.forward` converts, so the engine sees the shared contract:
sigma in, flow-matching target `noise - x0` out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...kernels.attention import attention

SEQ_MULTIPLE = 32  # caption and image token counts are padded to this
ADALN_MAX_DIM = 256  # modulation input width is min(dim, 256)


# Turbo (8-step distilled) and Base share every shape, so the variant comes from a hint: the
# checkpoint's `variant` metadata, else its file name (the released files say which they are).
ZIMAGE_VARIANTS = ("zimage-turbo", "zimage-base")


def zimage_variant(file_name: str, metadata: dict | None = None) -> str:
    """'zimage-turbo', 'zimage-base', or 'zimage' when neither the metadata nor the name tells."""
    hint = str((metadata or {}).get("variant", "")).lower()
    if hint in ZIMAGE_VARIANTS:
        return hint
    name = file_name.lower()
    for variant in ZIMAGE_VARIANTS:
        if variant.split("-")[1] in name:
            return variant
    return "zimage"


def default_axes_dims(head_dim: int) -> list[int]:
    """RoPE split of a head over (sequence, row, column); Z-Image's own is [32, 48, 48] for 128."""
    if head_dim == 128:
        return [32, 48, 48]
    spatial = (3 * head_dim // 8) // 2 * 2
    return [head_dim - 2 * spatial, spatial, spatial]


@dataclass
class ZImageConfig:
    """Architecture hyper-parameters (defaults: the released Z-Image Turbo / Base)."""

    in_channels: int = 16  # latent channels (Flux VAE: 16)
    patch_size: int = 2
    dim: int = 3840  # hidden width
    n_layers: int = 30  # main single-stream blocks
    n_refiner_layers: int = 2  # blocks in each of noise_refiner / context_refiner
    n_heads: int = 30
    ffn_dim: int = 10240  # SwiGLU hidden width, int(dim / 3 * 8)
    cap_feat_dim: int = 2560  # text-encoder hidden size (Qwen3-4B)
    t_freq_dim: int = 256  # sinusoidal timestep features
    t_mid_dim: int = 1024  # timestep MLP hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list[int] = field(default_factory=lambda: [32, 48, 48])

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_MAX_DIM)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, result in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of t [B] -> [B, dim], fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def rope_angles(positions: torch.Tensor, axes_dims: list[int], theta: float) -> torch.Tensor:
    """Complex rotations for integer positions [B, L, 3] -> [B, L, head_dim / 2] (complex64).

    Angles are formed in float64 and rounded once to fp32, as the reference's tables are.
    """
    parts = []
    for axis, axis_dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device) / axis_dim))
        angles = (positions[..., axis].double()[..., None] * inv_freq).float()
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, H, D] by rotations [B, L, D/2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations[:, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim // n_heads, eps=norm_eps)
        self.k_norm = RMSNorm(dim // n_heads, eps=norm_eps)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)  # each (B, L, H, D)
        q = apply_rope(self.q_norm(q), rotations)
        k = apply_rope(self.k_norm(k), rotations)
        return self.out(attention(q, k, v, key_mask, backend=self.backend).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Sandwich-norm transformer block; with `modulation` the timestep scales and gates it."""

    def __init__(self, cfg: ZImageConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim)) if modulation else None

    def forward(
        self,
        x: torch.Tensor,
        rotations: torch.Tensor,
        key_mask: torch.Tensor | None,
        timestep_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rotations, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(timestep_emb).unsqueeze(1).chunk(4, dim=2)
        attn_out = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), rotations, key_mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn_out)
        ffn_out = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn_out)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: torch.Tensor, timestep_emb: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(timestep_emb).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)


def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class ZImageDiT(nn.Module):
    """Z-Image transformer; `forward(x, sigma, context, context_lens)` -> noise - x0."""

    architecture = "zimage"
    conditioning_fields: tuple[str, ...] = ()  # text states only (conditioning.py)

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        if sum(cfg.axes_dims) != cfg.head_dim:
            raise ValueError(f"RoPE axes_dims {cfg.axes_dims} must sum to head_dim {cfg.head_dim}")
        self.cfg = cfg
        patch_features = cfg.patch_size * cfg.patch_size * cfg.in_channels
        self.x_embedder = nn.Linear(patch_features, cfg.dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg.t_freq_dim, cfg.t_mid_dim, cfg.adaln_dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(Block(cfg, modulation=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(Block(cfg, modulation=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg, patch_features)
        self.gradient_checkpointing = False

    def set_attention_backend(self, backend: str) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def _run(self, block: Block, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], features ordered (ph, pw, c)."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = tokens.shape[0]
        p, c = self.cfg.patch_size, self.cfg.in_channels
        x = tokens.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        context_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching target.

        x: noisy latents (B, C, H, W), H and W divisible by the patch size.
        sigma: noise level per sample (B,), 0 = clean, 1 = pure noise.
        context: text-encoder hidden states (B, L, cap_feat_dim), zero past each length.
        context_lens: valid caption tokens per sample (B,); None means all L.
        Returns noise - x0, shape (B, C, H, W).
        """
        cfg = self.cfg
        b, _, h, w = x.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch size {cfg.patch_size}")
        device = x.device
        timestep_emb = self.t_embedder((1.0 - sigma.float()) * cfg.t_scale).to(x.dtype)  # (B, adaln_dim)

        # Image tokens, padded to a multiple of 32 with x_pad_token (attended to, not masked).
        grid_h, grid_w = h // cfg.patch_size, w // cfg.patch_size
        n_img = grid_h * grid_w
        n_img_padded = padded(n_img)
        img = self.x_embedder(self.patchify(x))  # (B, n_img, dim)
        img = torch.cat([img, self.x_pad_token.to(img.dtype).expand(b, n_img_padded - n_img, -1)], dim=1)

        # Caption tokens: each padded to its own multiple of 32 with cap_pad_token; batch padding masked.
        n_ctx = context.shape[1]
        lens = torch.full((b,), n_ctx, device=device) if context_lens is None else context_lens.to(device)
        if int(lens.max()) > n_ctx or int(lens.min()) < 1:
            raise ValueError(f"context_lens {lens.tolist()} must lie in 1..{n_ctx} (the context's token count)")
        cap_padded_lens = [padded(int(n)) for n in lens.tolist()]
        n_cap = max(cap_padded_lens)
        cap = self.cap_embedder(context.to(x.dtype))
        cap = F.pad(cap, (0, 0, 0, max(0, n_cap - n_ctx)))[:, :n_cap]
        token_index = torch.arange(n_cap, device=device)
        is_cap_pad = token_index[None, :] >= lens[:, None]  # (B, n_cap)
        cap = torch.where(is_cap_pad[..., None], self.cap_pad_token.to(cap.dtype), cap)
        cap_valid = token_index[None, :] < torch.tensor(cap_padded_lens, device=device)[:, None]
        cap_mask = None if cap_valid.all() else cap_valid

        # RoPE positions (sequence, row, column).
        cap_pos = torch.zeros(b, n_cap, 3, dtype=torch.long, device=device)
        cap_pos[..., 0] = token_index + 1
        rows, cols = torch.meshgrid(
            torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij"
        )
        img_pos = torch.zeros(b, n_img_padded, 3, dtype=torch.long, device=device)
        img_pos[:, :n_img, 0] = torch.tensor(cap_padded_lens, device=device)[:, None] + 1
        img_pos[:, :n_img, 1] = rows.flatten()
        img_pos[:, :n_img, 2] = cols.flatten()
        img_rot = rope_angles(img_pos, cfg.axes_dims, cfg.rope_theta)
        cap_rot = rope_angles(cap_pos, cfg.axes_dims, cfg.rope_theta)

        for block in self.noise_refiner:
            img = self._run(block, img, img_rot, None, timestep_emb)
        for block in self.context_refiner:
            cap = self._run(block, cap, cap_rot, cap_mask)

        joint = torch.cat([img, cap], dim=1)
        joint_rot = torch.cat([img_rot, cap_rot], dim=1)
        joint_mask = None
        if cap_mask is not None:
            joint_mask = torch.cat([torch.ones(b, n_img_padded, dtype=torch.bool, device=device), cap_mask], dim=1)
        for block in self.layers:
            joint = self._run(block, joint, joint_rot, joint_mask, timestep_emb)

        out = self.final_layer(joint[:, :n_img], timestep_emb)
        x0_minus_noise = self.unpatchify(out, h, w)
        return -x0_minus_noise
