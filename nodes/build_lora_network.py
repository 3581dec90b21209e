"""BuildLoRANetwork: the adapter options (LoRA / DoRA, rank, targets, ...), checked against the model."""

from __future__ import annotations

import logging

from ..training.advisor import network_advice
from ..training.network.file_config import config_for_file
from ..training.network.lora import DORA_AXES, INITS
from ..training.network.network import ALGOS, NetworkConfig, select
from . import host
from .sockets import CATEGORY, DITT_LORA_NETWORK, DITT_MODEL, DitModel, LoraNetworkSpec

log = logging.getLogger(__name__)
NO_FILE = "None"
_DEFAULTS = NetworkConfig()


def pattern_lines(text: str) -> list[str]:
    """One regex per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def pattern_values(text: str, option: str, cast: type) -> dict:
    """'regex = value' per line -> {regex: value}; the last '=' splits, so regexes may contain '='."""
    values = {}
    for line in pattern_lines(text):
        pattern, sep, value = line.rpartition("=")
        try:
            if not sep or not pattern.strip():
                raise ValueError
            values[pattern.strip()] = cast(value.strip())
        except ValueError:
            raise ValueError(
                f"BuildLoRANetwork {option}: line {line!r} is not 'regex = {cast.__name__}', "
                r"e.g. 'layers\.(0|1)\..* = 32'"
            ) from None
    return values


class BuildLoRANetwork:
    DESCRIPTION = (
        "Adapter options: LoRA or DoRA, rank / alpha (scale alpha / rank; RS-LoRA alpha / sqrt(rank)), which layers "
        "(the architecture's defaults, regex include / exclude, per-layer rank / alpha), init, dropouts, LoRA+. "
        "TrainLoRA attaches the network to the model while it trains; the model itself stays unchanged."
    )
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (DITT_LORA_NETWORK, "STRING")
    RETURN_NAMES = ("network", "summary")
    OUTPUT_TOOLTIPS = ("The adapter options, checked against the model.", "Adapted and skipped layer counts.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        multiline = {"multiline": True, "default": ""}
        return {
            "required": {
                "model": (DITT_MODEL, {"tooltip": "The base model the adapter is for."}),
                "algo": (list(ALGOS), {"default": d.algo,
                                       "tooltip": "dora: weight-decomposed LoRA (Linear layers only), loads in "
                                                  "stock LoraLoader via dora_scale; slower per step than lora. "
                                                  "loha / lokr: LyCORIS Hadamard / Kronecker products (Linear and "
                                                  "Conv), loaded natively by stock LoraLoader."}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 1024,
                                 "tooltip": "Adapter rank (network_dim). Higher learns more, file grows linearly."}),
                "alpha": ("FLOAT", {"default": d.alpha, "min": 0.0, "max": 4096.0, "step": 0.5,
                                    "tooltip": "Scale is alpha / rank (alpha = rank means scale 1). Lower alpha "
                                               "needs a higher lr."}),
                "use_rslora": ("BOOLEAN", {"default": d.use_rslora,
                                           "tooltip": "Rank-stabilised scale alpha / sqrt(rank); the file stays "
                                                      "loadable by plain alpha / rank readers."}),
                "dora_axis": (list(DORA_AXES), {"default": d.dora_axis,
                                                "tooltip": "input: per input column, what ComfyUI applies natively. "
                                                           "output: PEFT / paper convention, exported with a "
                                                           "correction tied to this base checkpoint."}),
                "init": (list(INITS), {"default": d.init,
                                       "tooltip": "Init of the down (A) matrix; pissa starts from the principal "
                                                  "singular vectors (moves them out of the base, slow to init)."}),
                "dropout": ("FLOAT", {"default": d.dropout, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Neuron dropout on A x (turns DoRA off for all layers)."}),
                "rank_dropout": ("FLOAT", {"default": d.rank_dropout, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "Drops whole ranks per sample (turns DoRA off)."}),
                "module_dropout": ("FLOAT", {"default": d.module_dropout, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Skips a whole adapter per step with this probability."}),
                "train_refiners": ("BOOLEAN", {"default": d.train_refiners,
                                               "tooltip": "Z-Image: also adapt the noise / context refiner blocks."}),
                "exclude_mod": ("BOOLEAN", {"default": d.exclude_mod,
                                            "tooltip": "Leave the modulation (adaLN) layers out, as musubi-tuner."}),
                "include_patterns": ("STRING", {**multiline,
                                                "tooltip": "Extra layers to adapt: one regex per line, full match on "
                                                           "dotted names like layers.0.attention.qkv; overrides "
                                                           "every exclude."}),
                "exclude_patterns": ("STRING", {**multiline,
                                                "tooltip": "Layers to leave out: one regex per line (full match)."}),
                "rank_pattern": ("STRING", {**multiline,
                                            "tooltip": "Per-layer rank: 'regex = rank' per line, first match wins; "
                                                       "rank 0 skips the layer."}),
                "alpha_pattern": ("STRING", {**multiline,
                                             "tooltip": "Per-layer alpha: 'regex = alpha' per line, first match wins."}),
                "conv_dim": ("INT", {"default": d.conv_dim, "min": 0, "max": 1024,
                                     "tooltip": "Rank for Conv layers; 0 leaves them out."}),
                "conv_alpha": ("FLOAT", {"default": d.conv_alpha, "min": 0.0, "max": 4096.0, "step": 0.5,
                                         "tooltip": "Alpha for Conv layers."}),
                "split_qkv": ("BOOLEAN", {"default": d.split_qkv,
                                          "tooltip": "A separate adapter per q / k / v slice of fused projections "
                                                     "(kohya's split_dims; turns DoRA off on those layers)."}),
                "loraplus_lr_ratio": ("FLOAT", {"default": d.loraplus_lr_ratio, "min": 0.0, "max": 64.0, "step": 0.5,
                                                "tooltip": "LoRA+: the up (B) matrices train at lr x ratio "
                                                           "(16 is typical); 0 or 1 = off."}),
                "verbose": ("BOOLEAN", {"default": d.verbose,
                                        "tooltip": "Log every adapted layer with its rank / alpha and every skipped one."}),
                "continue_from": ([NO_FILE, *host.model_files("loras")],
                                  {"tooltip": "Start from an existing adapter in models/loras (ours, kohya / "
                                              "musubi, ai-toolkit, diffusers or PEFT names) instead of a fresh one."}),
            },
            "optional": {  # optional widgets, appended: workflows saved before they existed still validate
                "training_adapter": ([NO_FILE, *host.model_files("loras")],
                                     {"default": NO_FILE,
                                      "tooltip": "Distilled bases (Z-Image Turbo, Flux.1 schnell): a LoRA in "
                                                 "models/loras that undoes the distillation (ai-toolkit's training "
                                                 "adapter), merged into the base while training only. Previews and "
                                                 "the saved adapter leave it out, so the LoRA keeps the few-step "
                                                 "sampling. DoRA cannot adapt its layers."}),
                "training_adapter_strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                                        "tooltip": "Strength the training adapter is merged at, as "
                                                                   "LoraLoader's strength_model (1.0 as trained)."}),
                "lokr_factor": ("INT", {"default": d.lokr_factor, "min": -1, "max": 1024,
                                        "tooltip": "LoKr: size of the small Kronecker factor (4 is common); -1 "
                                                   "picks the most balanced split."}),
                "lokr_full_matrix": ("BOOLEAN", {"default": d.lokr_full_matrix,
                                                 "tooltip": "LoKr: train the large factor as a full matrix (no rank)."}),
                "lr_pattern": ("STRING", {**multiline,
                                          "tooltip": "Per-module lr multiplier: 'regex = multiplier' per line, first "
                                                     "full match wins (e.g. 'layers\\.(2[0-9])\\..* = 0.5'); "
                                                     "combined with LoRA+."}),
            },
        }

    def build(self, model: DitModel, continue_from: str, include_patterns: str, exclude_patterns: str,
              rank_pattern: str, alpha_pattern: str, training_adapter: str = NO_FILE,
              training_adapter_strength: float = 1.0, lr_pattern: str = "", **options):
        cfg = NetworkConfig.from_dict({
            **options,
            "include_patterns": pattern_lines(include_patterns),
            "exclude_patterns": pattern_lines(exclude_patterns),
            "rank_pattern": pattern_values(rank_pattern, "rank_pattern", int),
            "alpha_pattern": pattern_values(alpha_pattern, "alpha_pattern", float),
            "lr_pattern": pattern_values(lr_pattern, "lr_pattern", float),
        })
        selection = select(model.model, model.architecture, cfg)
        if not selection.chosen:
            raise ValueError(
                f"BuildLoRANetwork: no layer of the {model.architecture} model matches; check include / exclude / "
                "rank patterns (full match on dotted names like 'layers.0.attention.qkv')"
            )
        init_from = None if continue_from == NO_FILE else host.model_path("loras", continue_from)
        adapter_file = None if training_adapter == NO_FILE else host.model_path("loras", training_adapter)
        summary = (f"{cfg.algo}, rank {cfg.rank}, alpha {cfg.alpha:g}: {len(selection.chosen)} layers adapted, "
                   f"{len(selection.skipped)} skipped" + (f"; continues {continue_from}" if init_from else ""))
        negative = [pattern for pattern, multiplier in cfg.lr_pattern.items() if multiplier < 0]
        if negative:  # unlearning: said where the user looks, not only in the log
            summary += (f"; WARNING negative lr (unlearning, very unstable; TrainLoRA needs allow_negative_lr) for "
                        f"{', '.join(negative)}")
        if adapter_file is not None:
            config_for_file(model.model, model.architecture, adapter_file)  # a file for another model fails here
            summary += f"; training adapter {training_adapter} at {training_adapter_strength:g}"
        for advice in [] if model.demo else network_advice(model.architecture, cfg.rank):
            log.warning("BuildLoRANetwork: %s", advice)
            summary += f"\nwarning: {advice}"
        return (LoraNetworkSpec(cfg, init_from, adapter_file, training_adapter_strength), summary)
