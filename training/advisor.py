"""Settings advisor: warnings (never errors) for settings far outside the recipes that work.

Recipes differ per architecture, and a learning rate that trains one model destroys another
in a few hundred steps. The ranges below are wide on purpose: they are where published recipes
live, and a warning means "far from every recipe", not "not optimal".

Where the numbers come from:
* ai-toolkit config/examples/train_lora_flux_24gb.yaml and train_lora_qwen_image_24gb.yaml:
  AdamW lr 1e-4 with alpha = rank 16, batch 1, 2000 steps ("500 - 4000 is a good range"),
  resolutions 512 / 768 / 1024;
* kohya sd-scripts docs/flux_train_network: lr 8e-4 (and 1e-4) with network_dim 4, alpha 1;
* musubi-tuner docs (Qwen-Image, Z-Image): lr 1e-4 to 5e-4 (AdamW), discrete_flow_shift 2.2
  (Qwen-Image) and 3.0 (its default, Z-Image), rank 16 to 64;
* schedule-free AdamW (Defazio et al. 2024) runs at 1x to 10x the AdamW lr.

The lr is judged twice: as given (an AdamW lr above 5e-3 is far above every recipe whatever
the alpha) and as the effective lr x alpha / rank (x alpha / sqrt(rank) with RS-LoRA), because
with Adam the weight change per step scales with lr times the adapter scale; recipes at
alpha = rank and at alpha = 1 agree in this unit (1e-4 x 1 vs 8e-4 / 4 = 2e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .network.adapter_base import lora_scale

if TYPE_CHECKING:  # annotations only: the advisor needs no engine state
    from .config import TrainConfig
    from .network.network import NetworkConfig

ADAMW = ("adamw", "adamw_fused", "adamw_foreach")


@dataclass(frozen=True)
class Recipe:
    """Bounds past which a setting is far from the published recipes of one architecture."""

    effective_lr: tuple[float, float]  # lr x adapter scale, AdamW
    resolution: tuple[int, int]  # training resolution (area = resolution^2)
    shift: tuple[float, float]  # discrete_flow_shift of 'shift' sampling
    source: str  # the recipe users should compare with


RECIPES = {
    "flux": Recipe((1e-6, 2e-3), (256, 2048), (0.5, 6.0), "Flux.1: lr 1e-4 at alpha = rank, 512-1024 px"),
    "flux2": Recipe((1e-6, 2e-3), (256, 2048), (0.5, 6.0), "Flux.2: lr 1e-4 at alpha = rank, 512-1024 px"),
    "zimage": Recipe((1e-6, 2e-3), (256, 2048), (1.0, 8.0), "Z-Image: lr 1e-4 at alpha = rank, 1024 px, shift 3"),
    "qwen_image": Recipe((1e-6, 2e-3), (256, 2048), (0.5, 6.0), "Qwen-Image: lr 1e-4 at alpha = rank, 1328 px, "
                                                               "shift 2.2"),
}
MAX_ADAMW_LR = 5e-3  # as given, whatever the alpha
SCHEDULE_FREE_FACTOR = 10.0  # schedule-free tolerates this much more lr
PASSES_PER_IMAGE = (5.0, 400.0)  # samples seen per image: 2000 steps on 20 images is 100
MAX_RANK = 256
MAX_BATCH = 64


def network_advice(architecture: str, rank: int) -> list[str]:
    """What BuildLoRANetwork can judge alone."""
    if rank > MAX_RANK:
        return [f"rank {rank} is far above the usual 4-128 for {architecture} LoRAs: a much bigger file and "
                "slower steps for rarely better results"]
    return []


def training_advice(
    architecture: str, optimizer: str, lr: float, rank: int, alpha: float, use_rslora: bool, steps: int,
    batch_size: int, grad_accum: int, images: int, resolution: int | None = None,
    timestep_method: str = "", shift: float | None = None,
) -> list[str]:
    """Warnings for settings far from the recipes (an empty list when all is ordinary)."""
    recipe = RECIPES.get(architecture)
    advice = network_advice(architecture, rank)
    factor = SCHEDULE_FREE_FACTOR if optimizer == "adamw_schedulefree" else 1.0
    adam_like = optimizer in ADAMW or optimizer == "adamw_schedulefree"
    if adam_like and lr > MAX_ADAMW_LR * factor:
        advice.append(f"lr {lr:g} with {optimizer} is far above the recipes (1e-4 to 1e-3); expect the adapter "
                      "to diverge or burn in within a few hundred steps")
    elif adam_like and recipe is not None:
        effective = lr * lora_scale(rank, alpha, use_rslora)
        low, high = recipe.effective_lr
        if effective > high * factor or effective < low:
            where = "above" if effective > high * factor else "below"
            advice.append(f"lr {lr:g} at rank {rank}, alpha {alpha:g} is an effective lr x alpha/rank of "
                          f"{effective:.2g}, far {where} the recipes ({recipe.source})")
    seen = steps * batch_size * grad_accum / max(1, images)
    if seen > PASSES_PER_IMAGE[1]:
        advice.append(f"{steps} steps x batch {batch_size * grad_accum} on {images} image(s) shows each image "
                      f"{seen:.0f} times (recipes: 50-250); the adapter will likely memorise them; fewer steps "
                      "or more images")
    elif seen < PASSES_PER_IMAGE[0]:
        advice.append(f"{steps} steps x batch {batch_size * grad_accum} on {images} image(s) shows each image only "
                      f"{seen:.1f} times (recipes: 50-250); the adapter will barely learn them")
    if batch_size > MAX_BATCH:
        advice.append(f"batch_size {batch_size} is far above the usual 1-16 for LoRA training")
    if recipe is not None and resolution is not None and not recipe.resolution[0] <= resolution <= recipe.resolution[1]:
        advice.append(f"resolution {resolution} is outside {recipe.resolution[0]}-{recipe.resolution[1]} "
                      f"({recipe.source})")
    if recipe is not None and timestep_method == "shift" and shift is not None \
            and not recipe.shift[0] <= shift <= recipe.shift[1]:
        advice.append(f"discrete_flow_shift {shift:g} is outside {recipe.shift[0]:g}-{recipe.shift[1]:g} "
                      f"({recipe.source})")
    return advice


def run_advice(architecture: str, train: "TrainConfig", network: "NetworkConfig", images: int,
               resolution: int | None) -> list[str]:
    """`training_advice` for a run's option objects (TrainLoRA and the CLI call this)."""
    held_out = round(train.validation_split * images) if train.validation_split else 0
    return training_advice(
        architecture, train.optimizer, train.lr, network.rank, network.alpha, network.use_rslora, train.steps,
        train.batch_size, train.grad_accum, max(1, images - held_out), resolution, train.timesteps.method,
        train.timesteps.discrete_flow_shift,
    )
