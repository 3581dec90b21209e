"""`dit-trainer` command line.

    dit-trainer demo [--out DIR] [--steps N]   teach the embedded base a held-out colour (DoRA, CPU)
    dit-trainer pretrain-demo [...]            re-create the embedded demo base checkpoint
"""

from __future__ import annotations

import argparse
import sys

from .console import progress_bar


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoSettings, run_demo
    from .demo.shapes import HELD_OUT_COLOUR

    settings = DemoSettings(steps=args.steps, seed=args.seed)
    on_progress, bar = progress_bar(settings.steps, f"DoRA on '{HELD_OUT_COLOUR}'")
    result = run_demo(args.out, settings, on_progress=on_progress)
    bar.close()
    print(f"concept '{HELD_OUT_COLOUR}' score over {result.samples_scored} samples "
          f"(share of samples whose dominant colour is {HELD_OUT_COLOUR}):")
    print(f"  base     {result.base_score:.2f}")
    print(f"  adapter  {result.adapter_score:.2f}")
    print(f"adapter    {result.adapter_path}  (ComfyUI format, loads in LoraLoader)")
    print(f"grid       {result.grid_path}")
    print(f"loss curve {result.loss_path}")
    print(f"demo took {result.seconds:.1f} s ({result.train.seconds:.1f} s training, "
          f"{result.train.steps_done} steps)")
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from .demo.pretrain import main as pretrain_main

    pretrain_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-trainer", description="LoRA / DoRA training for diffusion transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a DoRA adapter on the embedded demo model (CPU, no downloads)")
    demo.add_argument("--out", default="dit_trainer_demo", help="output folder (default: ./dit_trainer_demo)")
    demo.add_argument("--steps", type=int, default=300, help="DoRA training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    pretrain = sub.add_parser("pretrain-demo", help="re-create the embedded demo base checkpoint (~15 min on 2 cores)")
    pretrain.add_argument("rest", nargs=argparse.REMAINDER, help="options for the pretraining script (--steps, --out, ...)")
    pretrain.set_defaults(func=cmd_pretrain_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
