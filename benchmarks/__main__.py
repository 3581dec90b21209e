"""Run the benchmarks: python -m dit_trainer.benchmarks [NAME] [--quick] [--dtype ...] [--iters N].

NAME picks one of dora_layer, dora_norm, attention, train_step, fused_backward, memory; without it every
benchmark runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import attention, dora_layer, dora_norm, fused_backward, memory, train_step
from .common import parse_setup

BENCHMARKS = {"dora_layer": dora_layer, "dora_norm": dora_norm, "attention": attention, "train_step": train_step,
              "fused_backward": fused_backward, "memory": memory}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = [BENCHMARKS[argv.pop(0)]] if argv and argv[0] in BENCHMARKS else list(BENCHMARKS.values())
    setup = parse_setup(__doc__, argv)
    for bench in chosen:
        bench.run(setup)
        print()


if __name__ == "__main__":
    main()
