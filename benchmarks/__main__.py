"""Run every benchmark: python -m dit_trainer.benchmarks [--quick] [--dtype ...] [--iters N]."""

from __future__ import annotations

from collections.abc import Sequence

from . import attention, dora_layer, dora_norm, fused_backward, train_step
from .common import parse_setup


def main(argv: Sequence[str] | None = None) -> None:
    setup = parse_setup(__doc__, argv)
    for bench in (dora_layer, dora_norm, attention, train_step, fused_backward):
        bench.run(setup)
        print()


if __name__ == "__main__":
    main()
