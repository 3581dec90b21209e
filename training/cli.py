"""`dit-trainer` command line.

    dit-trainer demo [--out DIR] [--steps N]   teach the embedded base a held-out colour (DoRA, CPU)
    dit-trainer train CONFIG.toml              train an adapter as the config describes
    dit-trainer resume CONFIG.toml             continue that run from its newest checkpoint
    dit-trainer ema-merge FILES... --out F     post-hoc EMA over saved adapter checkpoints
    dit-trainer pretrain-demo [...]            re-create the embedded demo base checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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


def cmd_train(args: argparse.Namespace) -> int:
    from .run_config import load_run_config
    from .runner import run_training

    cfg = load_run_config(args.config)
    resume = args.command == "resume"
    on_progress, bar = progress_bar(cfg.train.steps, f"{cfg.output.name}")
    result = run_training(cfg, resume=resume, on_progress=on_progress)
    bar.close()
    state = "stopped early" if result.train.stopped_early else "done"
    print(f"{state} at step {result.train.steps_done}; final loss {result.train.losses[-1]:.4f}")
    print(f"adapter    {result.adapter_path}  (ComfyUI format, loads in LoraLoader)")
    if result.ema_adapter_path is not None:
        print(f"EMA        {result.ema_adapter_path}")
    print(f"loss curve {result.loss_plot}")
    print(f"checkpoints under {result.run_dir / 'checkpoints'} (resume with `dit-trainer resume {args.config}`)")
    return 0


def cmd_ema_merge(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_adapters
    from .network.comfy_format import atomic_save_safetensors
    from .posthoc_ema import merge_adapter_files

    files = []
    for given in args.files:
        path = Path(given)
        files += checkpoint_adapters(path) if path.is_dir() else [path]
    if len(files) < 2:
        raise SystemExit("ema-merge needs at least two adapter files (or a run folder with two or more checkpoints)")
    tensors, metadata = merge_adapter_files(files, args.mode, args.beta, args.beta2, args.sigma_rel)
    out = atomic_save_safetensors(tensors, args.out, metadata)
    print(f"merged {len(files)} checkpoints ({args.mode}) -> {out}")
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
    for name, text in (("train", "train an adapter as a TOML config describes"),
                       ("resume", "continue the config's run from its newest resumable checkpoint")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="run config (.toml): [model] [network] [data] [train] [sample] [output]")
        cmd.set_defaults(func=cmd_train)
    merge = sub.add_parser("ema-merge", help="post-hoc EMA of saved adapter checkpoints")
    merge.add_argument("files", nargs="+", help="adapter .safetensors files, or run folders (all their checkpoints)")
    merge.add_argument("--out", required=True, help="merged adapter file to write")
    merge.add_argument("--mode", choices=("beta", "linear", "sigma_rel"), default="beta")
    merge.add_argument("--beta", type=float, default=0.95, help="EMA decay per checkpoint (beta / linear start)")
    merge.add_argument("--beta2", type=float, default=None, help="final decay of the linear mode")
    merge.add_argument("--sigma-rel", type=float, default=None, help="relative EMA width (EDM2 power-function EMA)")
    merge.set_defaults(func=cmd_ema_merge)
    pretrain = sub.add_parser("pretrain-demo", help="re-create the embedded demo base checkpoint (~15 min on 2 cores)")
    pretrain.add_argument("rest", nargs=argparse.REMAINDER, help="options for the pretraining script (--steps, --out, ...)")
    pretrain.set_defaults(func=cmd_pretrain_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the fix
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
