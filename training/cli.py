"""`dit-trainer` command line.

    dit-trainer demo [--out DIR] [--steps N]   teach the embedded base a held-out colour (DoRA, CPU)
    dit-trainer train CONFIG.toml [--restart]  train as the config describes (a matching run continues)
    dit-trainer resume CONFIG.toml             continue that run from its newest checkpoint
    dit-trainer ema-merge FILES... --out F     post-hoc EMA over saved adapter checkpoints
    dit-trainer pretrain-demo [...]            re-create the embedded demo base checkpoint

On several processes (the same config, README "Train on more GPUs"):

    accelerate launch --num_processes N -m dit_trainer.training.cli train CONFIG.toml

each process trains its rows of every global batch; the main process alone writes and
prints (distributed.py).

Every expected failure (a bad option, a missing or damaged file, a full or read-only
disk, a locked run, a diverged run) prints one line that says what to change, and exits
with 2 for bad input or 1 for a failed run; `--debug` shows the traceback instead.
Ctrl-C or SIGTERM stops after the current step with a checkpoint (exit 130 / 143); a
second Ctrl-C stops at once, still keeping the last complete step.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .console import progress_bar

BAD_INPUT, FAILED = 2, 1
STOP_EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}


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
    from accelerate import PartialState

    from .distributed import processes
    from .run_config import load_run_config
    from .runner import run_training

    cfg = load_run_config(args.config)
    mode = "resume" if args.command == "resume" else "restart" if args.restart else "train"
    main_process = processes().is_main
    on_progress, bar = progress_bar(cfg.train.steps, f"{cfg.output.name}") if main_process else (None, None)
    try:
        result = run_training(cfg, mode=mode, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
        PartialState().destroy_process_group()  # a launched run's processes end together (nothing without one)
    train = result.train
    if not main_process:  # the main process reports
        return STOP_EXIT_CODES.get(train.stop_reason, FAILED) if train.stopped_early else 0
    if train.stopped_early:
        where = train.last_checkpoint or result.run_dir / "checkpoints"
        print(f"stopped by {train.stop_reason} at step {train.steps_done} of {cfg.train.steps}; checkpoint {where}")
        print(f"continue with: dit-trainer resume {args.config}")
        return STOP_EXIT_CODES.get(train.stop_reason, FAILED)
    print(f"done at step {train.steps_done}; final loss {train.losses[-1]:.4f}")
    if train.validation:
        first, last = train.validation[0], train.validation[-1]
        print(f"validation loss {last['loss']:.4f} at step {last['step']} (step {first['step']}: "
              f"{first['loss']:.4f}); series in {result.run_dir / 'validation.jsonl'}")
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
    from .run_folder import RUN_ID_KEY, written_by

    files = []
    for given in args.files:
        path = Path(given)
        files += checkpoint_adapters(path) if path.is_dir() else [path]
    if len(files) < 2:
        raise ValueError("ema-merge needs at least two adapter files (or a run folder with two or more checkpoints)")
    tensors, metadata = merge_adapter_files(files, args.mode, args.beta, args.beta2, args.sigma_rel)
    out = Path(args.out)
    if out.exists() and not written_by(out, metadata.get(RUN_ID_KEY, "")):
        raise ValueError(f"--out {out} exists and is not a merge of this run; pick another --out (it is left as is)")
    out = atomic_save_safetensors(tensors, out, metadata, "choose another --out")
    print(f"merged {len(files)} checkpoints ({args.mode}) -> {out}")
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    from .demo.pretrain import main as pretrain_main

    pretrain_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-trainer", description="LoRA / DoRA training for diffusion transformers")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    # Also accepted after the command (dit-trainer train run.toml --debug); SUPPRESS keeps the flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common],
                          help="train a DoRA adapter on the embedded demo model (CPU, no downloads)")
    demo.add_argument("--out", default="dit_trainer_demo", help="output folder (default: ./dit_trainer_demo)")
    demo.add_argument("--steps", type=int, default=300, help="DoRA training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", parents=[common],
                           help="train an adapter as a TOML config describes")
    train.add_argument("config", help="run config (.toml): [model] [network] [data] [train] [sample] [output]")
    train.add_argument("--restart", action="store_true",
                       help="start over even if the run folder holds a run with the same settings (it is moved aside)")
    train.set_defaults(func=cmd_train)
    resume = sub.add_parser("resume", parents=[common],
                            help="continue the config's run from its newest resumable checkpoint")
    resume.add_argument("config", help="the run's config; only steps and lr may differ from the run's")
    resume.set_defaults(func=cmd_train)
    merge = sub.add_parser("ema-merge", parents=[common],
                           help="post-hoc EMA of saved adapter checkpoints")
    merge.add_argument("files", nargs="+", help="adapter .safetensors files, or run folders (all their checkpoints)")
    merge.add_argument("--out", required=True, help="merged adapter file to write")
    merge.add_argument("--mode", choices=("beta", "linear", "sigma_rel"), default="beta")
    merge.add_argument("--beta", type=float, default=0.95, help="EMA decay per checkpoint (beta / linear start)")
    merge.add_argument("--beta2", type=float, default=None, help="final decay of the linear mode")
    merge.add_argument("--sigma-rel", type=float, default=None, help="relative EMA width (EDM2 power-function EMA)")
    merge.set_defaults(func=cmd_ema_merge)
    pretrain = sub.add_parser("pretrain-demo", parents=[common],
                              help="re-create the embedded demo base checkpoint (~15 min on 2 cores)")
    pretrain.add_argument("rest", nargs=argparse.REMAINDER, help="options for the pretraining script (--steps, --out, ...)")
    pretrain.set_defaults(func=cmd_pretrain_demo)
    return parser


def exit_code(error: BaseException) -> int | None:
    """The exit code of an expected failure, or None for a bug (shown with its traceback)."""
    from .run_folder import RunLocked
    from .storage import NonFiniteError, StorageError

    if isinstance(error, (StorageError, RunLocked, NonFiniteError)):
        return FAILED
    if isinstance(error, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return BAD_INPUT
    if isinstance(error, OSError):
        return FAILED
    return None


def main(argv: list[str] | None = None) -> int:
    from .signals import graceful_stop

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with graceful_stop():
            return args.func(args)
    except KeyboardInterrupt:
        hint = (f"; the last complete step is in the run's newest checkpoint, continue with `dit-trainer resume "
                f"{args.config}`" if args.command in ("train", "resume") else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return STOP_EXIT_CODES["Ctrl-C"]
    except Exception as error:
        code = exit_code(error)
        if code is None or args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
