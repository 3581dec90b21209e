"""The adapter network: which layers get an adapter, the adapters, and their optimizer view.

Selection rules (targets.py): the architecture's default targets minus its default
excludes and `exclude_patterns`, plus `include_patterns` (include overrides exclude),
regex fullmatch on ComfyUI's dotted module names; per-layer rank / alpha from
`rank_pattern` / `alpha_pattern` (first fullmatch wins) or the defaults.

DoRA is applied to Linear layers only and is switched to plain LoRA, with one logged
line per reason, where it cannot be computed as a re-normalised weight: Conv layers,
network dropout, rank dropout and split q/k/v slices.

LoHa / LoKr (loha.py, lokr.py) adapt Linear and Conv layers alike. What is LoRA's alone
is refused with the reason: LoRA+ (it raises the lr of LoRA's up matrix B, which a
Hadamard or Kronecker product does not have), network dropout, split q/k/v slices and
orthogonal / PiSSA init.

Per-module learning rates (`lr_pattern`, regex -> multiplier, first fullmatch wins as
in `rank_pattern`): each parameter group holds the modules of one multiplier, named
"<group> x<multiplier>" (plain "<group>" at 1); LoRA+ multiplies on top for B.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..options import from_plain
from .conv_lora import LoRAConvModule
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import ALGOS as LORA_ALGOS
from .lora import DORA_AXES, INITS, LoRAModule
from .product_base import ProductAdapter
from .targets import Selection, first_match, module_kinds, select_modules, split_dims, value_patterns

log = logging.getLogger(__name__)

PRODUCT_ALGOS = ("loha", "lokr")
ALGOS = (*LORA_ALGOS, *PRODUCT_ALGOS)
# "factors": every parameter of a LoHa / LoKr adapter (they have no A / B roles).
PARAM_GROUP_NAMES = ("lora_A", "lora_B", "magnitude", "factors")


def _adapter_params(adapter: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The adapter's parameters by optimizer group name."""
    if isinstance(adapter, ProductAdapter):
        return {"factors": list(adapter.parameters())}
    roles = {"lora_A": [adapter.lora_A], "lora_B": [adapter.lora_B]}
    if adapter.magnitude is not None:
        roles["magnitude"] = [adapter.magnitude]
    return roles


@dataclass
class NetworkConfig:
    """Adapter options; saved with every adapter file and checkpoint."""

    algo: str = "lora"  # lora | dora | loha | lokr
    rank: int = 16  # network_dim
    alpha: float = 1.0  # network_alpha; scale alpha / rank (not alpha = rank)
    use_rslora: bool = False  # scale alpha / sqrt(rank); alpha 0 means sqrt(rank)
    dora_axis: str = "input"  # input (ComfyUI dora_scale [1, in]) | output (PEFT / paper)
    init: str = "kaiming"  # kaiming | orthogonal | pissa
    dropout: float = 0.0  # network (neuron) dropout on A x
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_refiners: bool = False  # Z-Image: also adapt noise_refiner / context_refiner
    exclude_mod: bool = True  # leave modulation (adaLN) layers out
    include_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    loraplus_lr_ratio: float = 0.0  # LoRA+: B at lr * ratio; 0 or 1 = off
    conv_dim: int = 0  # rank for Conv layers; 0 leaves them out
    conv_alpha: float = 1.0
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> rank, first fullmatch wins
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha, first fullmatch wins
    split_qkv: bool = False  # separate LoRA per q / k / v slice of fused projections (kohya)
    lokr_factor: int = -1  # LoKr: size of the small Kronecker factor (LyCORIS factor; -1 = most balanced split)
    lokr_full_matrix: bool = False  # LoKr: train w2 as a full matrix even where the rank would decompose it
    lr_pattern: dict[str, float] = field(default_factory=dict)  # regex -> lr multiplier, first fullmatch wins
    verbose: bool = False  # log every adapted layer with rank and alpha, and the skipped ones

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo {self.algo!r} is not one of {ALGOS}")
        if self.dora_axis not in DORA_AXES:
            raise ValueError(f"dora_axis {self.dora_axis!r} is not one of {DORA_AXES}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not one of {INITS}")
        if self.rank < 1 or self.conv_dim < 0:
            raise ValueError(f"rank must be >= 1 and conv_dim >= 0 (got rank={self.rank}, conv_dim={self.conv_dim})")
        if self.loraplus_lr_ratio < 0:
            raise ValueError(f"loraplus_lr_ratio={self.loraplus_lr_ratio} must be >= 0 (0 or 1 turns LoRA+ off)")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lokr_factor={self.lokr_factor} must be -1 (most balanced split) or a positive integer")
        for pattern, multiplier in value_patterns(self.lr_pattern, "lr_pattern"):
            if not math.isfinite(multiplier):
                raise ValueError(f"lr_pattern {pattern.pattern!r}: multiplier {multiplier} must be a finite number")
        if self.algo in PRODUCT_ALGOS:
            self._check_product_options()

    def _check_product_options(self) -> None:
        """Refuse the options that only mean something for LoRA's two factors, with the reason."""
        refused = [
            (self.loraplus_lr_ratio not in (0.0, 1.0), "loraplus_lr_ratio",
             "LoRA+ raises the lr of LoRA's up matrix B, which a Hadamard / Kronecker product has no counterpart of; "
             "set loraplus_lr_ratio to 0 (lr_pattern sets per-module rates)"),
            (bool(self.dropout), "dropout",
             "network dropout acts on LoRA's rank-space activations A x, which LoHa / LoKr do not have (LyCORIS does "
             "not implement it either); use rank_dropout or module_dropout"),
            (self.split_qkv, "split_qkv", "q / k / v slices are LoRA-only; set split_qkv to false"),
            (self.init != "kaiming", f"init={self.init!r}",
             "LoHa / LoKr use LyCORIS's init (an exact no-op); set init to 'kaiming'"),
        ]
        for applies, option, reason in refused:
            if applies:
                raise ValueError(f"algo {self.algo!r} cannot use {option}: {reason}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NetworkConfig":
        return from_plain(cls, values, "network")


@dataclass(frozen=True)
class MaxNormStats:
    """What one max-norm pass did (kohya's keys_scaled / mean_norm / max_norm)."""

    keys_scaled: int
    mean_norm: float
    max_norm: float


def select(model: nn.Module, architecture: str, cfg: NetworkConfig) -> Selection:
    """The layers of `model` that `cfg` adapts (and those it skips, with reasons)."""
    return select_modules(
        module_kinds(model),
        architecture,
        rank=cfg.rank,
        alpha=cfg.alpha,
        conv_dim=cfg.conv_dim,
        conv_alpha=cfg.conv_alpha,
        exclude_mod=cfg.exclude_mod,
        train_refiners=cfg.train_refiners,
        include_patterns=cfg.include_patterns,
        exclude_patterns=cfg.exclude_patterns,
        rank_pattern=cfg.rank_pattern,
        alpha_pattern=cfg.alpha_pattern,
    )


def select_targets(model: nn.Module, architecture: str, cfg: NetworkConfig) -> list[str]:
    """Dotted names of the layers that get an adapter, in model order."""
    return select(model, architecture, cfg).names


def frobenius_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """||scale * up @ down||_F without the [out, in] product: sum((up^T up) * (down down^T))."""
    down2 = down.flatten(1).float()
    up2 = up.flatten(1).float()
    sq = ((up2.t() @ up2) * (down2 @ down2.t())).sum()
    return abs(scale) * math.sqrt(max(float(sq), 0.0))


class LoRANetwork(nn.Module):
    """All adapters of one model. Attach hooks them into the model's layer forwards."""

    def __init__(self, model: nn.Module, architecture: str, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        self.architecture = architecture
        selection = select(model, architecture, cfg)
        if not selection.chosen:
            raise ValueError(
                f"no layer of the {architecture} model matches the adapter targets; check include_patterns / "
                "exclude_patterns / rank_pattern (regex fullmatch on dotted names like 'layers.0.attention.qkv')"
            )
        modules = dict(model.named_modules())
        dora_off: dict[str, list[str]] = defaultdict(list)
        adapters = []
        for choice in selection.chosen:
            adapters.append(self._build_adapter(choice.name, modules[choice.name], choice.rank, choice.alpha, dora_off))
        self.names = selection.names
        self.adapters = nn.ModuleList(adapters)
        self.skipped = selection.skipped
        for reason, names in dora_off.items():
            log.warning("DoRA disabled on %d modules (plain LoRA there): %s", len(names), reason)
        self.lr_multipliers = self._lr_multipliers()
        log.info(
            "adapter network: %d modules (%s), rank %d, alpha %g%s",
            len(self.names),
            cfg.algo,
            cfg.rank,
            cfg.alpha,
            ", RS-LoRA" if cfg.use_rslora else "",
        )
        if cfg.verbose:
            for line in self.describe():
                log.info("%s", line)

    def _build_adapter(self, name: str, module: nn.Module, rank: int, alpha: float, dora_off: dict) -> nn.Module:
        cfg = self.cfg
        common = dict(
            use_rslora=cfg.use_rslora,
            init=cfg.init,
            dropout=cfg.dropout,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
        )
        if cfg.algo == "loha":
            return LoHaModule(name, module, rank, alpha, cfg.use_rslora, cfg.dropout, cfg.rank_dropout,
                              cfg.module_dropout)
        if cfg.algo == "lokr":
            return LoKrModule(name, module, rank, alpha, cfg.use_rslora, cfg.dropout, cfg.rank_dropout,
                              cfg.module_dropout, factor=cfg.lokr_factor, full_matrix=cfg.lokr_full_matrix)
        if not isinstance(module, nn.Linear):
            if cfg.algo == "dora":
                dora_off["Conv layer (DoRA is Linear-only)"].append(name)
            return LoRAConvModule(name, module, rank, alpha, **common)
        split = split_dims(self.architecture, name, module.out_features, module.in_features) if cfg.split_qkv else None
        algo = cfg.algo
        if algo == "dora":
            reasons = [
                reason
                for reason, applies in (
                    ("dropout is set", bool(cfg.dropout)),
                    ("rank_dropout is set", bool(cfg.rank_dropout)),
                    ("split_qkv splits the layer", split is not None),
                )
                if applies
            ]
            for reason in reasons:
                dora_off[reason].append(name)
            if reasons:
                algo = "lora"
        return LoRAModule(name, module, rank, alpha, algo=algo, dora_axis=cfg.dora_axis, split_dims=split, **common)

    def _lr_multipliers(self) -> dict[str, float]:
        """Each adapted module's lr multiplier from lr_pattern (first fullmatch; 1 where none matches)."""
        patterns = value_patterns(self.cfg.lr_pattern, "lr_pattern")
        multipliers = {}
        for name in self.names:
            found = first_match(patterns, name)
            multipliers[name] = 1.0 if found is None else found
        return multipliers

    def describe(self) -> list[str]:
        """One line per adapted layer (kind, rank, alpha, algo, lr multiplier) and per skipped layer (reason)."""
        lines = []
        for adapter in self.adapters:
            extra = f", split {adapter.split_dims}" if adapter.split_dims else ""
            if adapter.algo == "lokr":
                extra += f", w1 {tuple(adapter.lokr_w1.shape)}, w2 {'full' if adapter.full_w2 else 'decomposed'}"
            multiplier = self.lr_multipliers[adapter.name]
            extra += f", lr x{multiplier:g}" if multiplier != 1.0 else ""
            algo = f"dora ({adapter.dora_axis} axis)" if adapter.algo == "dora" else adapter.algo
            lines.append(
                f"adapted {adapter.name}: {adapter.kind}, rank {adapter.rank}, alpha {adapter.alpha:g}, {algo}{extra}"
            )
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return lines

    def module_lrs(self, lr: float) -> dict[str, dict[str, float]]:
        """The effective lr of each module's parameter groups at base lr `lr` (lr_pattern and LoRA+ applied)."""
        return {
            adapter.name: {
                group: self._group_lr(lr, group, self.lr_multipliers[adapter.name]) for group in _adapter_params(adapter)
            }
            for adapter in self.adapters
        }

    def by_name(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.adapters))

    def attach(self) -> "LoRANetwork":
        for adapter in self.adapters:
            adapter.attach()
        return self

    def detach_from_model(self) -> None:
        for adapter in self.adapters:
            adapter.detach_from_base()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters:
            adapter.multiplier = float(multiplier)

    def set_enabled(self, enabled: bool) -> None:
        for adapter in self.adapters:
            adapter.enabled = enabled

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups: lora_A, lora_B (at lr * loraplus_lr_ratio), magnitude, and the
        LoHa / LoKr factors, each split by lr_pattern multiplier ("lora_B x0.5": the modules at lr * 0.5).

        LoRA+ (Hayou et al. 2024, kohya's loraplus_lr_ratio): only the B ("up")
        matrices get the higher rate; A and the DoRA magnitudes keep the base lr.
        Empty groups are left out; with verbose, every module's effective lr is logged.
        """
        grouped: dict[tuple[str, float], list[nn.Parameter]] = {}
        for adapter in self.adapters:
            for group, params in _adapter_params(adapter).items():
                key = (group, self.lr_multipliers[adapter.name])
                grouped.setdefault(key, []).extend(p for p in params if p.requires_grad)
        order = sorted(grouped, key=lambda key: PARAM_GROUP_NAMES.index(key[0]))  # stable: multipliers keep model order
        groups = []
        for group, multiplier in order:
            if not grouped[(group, multiplier)]:
                continue
            name = group if multiplier == 1.0 else f"{group} x{multiplier:g}"
            groups.append({"params": grouped[(group, multiplier)], "lr": self._group_lr(lr, group, multiplier),
                           "name": name})
        if self.cfg.verbose:
            for module, lrs in self.module_lrs(lr).items():
                log.info("lr %s: %s", module, ", ".join(f"{group} {value:.4g}" for group, value in lrs.items()))
        return groups

    def _group_lr(self, lr: float, group: str, multiplier: float) -> float:
        """LoRA+ (B only) on top of the module's lr_pattern multiplier."""
        ratio = self.cfg.loraplus_lr_ratio if self.cfg.loraplus_lr_ratio > 0 else 1.0
        return lr * multiplier * (ratio if group == "lora_B" else 1.0)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormStats:
        """kohya's max-norm regularisation (scale_weight_norms), after an optimizer step.

        Per adapter: norm = ||s B A||_F (clamped below at max_norm / 2 to avoid 0 / 0),
        ratio = min(norm, max_norm) / norm, and A and B are both scaled by sqrt(ratio);
        LoHa / LoKr: norm = ||s dW||_F and the first factor scaled by ratio.
        Returns the number of adapters scaled and the mean / max norm after scaling.
        """
        if max_norm <= 0:
            raise ValueError(f"scale_weight_norms={max_norm} must be > 0")
        keys_scaled, norms = 0, []
        for adapter in self.adapters:
            if adapter.init == "pissa":
                raise ValueError(
                    f"{adapter.name}: scale_weight_norms would shrink the principal part that init='pissa' moved "
                    "into the adapter; use init='kaiming' or turn scale_weight_norms off"
                )
            product = isinstance(adapter, ProductAdapter)
            norm = float(adapter.delta_weight().norm()) if product else frobenius_norm(*adapter.export_factors(),
                                                                                          adapter.scale)
            clamped = max(norm, max_norm / 2)
            ratio = min(clamped, max_norm) / clamped
            if ratio != 1.0:
                keys_scaled += 1
                if product:  # dW is linear in its first factor (LyCORIS scales a scalar on it)
                    getattr(adapter, adapter.FILE_KEYS[0]).mul_(ratio)
                else:
                    adapter.lora_A.mul_(math.sqrt(ratio))
                    adapter.lora_B.mul_(math.sqrt(ratio))
            norms.append(norm * ratio)
        return MaxNormStats(keys_scaled, sum(norms) / len(norms), max(norms))

    @torch.no_grad()
    def copy_from(self, other: "LoRANetwork") -> None:
        mine, theirs = self.state_dict(), other.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("copy_from: the two networks adapt different layers or options; build them with one config")
        for key, tensor in mine.items():
            tensor.copy_(theirs[key])


def seeded_network(model: nn.Module, architecture: str, cfg: NetworkConfig, seed: int) -> LoRANetwork:
    """A network whose random init depends on `seed` alone: the same run settings give the same
    adapter, and the caller's global RNG stream is left where it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LoRANetwork(model, architecture, cfg)
