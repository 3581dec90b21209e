"""Pretrain the demo base checkpoint on every colour but the held-out one.

    python -m dit_trainer.training.demo.pretrain [--steps 2500] [--out PATH]

Full-parameter flow-matching training of the tiny Z-Image DiT on procedurally drawn
shapes. The held-out colour never appears in an image or caption, so the base has
never seen the concept the demo later teaches with a DoRA adapter. 10% of captions
are dropped (empty prompt) so that classifier-free guidance has an unconditional
branch to work with. About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import torch

from ..config import TrainConfig
from ..console import progress_bar
from ..conditioning import Conditioning
from ..data.latents import LatentDataset
from ..loop import train
from ..models.loader import save_dit
from ..timesteps import TimestepConfig
from .model import BASE_CHECKPOINT, build_demo_model, demo_text_encoder
from .pixel_vae import PixelVAE, to_tensor
from .shapes import HELD_OUT_COLOUR, pretrain_samples

CAPTION_DROPOUT = 0.1


def build_pretrain_dataset(n_samples: int, seed: int) -> LatentDataset:
    samples = pretrain_samples(n_samples, seed)
    drop = torch.rand(len(samples), generator=torch.Generator().manual_seed(seed)) < CAPTION_DROPOUT
    captions = ["" if dropped else s.caption for s, dropped in zip(samples, drop.tolist())]
    cond = Conditioning(*demo_text_encoder().encode(captions))
    latents = PixelVAE().encode(to_tensor([s.image for s in samples]))
    return LatentDataset(latents, cond)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BASE_CHECKPOINT))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = build_pretrain_dataset(args.samples, args.seed)
    model = build_demo_model()
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=0.0,
        schedule="cosine",
        warmup_steps=100,
        min_lr_ratio=0.05,
        timesteps=TimestepConfig(method="sigmoid"),
        seed=args.seed,
    )
    on_progress, bar = progress_bar(cfg.steps, "pretrain demo base")
    result = train(model, model, data, cfg, on_progress=on_progress)
    bar.close()
    final_loss = sum(result.losses[-50:]) / len(result.losses[-50:])
    metadata = {
        "held_out_concept": HELD_OUT_COLOUR,
        "pretrain": {"steps": args.steps, "batch": args.batch, "samples": args.samples, "seed": args.seed},
        "final_loss": f"{final_loss:.5f}",
    }
    save_dit(model, args.out, metadata)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"saved {args.out}: {n_params:.2f} M parameters, final loss {final_loss:.4f}, {result.seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
