"""The adapter network: which Linear layers get an adapter, and the adapters themselves.

Targets are chosen on dotted module names (ComfyUI's paths) with regex fullmatch:
the architecture's default targets, minus its default excludes, minus
`exclude_patterns`, plus `include_patterns` (include overrides exclude).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .lora import LoRAModule

log = logging.getLogger(__name__)

# Per architecture: (default targets, default excludes). Modulation layers (adaLN) are
# excluded by default, as in musubi-tuner; `exclude_mod=False` trains them too.
ARCH_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "zimage": (
        [r"layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"],
        [r".*adaLN_modulation.*"],
    ),
}
ZIMAGE_REFINERS = r"(noise|context)_refiner\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
MODULATION = r".*adaLN_modulation.*"


@dataclass
class NetworkConfig:
    """Adapter options; saved with every adapter file and checkpoint."""

    algo: str = "lora"  # lora | dora
    rank: int = 16
    alpha: float = 1.0
    use_rslora: bool = False
    dora_axis: str = "input"  # input (ComfyUI dora_scale [1, in]) | output (PEFT / paper)
    init: str = "kaiming"
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_refiners: bool = False  # Z-Image: also adapt noise_refiner / context_refiner
    exclude_mod: bool = True
    include_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fullmatch_any(patterns: list[str], name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def select_targets(model: nn.Module, architecture: str, cfg: NetworkConfig) -> list[str]:
    """Dotted names of the Linear layers that get an adapter, in model order."""
    if architecture not in ARCH_TARGETS:
        raise ValueError(f"no adapter targets defined for architecture {architecture!r}; known: {sorted(ARCH_TARGETS)}")
    targets, excludes = ARCH_TARGETS[architecture]
    targets = list(targets)
    excludes = [p for p in excludes if cfg.exclude_mod or p != MODULATION]
    if not cfg.exclude_mod:
        targets.append(MODULATION)
    if architecture == "zimage" and cfg.train_refiners:
        targets.append(ZIMAGE_REFINERS)
    excludes += cfg.exclude_patterns
    for pattern in cfg.include_patterns + cfg.exclude_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid include/exclude regex {pattern!r}: {err}") from err
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _fullmatch_any(cfg.include_patterns, name) or (
            _fullmatch_any(targets, name) and not _fullmatch_any(excludes, name)
        ):
            selected.append(name)
    if not selected:
        raise ValueError(
            f"no Linear layer of the {architecture} model matches the adapter targets; "
            "check include_patterns / exclude_patterns (regex fullmatch on dotted names like 'layers.0.attention.qkv')"
        )
    return selected


class LoRANetwork(nn.Module):
    """All adapters of one model. Attach hooks them into the model's Linear forwards."""

    def __init__(self, model: nn.Module, architecture: str, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        self.architecture = architecture
        self.names = select_targets(model, architecture, cfg)
        modules = dict(model.named_modules())
        self.adapters = nn.ModuleList(
            LoRAModule(
                name,
                modules[name],
                rank=cfg.rank,
                alpha=cfg.alpha,
                algo=cfg.algo,
                dora_axis=cfg.dora_axis,
                use_rslora=cfg.use_rslora,
                init=cfg.init,
                dropout=cfg.dropout,
                rank_dropout=cfg.rank_dropout,
                module_dropout=cfg.module_dropout,
            )
            for name in self.names
        )
        log.info("adapter network: %d %s modules, rank %d, alpha %g", len(self.names), cfg.algo, cfg.rank, cfg.alpha)

    def by_name(self) -> dict[str, LoRAModule]:
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
        """Optimizer parameter groups (one group; LoRA+ ratios come with the full option set)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    @torch.no_grad()
    def copy_from(self, other: "LoRANetwork") -> None:
        for mine, theirs in zip(self.parameters(), other.parameters()):
            mine.copy_(theirs)
