"""TrainLoRA: train the adapter on the dataset, with live previews, checkpoints and Cancel-safe resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from collections import Counter
from pathlib import Path


from ..training.advisor import run_advice
from ..training.config import TrainConfig
from ..training.data.files import with_regularisation
from ..training.loop import PreviewSpec, save_trained_adapter, train
from ..training.losses import HUBER_SCHEDULES, LOSSES
from ..training.network.comfy_format import load_adapter_into
from ..training.network.network import seeded_network
from ..training.network.training_adapter import TrainingAdapter
from ..training.optimizers import OPTIMIZERS
from ..training.plots import loss_curve, save_png
from ..training.progress import ProgressEvent
from ..training.prompts import DEFAULT_GUIDANCE, parse_prompts, preview_specs, sampling_defaults
from ..training.run_folder import RUN_ID_KEY, PreparedRun, free_adapter_path, prepare_run, run_lock
from ..training.run_settings import run_settings
from ..training.schedules import SCHEDULES
from ..training.timesteps import METHODS
from ..training.validation import as_points
from . import host
from .comfy_io import conditioning_record, pil_to_image, vae_latent_decoder
from .gpu_placement import on_compute_device
from .handoff import write_handoff
from .inference_mode import outside_inference_mode
from .sockets import (
    CATEGORY, DITT_DATASET, DITT_LORA, DITT_LORA_NETWORK, DITT_MODEL, DitModel, LoraNetworkSpec, TrainedLora,
    TrainingSet,
)

log = logging.getLogger(__name__)
MAX_LOSS_POINTS = 1000  # loss-chart points sent to the web extension
_DEFAULTS = TrainConfig()


def loss_points(losses: list[float], limit: int = MAX_LOSS_POINTS) -> list[list[float]]:
    """[[step, loss], ...] with at most `limit` points: means of equal runs of steps, non-finite steps left out."""
    size = max(1, math.ceil(len(losses) / limit))
    points = []
    for start in range(0, len(losses), size):
        chunk = [v for v in losses[start : start + size] if math.isfinite(v)]
        if chunk:
            points.append([min(start + size, len(losses)), sum(chunk) / len(chunk)])
    return points


def train_config(widgets: dict, extra_options: str) -> TrainConfig:
    """Widgets plus the JSON `extra_options` (any TrainConfig field; loss / timesteps merge key by key)."""
    values = {
        **{k: widgets[k] for k in ("steps", "batch_size", "grad_accum", "lr", "optimizer", "weight_decay", "schedule",
                                   "warmup_steps", "max_grad_norm", "mixed_precision", "seed", "ema_decay",
                                   "save_every", "keep_last", "sample_every")},
        "loss": {"kind": widgets["loss"], "huber_c": widgets["huber_c"]},
        "timesteps": {"method": widgets["timestep_sampling"], "discrete_flow_shift": widgets["discrete_flow_shift"]},
        **({"guidance": widgets["guidance"]} if "guidance" in widgets else {}),
        **({"validation_split": widgets["validation_split"]} if "validation_split" in widgets else {}),
        **({"validation": {"every": widgets["validate_every"]}} if "validate_every" in widgets else {}),
        **({"preservation": {"dop_weight": widgets["dop_weight"]}} if "dop_weight" in widgets else {}),
    }
    if extra_options.strip():
        try:
            extra = json.loads(extra_options)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"TrainLoRA extra_options is not valid JSON ({err}); e.g. {{\"warmup_ratio\": 0.05}}"
            ) from None
        if not isinstance(extra, dict):
            raise ValueError("TrainLoRA extra_options must be a JSON object of train options, e.g. {\"power\": 2.0}")
        for key, value in extra.items():
            nested = isinstance(values.get(key), dict) and isinstance(value, dict)
            values[key] = {**values[key], **value} if nested else value
    try:
        return TrainConfig.from_dict(values)
    except ValueError as err:  # name the place the user can fix it
        raise ValueError(f"TrainLoRA options (widgets and extra_options): {err}") from None


def common_size(dataset: TrainingSet) -> tuple[int, int]:
    """(width, height) of the dataset's most used bucket: the preview size when a prompt gives none."""
    return Counter(item.bucket for item in dataset.data.items).most_common(1)[0][0]


def previews_for(dit: DitModel, dataset: TrainingSet, prompts_text: str, conditioning, vae, seed: int) -> list[PreviewSpec]:
    encoders = dataset.encoders
    if vae is not None:
        if dit.demo:
            raise ValueError("TrainLoRA: the embedded demo model decodes with its own pixel VAE; disconnect the VAE")
        encoders = dataclasses.replace(encoders, decode=vae_latent_decoder(vae, dit))
    width, height = common_size(dataset)
    defaults = sampling_defaults(getattr(dit.model, "variant", ""), width=width, height=height, seed=seed)
    references = dataset.data.preview_references()
    text_images = dataset.data.preview_text_images() if encoders.text_reads_images else None
    specs = preview_specs(parse_prompts(prompts_text, defaults), encoders, dit.model.cfg.patch_size, references,
                          text_images)
    if conditioning is not None:
        cond = conditioning_record(conditioning, "TrainLoRA sample_conditioning", dit)
        if cond.guidance is None:
            cond = cond.with_guidance(DEFAULT_GUIDANCE)
        if not cond.reference_latents:
            cond = dataclasses.replace(cond, reference_latents=references)
        size = (encoders.latent_channels, height // encoders.latent_downscale, width // encoders.latent_downscale)
        specs.append(PreviewSpec(cond, size, encoders.decode, steps=defaults.steps, cfg=defaults.cfg,
                                 shift=defaults.shift, seed=seed, captions=["(sample_conditioning)"]))
    return specs


class TrainLoRA:
    DESCRIPTION = (
        "Trains the adapter on the dataset (flow matching). Shows preview samples every sample_every steps while "
        "training goes on, streams loss / lr / ETA, writes resumable checkpoints to output/dit_trainer/<name>/ and "
        "the final adapter to models/loras/<name>.safetensors (stock LoraLoader lists it at once). Cancel stops "
        "after the current step and keeps a resumable checkpoint; queue again with resume on to continue."
    )
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (DITT_LORA, "STRING", "IMAGE")
    RETURN_NAMES = ("lora", "path", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The trained adapter (for SampleWithLoRA / EMAMerge).",
        "Full path of the saved adapter file in models/loras.",
        "Per-step loss and its moving average (and the validation loss, when there is one).",
    )
    OUTPUT_NODE = True  # it writes a file, like SaveImage: it runs even when nothing uses its outputs
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "model": (DITT_MODEL, {"tooltip": "The base model (LoadDiT)."}),
                "network": (DITT_LORA_NETWORK, {"tooltip": "Adapter options (BuildLoRANetwork)."}),
                "dataset": (DITT_DATASET, {"tooltip": "Training data (DatasetFromFolder, optionally WeightedMask)."}),
                "name": ("STRING", {"default": "my_lora",
                                    "tooltip": "Run name: output/dit_trainer/<name>/ and models/loras/<name>.safetensors "
                                               "(characters other than letters, digits, . _ - become _)."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps."}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 256,
                                       "tooltip": "Images per micro-batch (one bucket per batch)."}),
                "grad_accum": ("INT", {"default": d.grad_accum, "min": 1, "max": 256,
                                       "tooltip": "Micro-batches per optimizer step: effective batch = batch x accum."}),
                "lr": ("FLOAT", {"default": d.lr, "min": 1e-7, "max": 1.0, "step": 1e-6, "round": False,
                                 "tooltip": "Learning rate (1e-4 is common for LoRA at alpha = rank; lower alpha "
                                            "needs more)."}),
                "optimizer": (list(OPTIMIZERS), {"default": d.optimizer,
                                                 "tooltip": "adamw picks the fused kernel on CUDA. adamw_schedulefree "
                                                            "replaces the schedule (use constant)."}),
                "weight_decay": ("FLOAT", {"default": d.weight_decay, "min": 0.0, "max": 1.0, "step": 0.001,
                                           "tooltip": "Decoupled weight decay of the adapter weights."}),
                "schedule": (list(SCHEDULES), {"default": d.schedule,
                                               "tooltip": "LR schedule after warmup; cosine_with_min_lr / polynomial "
                                                          "options go in extra_options (min_lr_ratio, power)."}),
                "warmup_steps": ("INT", {"default": d.warmup_steps, "min": 0, "max": 1_000_000,
                                         "tooltip": "Linear warmup steps (0: none, or warmup_ratio in extra_options)."}),
                "max_grad_norm": ("FLOAT", {"default": d.max_grad_norm, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Gradient clipping norm; 0 disables clipping."}),
                "timestep_sampling": (list(METHODS), {"default": d.timesteps.method,
                                                      "tooltip": "How noise levels are drawn: shift (discrete flow "
                                                                 "shift), sigmoid, uniform, flux_shift / qwen_shift "
                                                                 "(resolution-dependent), logsnr, qinglong_*."}),
                "discrete_flow_shift": ("FLOAT", {"default": d.timesteps.discrete_flow_shift, "min": 0.01,
                                                  "max": 100.0, "step": 0.01,
                                                  "tooltip": "Shift k for 'shift' sampling: k > 1 trains more at high "
                                                             "noise (3.0 is musubi-tuner's default)."}),
                "loss": (list(LOSSES), {"default": d.loss.kind,
                                        "tooltip": "l2, or huber / smooth_l1 (robust to outliers); huber_schedule in "
                                                   f"extra_options ({', '.join(HUBER_SCHEDULES)})."}),
                "huber_c": ("FLOAT", {"default": d.loss.huber_c, "min": 0.001, "max": 1.0, "step": 0.001,
                                      "tooltip": "Threshold c of huber / smooth_l1."}),
                "mixed_precision": (["no", "bf16", "fp16"], {"default": d.mixed_precision,
                                                             "tooltip": "Autocast of the frozen base in the forward "
                                                                        "pass; bf16 on modern GPUs, no on CPU."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                                 "tooltip": "Seed of data order, noise and timesteps (fixed, so a re-queue does not "
                                            "retrain)."}),
                "ema_decay": ("FLOAT", {"default": d.ema_decay, "min": 0.0, "max": 0.99999, "step": 0.0001,
                                        "tooltip": "Online EMA of the adapter, used for previews and saved as "
                                                   "<name>_ema.safetensors; 0 = off, 0.999 typical."}),
                "save_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000,
                                       "tooltip": "Resumable checkpoint every N steps (also at the end and on Cancel); "
                                                  "EMAMerge averages their adapters."}),
                "keep_last": ("INT", {"default": d.keep_last, "min": 0, "max": 1000,
                                      "tooltip": "Resumable states kept (0 = all); every checkpoint keeps its small "
                                                 "adapter file for EMAMerge."}),
                "sample_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000,
                                         "tooltip": "Preview samples every N steps and at the end; 0 = none."}),
                "sample_prompts": ("STRING", {"multiline": True, "default": "",
                                              "tooltip": "One prompt per line, kohya / musubi options: --n negative "
                                                         "--w width --h height --s steps --l cfg --g guidance "
                                                         "--fs shift --d seed. "
                                                         "Size defaults to the dataset's main bucket."}),
                "resume": ("BOOLEAN", {"default": True,
                                       "tooltip": "Continue this run's newest checkpoint when its settings match "
                                                  "(a finished run returns at once). Off: start over; the old run is "
                                                  "moved to <name>.replaced-<time>."}),
            },
            "optional": {  # guidance is an optional widget: workflows saved before it existed still validate
                "guidance": ("FLOAT", {"default": d.guidance, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Distilled guidance a guidance-embedded model sees while training "
                                                  "(Flux.1-dev / Kontext, Flux.2 dev; 1.0 as musubi-tuner). Models "
                                                  "without a guidance input (schnell, klein, Z-Image) ignore it."}),
                "extra_options": ("STRING", {"multiline": True, "default": "",
                                             "tooltip": "More train options as JSON, e.g. {\"warmup_ratio\": 0.05, "
                                                        "\"min_lr_ratio\": 0.1, \"loss\": {\"huber_schedule\": \"snr\"}, "
                                                        "\"timesteps\": {\"min_sigma\": 0.1}}."}),
                "sample_conditioning": ("CONDITIONING", {"tooltip": "An extra preview from this conditioning."}),
                "vae": ("VAE", {"tooltip": "Decode previews with this VAE instead of the dataset's."}),
                "validation": (DITT_DATASET, {"tooltip": "Held-out images (a second DatasetFromFolder) for the "
                                                         "validation loss, the orange series of the chart."}),
                "regularisation": (DITT_DATASET, {"tooltip": "Class images (a second DatasetFromFolder) that "
                                                             "alternate with the training batches to keep the "
                                                             "class's look (kohya reg images); their loss weight is "
                                                             "preservation.reg_weight in extra_options (1.0)."}),
                "dop_weight": ("FLOAT", {"default": d.preservation.dop_weight, "min": 0.0, "max": 100.0, "step": 0.05,
                                         "tooltip": "Differential output preservation: on the captions with the "
                                                    "trigger word replaced by the dataset's class_word, pull the "
                                                    "adapter's prediction to the base's (ai-toolkit). Needs "
                                                    "trigger_word and class_word on DatasetFromFolder. 0 = off."}),
                "validate_every": ("INT", {"default": 50, "min": 0, "max": 1_000_000,
                                           "tooltip": "Validation loss every N steps, at the start and the end, when "
                                                      "there are held-out images (validation input or "
                                                      "validation_split): fixed sigmas and noise, so it is "
                                                      "comparable across runs. 0 = off."}),
                "validation_split": ("FLOAT", {"default": d.validation_split, "min": 0.0, "max": 0.9, "step": 0.01,
                                               "tooltip": "Fraction of the dataset's images held out of training "
                                                          "for the validation loss (picked by the seed); 0 = none."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @outside_inference_mode  # training needs autograd
    def run(self, model: DitModel, network: LoraNetworkSpec, dataset: TrainingSet, name: str, sample_prompts: str,
            resume: bool, extra_options: str = "", sample_conditioning=None, vae=None, validation=None,
            regularisation=None, unique_id=None, **widgets):
        run_name = host.safe_name(name, "TrainLoRA name")
        run_dir = host.pack_output_dir() / run_name
        cfg = train_config(widgets, extra_options)
        cfg.gradient_checkpointing = model.gradient_checkpointing
        specs = previews_for(model, dataset, sample_prompts, sample_conditioning, vae, cfg.seed) if cfg.sample_every else []
        identity = with_regularisation(dataset.fingerprint,
                                       None if regularisation is None else regularisation.fingerprint)
        settings = run_settings(cfg.to_dict(), network.config.to_dict(), model.base_hash, identity, network.init_from)
        training_adapter = None
        if network.training_adapter is not None:
            training_adapter = TrainingAdapter(model.model, model.architecture, network.training_adapter,
                                               network.training_adapter_strength)
            settings = training_adapter.recorded_in(settings)
        advice = [] if model.demo else run_advice(model.architecture, cfg, network.config,
                                                 dataset.data.item_count(), dataset.data.cfg.resolution)
        for line in advice:  # warnings, never errors: the user may know better
            log.warning("TrainLoRA %s: %s", run_name, line)
        with run_lock(run_dir, "TrainLoRA name"), on_compute_device(model):  # first: adapters go on their layer's device
            run = prepare_run(run_dir, settings, resume, {"dataset": dataset.summary, "base": model.name})
            # The same run, headless (README "Train on more GPUs").
            write_handoff(model, network, dataset, cfg, run_dir, validation, regularisation)
            return self._train(model, network, dataset, cfg, specs, settings, run, run_name, str(unique_id),
                               training_adapter, validation, regularisation, advice)

    def _train(self, model: DitModel, network: LoraNetworkSpec, dataset: TrainingSet, cfg: TrainConfig,
               specs: list[PreviewSpec], settings: dict, run: PreparedRun, run_name: str, node: str,
               training_adapter: TrainingAdapter | None, validation: TrainingSet | None,
               regularisation: TrainingSet | None, advice: list[str]):
        run_dir = run.run_dir
        metadata = {"ss_output_name": run_name, "dit_trainer_dataset": dataset.summary, RUN_ID_KEY: run.run_id,
                    **(training_adapter.metadata() if training_adapter is not None else {})}
        progress = host.Progress(cfg.steps)
        samples: list[dict] = []
        token = secrets.token_hex(3)  # fresh file names per call, so the browser never shows stale previews

        def on_progress(event: ProgressEvent) -> None:
            loss = event.loss if math.isfinite(event.loss) else None  # JSON has no NaN
            host.send("dit_trainer.progress", {"node": node, "step": event.step, "total": event.total, "loss": loss,
                                               "lr": event.lr, "eta_s": event.eta_s, "elapsed_s": event.elapsed_s,
                                               "validation": [[s, v] for s, v in event.validation if math.isfinite(v)]})
            if event.previews:
                for i, image in enumerate(event.previews):
                    save_png(image, run_dir / "samples" / f"step_{event.step:06d}_{i:02d}.png")
                entry = {"step": event.step,
                         "images": host.save_temp_pngs(event.previews, f"{run_name}_{token}_s{event.step:06d}"),
                         "captions": event.preview_captions}
                samples.append(entry)
                host.send("dit_trainer.samples", {"node": node, **entry})
            # Last: ComfyUI's progress hook raises here when Cancel was pressed. The samples reach the
            # browser once, through the pack's gallery (a preview here would be drawn a second time).
            progress.update(event.step, event.total)

        lora = seeded_network(model.model, model.architecture, network.config, cfg.seed).attach()
        try:
            if network.init_from is not None and not run.continuing:
                report = load_adapter_into(lora, network.init_from)
                log.info("TrainLoRA continues %s: %d layers loaded, %d not in the file (fresh)",
                         network.init_from.name, len(report.loaded), len(report.not_in_file))
                for warning in report.warnings:
                    log.warning("TrainLoRA: %s", warning)
            result = train(model.model, lora, dataset.data, cfg, on_progress, specs, should_stop=host.interrupted,
                           run_dir=run_dir, resume_from=run_dir if run.continuing else None,
                           adapter_metadata=metadata, settings=settings, training_adapter=training_adapter,
                           validation_data=None if validation is None else validation.data,
                           regularisation_data=None if regularisation is None else regularisation.data)
            if result.stopped_early:
                host.raise_interrupted()  # the checkpoint is already on disk
            progress.update(cfg.steps, cfg.steps)
            target = free_adapter_path(host.model_folder("loras"), run_name, run.run_id, ema=result.ema is not None)
            path, _ = save_trained_adapter(lora, target, result, cfg, model.base_hash, metadata)
        finally:
            lora.detach_from_model()

        validation_points = as_points(result.validation)
        curve = loss_curve(result.losses, title=f"{run_name} training loss", validation=validation_points)
        save_png(curve, run_dir / "samples" / "loss.png")
        ui = {"dit_trainer_losses": loss_points(result.losses), "dit_trainer_samples": samples,
              "dit_trainer_saved": [path.name], "dit_trainer_validation": [list(p) for p in validation_points],
              "dit_trainer_advice": advice}
        trained = TrainedLora(Path(path), model.architecture, model.base_hash, run_dir)
        return {"ui": ui, "result": (trained, str(path), pil_to_image([curve]))}
