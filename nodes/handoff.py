"""The run.toml TrainLoRA leaves in its run folder: the same training, headless, on a cluster (run_config.py)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ..training.config import TrainConfig
from ..training.data.files import dataset_fingerprint, weighted_fingerprint
from ..training.run_config import DEMO, HandOff, write_run_config
from . import host
from .sockets import DitModel, LoraNetworkSpec, TrainingSet

log = logging.getLogger(__name__)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def storage_dtype(model: torch.nn.Module) -> str:
    """The dtype most of the base's weights are stored in (LoadDiT's weight_dtype)."""
    counts = Counter()
    for p in model.parameters():
        counts[p.dtype] += p.numel()
    return DTYPE_NAMES.get(counts.most_common(1)[0][0], "bf16")


def attention_backend(model: torch.nn.Module) -> str:
    """LoadDiT's attention choice, as its attention modules hold it ("auto" when they disagree or hold none)."""
    backends = {m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)}
    return backends.pop() if len(backends) == 1 else "auto"


def mask_weighting(dataset: TrainingSet) -> tuple[float, float] | None | str:
    """(gamma, min_weight) when WeightedMask weighs the loss by the folder's masks, None without it, or the
    reason the CLI cannot rebuild this dataset (masks connected as a MASK input are not files)."""
    data = dataset.data
    plain = dataset_fingerprint(data.folder, data.cfg, dataset.encoders.encoder_id)
    if dataset.fingerprint == plain:
        return None
    if dataset.fingerprint == weighted_fingerprint(plain, *data.mask_weighting):
        return data.mask_weighting
    return "its loss masks come from a MASK input (WeightedMask), which a config file cannot point to"


def write_handoff(model: DitModel, network: LoraNetworkSpec, dataset: TrainingSet, cfg: TrainConfig,
                  run_dir: Path) -> Path | None:
    """Write run_dir/run.toml for this run; None (and a warning saying why) when the CLI could not rebuild it."""
    weighting = mask_weighting(dataset)
    if isinstance(weighting, str):
        log.warning("TrainLoRA: no run.toml for %s: %s; train it in ComfyUI", run_dir.name, weighting)
        return None
    checkpoint = DEMO if model.demo else str(host.model_path("diffusion_models", model.name))
    run = HandOff(
        checkpoint=checkpoint, dtype=storage_dtype(model.model), attention=attention_backend(model.model),
        network=network.config, data_folder=dataset.data.folder, data=dataset.data.cfg,
        encoder_id=dataset.encoders.encoder_id, mask_weighting=weighting, train=cfg,
        continue_from=network.init_from, training_adapter=network.training_adapter,
        training_adapter_strength=network.training_adapter_strength,
    )
    return write_run_config(run, run_dir)
