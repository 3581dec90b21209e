"""EMAMerge: post-hoc EMA over the checkpoints of a TrainLoRA run."""

from __future__ import annotations

from pathlib import Path

from ..training.checkpoint import ADAPTER_FILE, EMA_ADAPTER_FILE, checkpoint_adapters
from ..training.network.comfy_format import atomic_save_safetensors
from ..training.posthoc_ema import MODES, merge_adapter_files
from ..training.run_folder import RUN_ID_KEY, free_adapter_path
from ..training.run_settings import file_identity
from . import host
from .sockets import CATEGORY, DITT_LORA, TrainedLora


def run_dir_for(lora: TrainedLora | None, run_name: str) -> Path:
    if lora is not None:
        if lora.run_dir is None:
            raise ValueError("EMAMerge: this adapter has no training run (it was not trained by TrainLoRA); "
                             "connect TrainLoRA's lora output or give a run_name")
        return lora.run_dir
    if not run_name.strip():
        raise ValueError("EMAMerge: connect TrainLoRA's lora output or give the run_name of a finished run")
    return host.pack_output_dir() / host.safe_name(run_name, "EMAMerge run_name")


def checkpoint_files(run_dir: Path, use_ema_files: bool) -> list[Path]:
    files = checkpoint_adapters(run_dir, ema=use_ema_files)
    if len(files) < 2:
        name = EMA_ADAPTER_FILE if use_ema_files else ADAPTER_FILE
        raise ValueError(
            f"EMAMerge: {run_dir} has {len(files)} checkpoint(s) with {name}; post-hoc EMA needs at least 2 "
            "(lower TrainLoRA's save_every" + (", or turn use_ema_files off)" if use_ema_files else ")")
        )
    return files


class EMAMerge:
    DESCRIPTION = (
        "Post-hoc EMA: averages the adapter saved at each checkpoint of a run (oldest first, merged = "
        "beta * merged + (1 - beta) * next). beta: fixed; linear: beta to beta2 over the checkpoints; sigma_rel: "
        "EDM2 power-function EMA of relative width sigma_rel. Writes models/loras/<run>_<suffix>.safetensors."
    )
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (DITT_LORA, "STRING")
    RETURN_NAMES = ("lora", "path")
    OUTPUT_TOOLTIPS = ("The merged adapter.", "Full path of the merged adapter file in models/loras.")
    OUTPUT_NODE = True  # it writes a file
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (list(MODES), {"default": "beta",
                                       "tooltip": "beta: fixed decay per checkpoint; linear: beta -> beta2; "
                                                  "sigma_rel: power-function EMA (Karras et al. 2024)."}),
                "beta": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.001,
                                   "tooltip": "Decay per checkpoint (beta / linear start). Higher keeps more of the "
                                              "older checkpoints."}),
                "beta2": ("FLOAT", {"default": 0.99, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "Decay at the last checkpoint (linear mode)."}),
                "sigma_rel": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 0.288, "step": 0.001,
                                        "tooltip": "Relative EMA width (sigma_rel mode); 0.05-0.2 is typical."}),
                "t_from_steps": ("BOOLEAN", {"default": True,
                                             "tooltip": "sigma_rel: use each checkpoint's training step as t (exact "
                                                        "for uneven spacing) instead of its index (musubi-tuner)."}),
                "use_ema_files": ("BOOLEAN", {"default": False,
                                              "tooltip": "Merge the online-EMA adapters (needs ema_decay > 0 in "
                                                         "TrainLoRA) instead of the raw ones."}),
                "suffix": ("STRING", {"default": "posthoc_ema",
                                      "tooltip": "Output file: models/loras/<run>_<suffix>.safetensors."}),
            },
            "optional": {
                "lora": (DITT_LORA, {"tooltip": "TrainLoRA's output: merges that run's checkpoints."}),
                "run_name": ("STRING", {"default": "",
                                        "tooltip": "Or the name of a run in output/dit_trainer/ (when lora is not "
                                                   "connected)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, run_name: str = "", use_ema_files: bool = False, **_):
        # Merging by run name reads files another run may have rewritten: fingerprint them.
        if not run_name.strip():
            return ""
        run_dir = host.pack_output_dir() / host.safe_name(run_name, "EMAMerge run_name")
        return str([file_identity(f) for f in checkpoint_adapters(run_dir, ema=use_ema_files)])

    def merge(self, mode: str, beta: float, beta2: float, sigma_rel: float, t_from_steps: bool, use_ema_files: bool,
              suffix: str, lora: TrainedLora | None = None, run_name: str = ""):
        run_dir = run_dir_for(lora, run_name)
        files = checkpoint_files(run_dir, use_ema_files)
        tensors, metadata = merge_adapter_files(
            files, mode, beta, beta2 if mode == "linear" else None, sigma_rel if mode == "sigma_rel" else None,
            t_from_steps=t_from_steps and mode == "sigma_rel",
        )
        stem = f"{run_dir.name}_{host.safe_name(suffix, 'EMAMerge suffix')}"
        target = free_adapter_path(host.model_folder("loras"), stem, metadata.get(RUN_ID_KEY, ""))
        path = atomic_save_safetensors(tensors, target, metadata)
        architecture = metadata.get("dit_trainer_architecture", lora.architecture if lora else "")
        base_hash = metadata.get("ss_base_model_hash", lora.base_hash if lora else "")
        return (TrainedLora(path, architecture, base_hash, run_dir), str(path))
