"""`dit-trainer demo`: teach the tiny base a colour it has never seen, with DoRA, on CPU.

1. load the shipped base (pretrained without the held-out colour) and the built-in
   text encoder and pixel VAE;
2. draw a handful of images of the held-out colour with captions;
3. train an input-axis DoRA adapter on them, with previews;
4. sample the same prompts and seeds with the adapter off (the base) and on, and score
   each image by its dominant colour: the concept score is the share of samples that
   show the held-out colour;
5. write the adapter (ComfyUI format), a before/after grid and the loss curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..conditioning import Conditioning
from ..data.latents import LatentDataset
from ..loop import PreviewSpec, TrainResult, render_previews, train
from ..models.loader import load_dit
from ..network.comfy_format import save_adapter
from ..network.network import NetworkConfig, seeded_network
from ..plots import image_grid, loss_curve, save_png
from ..progress import ProgressCallback
from ..timesteps import TimestepConfig
from .encoders import decode_images
from .model import BASE_CHECKPOINT, demo_text_encoder, missing_checkpoint_error
from .pixel_vae import PixelVAE, to_tensor
from .score import concept_score
from .shapes import HELD_OUT_COLOUR, IMAGE_SIZE, concept_prompts, concept_samples

SAMPLE_STEPS = 20
SAMPLE_CFG = 4.0
SAMPLE_SHIFT = 1.0  # the base was pretrained with unshifted (sigmoid) timesteps


@dataclass
class DemoSettings:
    steps: int = 300
    images: int = 16  # training images of the held-out concept
    seeds_per_prompt: int = 6  # evaluation samples per concept prompt
    lr: float = 3e-3
    rank: int = 8
    alpha: float = 8.0
    sample_every: int = 100
    seed: int = 0


@dataclass
class DemoResult:
    base_score: float
    adapter_score: float
    adapter_path: Path
    grid_path: Path
    loss_path: Path
    train: TrainResult
    seconds: float
    samples_scored: int
    extra: dict = field(default_factory=dict)


def concept_dataset(n_images: int, seed: int) -> LatentDataset:
    samples = concept_samples(n_images, seed)
    cond = Conditioning(*demo_text_encoder().encode([s.caption for s in samples]))
    return LatentDataset(PixelVAE().encode(to_tensor([s.image for s in samples])), cond)


def evaluation_spec(seeds_per_prompt: int, seed: int) -> PreviewSpec:
    """Every concept prompt with `seeds_per_prompt` noise seeds, negative = empty prompt."""
    prompts = [p for p in concept_prompts() for _ in range(seeds_per_prompt)]
    encoder = demo_text_encoder()
    size = IMAGE_SIZE // PixelVAE.downscale
    return PreviewSpec(
        Conditioning(*encoder.encode(prompts)), (PixelVAE.latent_channels, size, size), decode_images,
        Conditioning(*encoder.encode([""] * len(prompts))),
        steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, shift=SAMPLE_SHIFT, seed=seed,
    )


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    base_checkpoint: str | Path = BASE_CHECKPOINT,
    on_progress: ProgressCallback | None = None,
) -> DemoResult:
    settings = settings or DemoSettings()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not Path(base_checkpoint).is_file():
        raise missing_checkpoint_error()
    model = load_dit(base_checkpoint)
    # Seeded, so two runs of the demo train the same adapter and print the same score.
    network = seeded_network(
        model, "zimage", NetworkConfig(algo="dora", dora_axis="input", rank=settings.rank, alpha=settings.alpha),
        settings.seed,
    ).attach()

    cfg = TrainConfig(
        steps=settings.steps,
        batch_size=min(4, settings.images),
        lr=settings.lr,
        weight_decay=0.0,
        schedule="cosine",
        warmup_steps=10,
        timesteps=TimestepConfig(method="sigmoid"),
        seed=settings.seed,
        sample_every=settings.sample_every,
    )
    evaluation = evaluation_spec(settings.seeds_per_prompt, settings.seed + 1000)
    preview = evaluation_spec(1, settings.seed + 2000)
    with torch.no_grad():
        network.set_multiplier(0.0)
        base_images = render_previews(model, evaluation)
        network.set_multiplier(1.0)
    result = train(model, network, concept_dataset(settings.images, settings.seed), cfg, on_progress, preview)
    with torch.no_grad():
        adapter_images = render_previews(model, evaluation)

    base_score = concept_score([np.asarray(i) for i in base_images], HELD_OUT_COLOUR)
    adapter_score = concept_score([np.asarray(i) for i in adapter_images], HELD_OUT_COLOUR)
    adapter_path = save_adapter(
        network,
        out_dir / f"demo_{HELD_OUT_COLOUR}_dora.safetensors",
        base_hash=getattr(model, "base_hash", ""),
        extra_metadata={"dit_trainer_train": cfg.to_dict(), "dit_trainer_concept_score": {"base": base_score, "adapter": adapter_score}},
    )
    grid = image_grid([("base", base_images), (f"DoRA {result.steps_done} steps", adapter_images)], cell=48)
    grid_path = save_png(grid, out_dir / "demo_before_after.png")
    loss_path = save_png(loss_curve(result.losses, title="demo DoRA training loss"), out_dir / "demo_loss.png")
    return DemoResult(
        base_score=base_score,
        adapter_score=adapter_score,
        adapter_path=adapter_path,
        grid_path=grid_path,
        loss_path=loss_path,
        train=result,
        seconds=time.perf_counter() - start,
        samples_scored=len(base_images),
    )
