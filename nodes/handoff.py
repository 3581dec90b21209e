"""The run.toml TrainLoRA leaves in its run folder: the same training, headless, on a cluster (run_config.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..training.config import TrainConfig
from ..training.data.files import dataset_fingerprint, weighted_fingerprint
from ..training.run_config import DEMO, HandOff, write_run_config
from . import host
from .sockets import DitModel, LoraNetworkSpec, TrainingSet

log = logging.getLogger(__name__)


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


def folder_of(dataset: TrainingSet | None, training: TrainingSet, role: str) -> Path | None | str:
    """The folder of a second dataset (validation / regularisation) for the CLI, which reads it with the
    training data's options; or the reason it cannot (other options, or mask weights)."""
    if dataset is None:
        return None
    data = dataset.data
    if data.cfg != training.data.cfg:
        return f"its {role} images were read with other DatasetFromFolder options than the training images"
    if dataset.fingerprint != dataset_fingerprint(data.folder, data.cfg, dataset.encoders.encoder_id):
        return f"its {role} images are weighted by masks (WeightedMask), which the CLI does not apply to them"
    return data.folder


def write_handoff(model: DitModel, network: LoraNetworkSpec, dataset: TrainingSet, cfg: TrainConfig,
                  run_dir: Path, validation: TrainingSet | None = None,
                  regularisation: TrainingSet | None = None) -> Path | None:
    """Write run_dir/run.toml for this run; None (and a warning saying why) when the CLI could not rebuild it."""
    weighting = mask_weighting(dataset)
    validation_folder = folder_of(validation, dataset, "validation")
    reg_folder = folder_of(regularisation, dataset, "regularisation")
    for reason in (weighting, validation_folder, reg_folder):
        if isinstance(reason, str):
            log.warning("TrainLoRA: no run.toml for %s: %s; train it in ComfyUI", run_dir.name, reason)
            return None
    checkpoint = DEMO if model.demo else str(host.model_path("diffusion_models", model.name))
    run = HandOff(
        checkpoint=checkpoint, model=dict(model.model.load_settings), network=network.config,
        data_folder=dataset.data.folder, data=dataset.data.cfg, encoder_id=dataset.encoders.encoder_id,
        mask_weighting=weighting, train=cfg, continue_from=network.init_from,
        training_adapter=network.training_adapter, training_adapter_strength=network.training_adapter_strength,
        reg_folder=reg_folder, validation_folder=validation_folder,
    )
    return write_run_config(run, run_dir)
