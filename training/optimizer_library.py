"""Optimizers from well-kept libraries, built from the allow-listed names of optimizers.py.

  prodigy             prodigyopt.Prodigy (Mishchenko & Defazio 2023): learns the step size d;
                      lr is a multiplier of it, so lr = 1 (the authors' and kohya's advice)
  adafactor           pytorch_optimizer.AdaFactor with relative_step, scale_parameter and
                      warmup_init off and the given lr, as kohya recommends for LoRA
                      (transformers' Adafactor semantics: factored second moments, update
                      clipping, beta2_t = 1 - t^decay_rate, here capped at betas[1]); no first
                      moment unless the `beta1` kwarg is given. torch.optim.Adafactor (torch
                      >= 2.5) is a different variant (no update clipping, no parameter scaling,
                      no momentum), so it is not used.
  lion                pytorch_optimizer.Lion (Chen et al. 2023): sign updates; lr ~ 3-10x lower
  came                pytorch_optimizer.CAME (Luo et al. 2023): confidence-guided Adafactor;
                      betas (b1, b2) plus the `beta3` kwarg (0.9999)
  adamw8bit, lion8bit, paged_adamw8bit, paged_lion8bit
                      bitsandbytes' 8-bit block-wise optimizers (install the `bnb` extra);
                      paged variants page their state to CPU memory under pressure (CUDA;
                      bitsandbytes falls back to the plain ones on CPU)
  adamw_schedulefree, sgd_schedulefree, radam_schedulefree
                      schedulefree.AdamWScheduleFree, SGDScheduleFree (momentum = betas[0]) and RAdamScheduleFree:
                      the same train / eval point handling as adamw_schedulefree
"""

from __future__ import annotations

import importlib
from typing import Callable

import schedulefree
import torch
from prodigyopt import Prodigy

BNB_OPTIMIZERS = {
    "adamw8bit": "AdamW8bit",
    "lion8bit": "Lion8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "paged_lion8bit": "PagedLion8bit",
}
SCHEDULE_FREE = (schedulefree.AdamWScheduleFree, schedulefree.SGDScheduleFree, schedulefree.RAdamScheduleFree)


def _pytorch_optimizer(cls: str):
    # Imported on use: the package takes seconds to import, which every node load would pay.
    return getattr(importlib.import_module("pytorch_optimizer"), cls)


def _bitsandbytes(name: str):
    try:
        module = importlib.import_module("bitsandbytes.optim")
    except ImportError as error:
        raise ValueError(
            f"optimizer {name!r} needs bitsandbytes: pip install 'comfyui-dit-trainer[bnb]' (its 8-bit optimizers run "
            f"on CUDA, and on CPU with bitsandbytes >= 0.48); or use 'adamw' ({error})"
        ) from None
    return getattr(module, BNB_OPTIMIZERS[name])


def _adafactor(groups, lr, weight_decay, betas, extra):
    beta1 = extra.pop("beta1", None)
    return _pytorch_optimizer("AdaFactor")(
        groups, lr=lr, betas=(beta1, betas[1]), weight_decay=weight_decay, relative_step=False,
        scale_parameter=False, warmup_init=False, momentum_dtype=torch.float32, **extra,
    )


def _came(groups, lr, weight_decay, betas, extra):
    beta3 = extra.pop("beta3", 0.9999)
    return _pytorch_optimizer("CAME")(groups, lr=lr, betas=(*betas, beta3), weight_decay=weight_decay, **extra)


_Builder = Callable[[list, float, float, tuple, dict], torch.optim.Optimizer]
BUILDERS: dict[str, _Builder] = {
    "adamw_schedulefree": lambda g, lr, wd, betas, extra: schedulefree.AdamWScheduleFree(
        g, lr=lr, betas=betas, weight_decay=wd, **extra),
    "prodigy": lambda g, lr, wd, betas, extra: Prodigy(g, lr=lr, betas=betas, weight_decay=wd, **extra),
    "adafactor": _adafactor,
    "lion": lambda g, lr, wd, betas, extra: _pytorch_optimizer("Lion")(g, lr=lr, betas=betas, weight_decay=wd, **extra),
    "came": _came,
    "sgd_schedulefree": lambda g, lr, wd, betas, extra: schedulefree.SGDScheduleFree(
        g, lr=lr, momentum=betas[0], weight_decay=wd, **extra),
    "radam_schedulefree": lambda g, lr, wd, betas, extra: schedulefree.RAdamScheduleFree(
        g, lr=lr, betas=betas, weight_decay=wd, **extra),
    **{
        name: (lambda g, lr, wd, betas, extra, name=name: _bitsandbytes(name)(
            g, lr=lr, betas=betas, weight_decay=wd, **extra))
        for name in BNB_OPTIMIZERS
    },
}
def build(name: str, groups: list[dict], lr: float, weight_decay: float, betas: tuple, extra: dict):
    return BUILDERS[name](groups, lr, weight_decay, betas, dict(extra))
