"""A training adapter: a LoRA merged into the base while training steps run, never exported.

A LoRA trained directly on a distilled base (Z-Image Turbo, Flux.1 schnell) breaks its
few-step sampling. ai-toolkit's answer (ostris' schnell and Z-Image Turbo training
adapters) is a LoRA that undoes the distillation: it is on while the new LoRA trains,
so the new LoRA learns the concept and not the undistillation, and off for samples, so
previews show what the user gets later: the distilled base plus the new LoRA.

The file is any LoRA / DoRA file importer.py reads (options from
file_config.config_for_file). It is merged into the weights of the layers it touches
exactly as ComfyUI's LoraLoader merges at strength s (model_patcher.patch_weight_to_device
+ LoRAAdapter.calculate_weight), in float32 and rounded to the weight's dtype:
    LoRA:  W = W0 + (s * alpha / r) * up @ down
    DoRA:  W = W0 + s * (W_dora - W0)   (W_dora itself at s = 1)
    LoHa / LoKr:  W = W0 + s * (alpha / r) * dW   (ComfyUI's LoHaAdapter / LoKrAdapter)
The original weights are kept on the CPU (as ComfyUI keeps its backups) and copied back
on every exit, so the base comes back bit for bit; nothing is subtracted, which would
not round-trip in floating point.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .. import signals
from .file_config import config_for_file
from .importer import load_adapter_into, shown
from .lora import weight_scale_of
from .network import LoRANetwork

log = logging.getLogger(__name__)

SETTINGS_KEY = "training_adapter"  # run settings: another training adapter is another run
METADATA_KEY = "dit_trainer_training_adapter"  # adapter files: which one the LoRA was trained with
MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # ComfyUI rounds these to nearest
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """Short sha256 of a file's bytes: the same adapter under another name is the same run."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class TrainingAdapter:
    """The LoRA file at `path`, to merge into `model` at `strength` while training (see the module docstring)."""

    def __init__(self, model: nn.Module, architecture: str, path: str | os.PathLike, strength: float = 1.0):
        self.path = Path(path)
        self.strength = float(strength)
        if not math.isfinite(self.strength):
            raise ValueError(f"training adapter strength must be a finite number, got {strength!r}")
        cfg = config_for_file(model, architecture, self.path)
        with torch.random.fork_rng():  # the unused fresh init of the factors must not move the caller's RNG
            self.network = LoRANetwork(model, architecture, cfg)
        load_adapter_into(self.network, self.path)
        self.network.requires_grad_(False)
        unmergeable = [a.name for a in self.network.adapters
                       if a.base.weight.dtype not in MERGEABLE_DTYPES or weight_scale_of(a.base) is not None]
        if unmergeable:
            raise ValueError(
                f"training adapter {self.path.name}: layers {shown(unmergeable)} store quantised weights, which "
                "cannot hold the merged change; load the base in bf16, fp16 or fp32"
            )
        self.digest = file_digest(self.path)
        self._originals: dict[str, torch.Tensor] = {}  # layer -> its weight before merging, on the CPU
        self._merged: set[str] = set()  # layers that hold the merged weight now
        log.info("training adapter %s: %d layers, merged at strength %g while training, off for previews",
                 self.path.name, len(self.network.names), self.strength)

    @property
    def names(self) -> list[str]:
        """The layers it is merged into."""
        return self.network.names

    def identity(self) -> dict:
        """What a run records: the file's contents and the strength."""
        return {"sha256": self.digest, "strength": self.strength}

    def recorded_in(self, settings: dict) -> dict:
        """Run settings (run_settings.run_settings) that also hold this training adapter."""
        return {**settings, SETTINGS_KEY: self.identity()}

    def metadata(self) -> dict:
        """Adapter-file metadata naming the training adapter (the file itself holds none of its tensors)."""
        return {METADATA_KEY: {"file": self.path.name, **self.identity()}}

    def check_trainable(self, trainable: nn.Module) -> None:
        """Refuse what a merged base would silently break.

        A trained base weight would be overwritten by the restore. A DoRA layer normalises
        by the live weight, so the merged change would be normalised away while training
        and leak into the exported magnitudes.
        """
        trained = [a.name for a in self.network.adapters if a.base.weight.requires_grad]
        if trained:
            raise ValueError(
                f"training adapter {self.path.name} is merged into frozen base weights, but {shown(trained)} are "
                "trained themselves; train an adapter network on the frozen base instead"
            )
        dora = [a.name for a in getattr(trainable, "adapters", ()) if a.algo == "dora" and a.name in self.names]
        if dora:
            raise ValueError(
                f"training adapter {self.path.name} is merged into layers the network adapts with DoRA "
                f"({shown(dora)}), whose magnitudes would absorb it; use algo='lora', or leave those layers out "
                "with exclude_patterns"
            )

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """The base holds W0 + s dW inside; the original weights come back bit for bit on any exit."""
        try:
            self._merge()
            yield
        finally:
            self._restore()
            self._originals.clear()

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """Inside `merged`: the plain base (for previews), merged again afterwards."""
        self._restore()
        try:
            yield
        finally:
            self._merge()

    @torch.no_grad()
    def _merge(self) -> None:
        for adapter in self.network.adapters:
            weight = adapter.base.weight
            adapter.to(weight.device)  # the model may have moved since the file was read
            merged = self._merged_weight(adapter)  # from the live weight, which is the original here
            if adapter.name not in self._originals:
                self._originals[adapter.name] = weight.detach().to("cpu", copy=True)
            weight.copy_(merged)
            self._merged.add(adapter.name)

    @torch.no_grad()
    def _restore(self) -> None:
        with signals.protected():  # a second Ctrl-C must not leave the base half merged
            for adapter in self.network.adapters:
                if adapter.name in self._merged:
                    adapter.base.weight.copy_(self._originals[adapter.name])
                    self._merged.discard(adapter.name)

    def _merged_weight(self, adapter: nn.Module) -> torch.Tensor:
        """ComfyUI's merge of one layer: float32, the file's patch at this strength, rounded to the weight's dtype."""
        weight = adapter.base.weight
        base = weight.float()
        if adapter.algo == "dora":
            dora = adapter.adapted_weight()
            merged = dora if self.strength == 1.0 else base + self.strength * (dora - base)
        elif adapter.algo in ("loha", "lokr"):
            merged = base + self.strength * adapter.delta_weight()
        else:
            down, up = adapter.export_factors()
            change = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
            merged = base + (self.strength * adapter.scale) * change
        return merged.to(weight.dtype)
