"""`dit-trainer train` / `resume`: a RunConfig in, a trained adapter out, with TrainLoRA's run rules.

The CLI holds no text encoder or VAE of a real model (the engine takes tensors; in
ComfyUI the connected CLIP and VAE encode). So with a real checkpoint the dataset must
already be in the on-disk caches that DatasetFromFolder wrote with the same settings
(`[data] encoder_id` names them); with the embedded demo model the demo's own encoder
and pixel VAE encode everything here.

The run folder `<[output] dir>/<[output] name>/` follows run_folder.py: it is locked for
the run; `train` continues a run with the same settings (a finished one returns at once)
and moves a run with other settings aside; `train --restart` moves any run aside;
`resume` continues the run and refuses settings that differ, except steps and lr.

Under `accelerate launch` every process runs this; the main process alone holds the lock
and writes (run record, demo dataset, dataset caches first, final adapter, loss plot),
and the others use what it wrote (distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_resumable, resumable_checkpoints
from .data.config import DataConfig
from .data.files import dataset_fingerprint, weighted_fingerprint, with_regularisation
from .data.folder_dataset import FolderDataset
from .demo.dataset_folder import DEMO_IMAGES, write_demo_dataset
from .distributed import main_first, on_main, processes
from .encoders import TEXT_ENCODER_READS_IMAGES, Encoders
from .loop import PreviewSpec, TrainResult, resume_check, save_trained_adapter, train
from .models.latent_formats import LatentFormat, latent_format_for
from .models.setup import load_base
from .network.network import seeded_network
from .network.training_adapter import TrainingAdapter
from .plots import loss_curve, save_png
from .progress import ProgressCallback
from .prompts import SamplePrompt, parse_prompts, preview_specs
from .run_config import DEMO, RunConfig
from .run_folder import RUN_ID_KEY, PreparedRun, prepare_run, read_record, record_run, run_lock
from .run_settings import run_settings
from .storage import OUTPUT_FIX
from .advisor import run_advice
from .validation import as_points

log = logging.getLogger(__name__)
MODES = ("train", "restart", "resume")
DEMO_DATASET_FOLDER = "embedded-demo-dataset"  # beside the run folders: it is input, not part of a run


@dataclass
class RunResult:
    adapter_path: Path | None  # None when the run stopped early: its checkpoint holds the adapter
    ema_adapter_path: Path | None
    loss_plot: Path
    run_dir: Path
    train: TrainResult


def load_model(checkpoint: str, dtype: str, attention: str, blocks_to_swap: int = 0,
               compile: bool = False) -> torch.nn.Module:
    from .demo.model import BASE_CHECKPOINT, missing_checkpoint_error

    path = BASE_CHECKPOINT if checkpoint == DEMO else Path(checkpoint)
    if checkpoint == DEMO and not path.is_file():
        raise missing_checkpoint_error()
    return load_base(path, dtype, attention, blocks_to_swap, compile, option="[model] dtype")


def cache_only_encoders(cfg: RunConfig, latents: LatentFormat, architecture: str) -> Encoders:
    """Encoders for a real model in the CLI: everything must come from DatasetFromFolder's caches."""
    if not cfg.data.encoder_id:
        raise ValueError(
            "[data] encoder_id is required with a real model: the CLI has no VAE / text encoder, so it trains "
            "from the caches DatasetFromFolder wrote in ComfyUI (it prints the encoder id); "
            'or use checkpoint = "embedded-demo"'
        )

    def missing(what: str):
        def fail(*_, **__):
            raise ValueError(
                f"{what} not found in the dataset cache for encoder_id {cfg.data.encoder_id!r}; run DatasetFromFolder "
                "once in ComfyUI with the same folder and options (caption shuffle / dropout / wildcards need the "
                "text encoder at every step, so train those in ComfyUI)"
            )

        return fail

    if cfg.sample.prompts or cfg.sample.prompts_file:
        raise ValueError("[sample] previews need the model's VAE and text encoder, which the CLI does not load; "
                         "sample in ComfyUI, or leave [sample] empty")
    return Encoders(missing("an image latent"), missing("a caption embedding"), missing("a decoder"),
                    latents.downscale, latents.channels, cfg.data.encoder_id,
                    text_reads_images=architecture in TEXT_ENCODER_READS_IMAGES)


def encoders_for(cfg: RunConfig, model: torch.nn.Module) -> Encoders:
    from .demo.encoders import demo_encoders

    if cfg.model.checkpoint == DEMO:
        return demo_encoders()
    return cache_only_encoders(cfg, latent_format_for(model.architecture), model.architecture)


def build_previews(cfg: RunConfig, encoders: Encoders, patch: int) -> list[PreviewSpec]:
    s = cfg.sample
    text = Path(s.prompts_file).read_text(encoding="utf-8") if s.prompts_file else s.prompts
    defaults = SamplePrompt(prompt="", width=s.width, height=s.height, steps=s.steps, cfg=s.cfg, shift=s.shift, seed=s.seed)
    prompts = parse_prompts(text, defaults)
    return preview_specs(prompts, encoders, patch) if prompts else []


def dataset_folder(cfg: RunConfig) -> Path:
    """The dataset folder; the demo's is written (once) beside the run folders."""
    if cfg.data.folder == DEMO:
        return write_demo_dataset(Path(cfg.output.dir) / DEMO_DATASET_FOLDER, DEMO_IMAGES, seed=cfg.train.seed)
    return Path(cfg.data.folder)


def dataset_for_run(folder: Path, data_cfg: DataConfig, cfg: RunConfig, encoders: Encoders,
                    patch: int) -> FolderDataset:
    data = FolderDataset.from_folder(
        folder, data_cfg, encoders.encode_images, encoders.encode_text, encoders.latent_downscale,
        encoders.encoder_id, patch, encoders.text_reads_images,
    )
    return data.with_mask_weights(cfg.data.mask_gamma, cfg.data.mask_min_weight) if cfg.data.mask_weights else data


def dataset_identity(folder: Path, data_cfg: DataConfig, cfg: RunConfig, encoder_id: str) -> str:
    """The dataset's fingerprint as the nodes make it (DatasetFromFolder, then WeightedMask when masks weigh the
    loss), so a run the node handed off (run.toml) keeps its settings and resumes in either place."""
    identity = dataset_fingerprint(folder, data_cfg, encoder_id)
    if cfg.data.mask_weights:
        identity = weighted_fingerprint(identity, cfg.data.mask_gamma, cfg.data.mask_min_weight)
    regularisation = (dataset_fingerprint(Path(cfg.data.reg_folder), data_cfg, encoder_id) if cfg.data.reg_folder
                      else None)
    return with_regularisation(identity, regularisation)


def _resume_run(run_dir: Path, settings: dict, cfg: RunConfig, about: dict, processes: int) -> PreparedRun:
    """`resume`: the run must exist; its settings may differ only in steps and lr (checked before training)."""
    if not resumable_checkpoints(run_dir):
        raise FileNotFoundError(f"nothing to resume in {run_dir}: it has no resumable checkpoint; "
                                "start the run with `dit-trainer train`")
    where, state = load_resumable(run_dir)
    resume_check(state, settings, cfg.train, where, processes)
    return record_run(run_dir, read_record(run_dir).get("run_id"), settings, about, continuing=True)


def run_training(cfg: RunConfig, mode: str = "train", on_progress: ProgressCallback | None = None) -> RunResult:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    run_dir, procs = cfg.output.run_dir, processes()
    with contextlib.ExitStack() as held:
        on_main(lambda: held.enter_context(run_lock(run_dir, "[output] name")), procs)  # the writer locks
        model = load_model(cfg.model.checkpoint, cfg.model.dtype, cfg.model.attention, cfg.model.blocks_to_swap,
                           cfg.model.compile)
        encoders = encoders_for(cfg, model)
        folder = on_main(lambda: dataset_folder(cfg), procs)
        data_cfg = DataConfig(**cfg.data.options)
        identity = dataset_identity(folder, data_cfg, cfg, encoders.encoder_id)
        settings = run_settings(cfg.train.to_dict(), cfg.network.config.to_dict(), model.base_hash, identity,
                                cfg.network.continue_from or None, procs.count)
        training_adapter = None
        if cfg.network.training_adapter:
            training_adapter = TrainingAdapter(model, model.architecture, cfg.network.training_adapter,
                                               cfg.network.training_adapter_strength)
            settings = training_adapter.recorded_in(settings)
        about = {"dataset": str(folder), "base": cfg.model.checkpoint}
        if mode == "resume":
            run = on_main(lambda: _resume_run(run_dir, settings, cfg, about, procs.count), procs)
        else:
            run = on_main(lambda: prepare_run(run_dir, settings, resume=mode == "train", about=about), procs)
        if run.continuing and mode == "train":
            log.info("continuing the run in %s (same settings; `--restart` starts over)", run_dir)

        network = seeded_network(model, model.architecture, cfg.network.config, cfg.train.seed).attach()
        if cfg.network.continue_from and not run.continuing:
            from .network.importer import load_adapter_into

            log.info("%s", load_adapter_into(network, cfg.network.continue_from))
        data = main_first(lambda: dataset_for_run(folder, data_cfg, cfg, encoders, model.cfg.patch_size), procs)
        log.info("%s", data.summary())
        if cfg.model.checkpoint != DEMO:  # the tiny demo model is not held to real models' recipes
            for advice in run_advice(model.architecture, cfg.train, cfg.network.config, data.item_count(),
                                     data_cfg.resolution):
                log.warning("settings advisor: %s", advice)
        held_out = regularisation = None
        if cfg.train.validation.folder:  # held-out images, read with the training folder's [data] options
            held_out = main_first(lambda: dataset_for_run(Path(cfg.train.validation.folder), data_cfg, cfg, encoders,
                                                          model.cfg.patch_size), procs)
            log.info("validation set %s:\n%s", cfg.train.validation.folder, held_out.summary())
        if cfg.data.reg_folder:
            regularisation = main_first(lambda: dataset_for_run(Path(cfg.data.reg_folder), data_cfg, cfg, encoders,
                                                                model.cfg.patch_size), procs)
            log.info("regularisation images %s:\n%s", cfg.data.reg_folder, regularisation.summary())
        metadata = {"ss_output_name": cfg.output.name, RUN_ID_KEY: run.run_id,
                    **(training_adapter.metadata() if training_adapter is not None else {})}
        result = train(
            model, network, data, cfg.train, on_progress, build_previews(cfg, encoders, model.cfg.patch_size),
            run_dir=run_dir, resume_from=run_dir if run.continuing else None, adapter_metadata=metadata,
            settings=settings, training_adapter=training_adapter, validation_data=held_out,
            regularisation_data=regularisation,
        )

        def write_outputs() -> tuple[Path | None, Path | None, Path]:
            adapter_path = ema_path = None
            if not result.stopped_early:
                adapter_path, ema_path = save_trained_adapter(
                    network, run_dir / f"{cfg.output.name}.safetensors", result, cfg.train, model.base_hash, metadata
                )
            plot = save_png(loss_curve(result.losses, title=f"{cfg.output.name} training loss",
                                       validation=as_points(result.validation)), run_dir / "loss.png", OUTPUT_FIX)
            return adapter_path, ema_path, plot

        adapter_path, ema_path, plot = on_main(write_outputs, procs)
    return RunResult(adapter_path, ema_path, plot, run_dir, result)
