"""Attention backends vs PyTorch SDPA, forward and forward + backward, side by side.

    python -m dit_trainer.benchmarks.attention [--quick] [--dtype bfloat16]

Backends that cannot run here (not installed, wrong GPU or dtype) are listed with the
reason instead of a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import attention as attn
from .common import Setup, parse_setup, ratio, table, time_ms

# (label, batch, tokens, heads, head_dim): joint image + text attention at 1024x1024.
FULL_SHAPES = [
    ("Flux.1", 1, 4608, 24, 128),
    ("Z-Image", 1, 4608, 30, 128),
]
QUICK_SHAPES = [("quick", 1, 128, 4, 64)]


def run(setup: Setup) -> None:
    shapes = QUICK_SHAPES if setup.quick else FULL_SHAPES
    print(f"Attention  [{setup.describe()}]  installed: {', '.join(attn.available_backends())}")
    for label, batch, tokens, heads, head_dim in shapes:
        shape = (batch, tokens, heads, head_dim)
        q, k, v = (torch.randn(shape, device=setup.device, dtype=setup.dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=setup.device, dtype=setup.dtype)
        rows, base = [], {}
        for backend in ("sdpa", "cute", "flash"):
            try:
                attn.select_backend(setup.device, setup.dtype, head_dim, backend)
            except RuntimeError as err:
                # The first reason is enough for a table cell; select_backend lists them all.
                reason = str(err).split(": ", 1)[1].split("; ")[0]
                rows.append((backend, None, None, None, None, reason))
                continue

            def forward(backend: str = backend) -> None:
                with torch.no_grad():
                    attn.attention(q, k, v, backend=backend)

            def step(backend: str = backend) -> None:
                attn.attention(q, k, v, backend=backend).backward(grad)

            fwd, both = time_ms(forward, setup), time_ms(step, setup)
            base = base or {"fwd": fwd, "both": both}
            rows.append((backend, fwd, ratio(fwd, base["fwd"]), both, ratio(both, base["both"]), ""))
        print(f"\n{label}: batch={batch} tokens={tokens} heads={heads} head_dim={head_dim}")
        print(table(("backend", "fwd ms", "fwd vs SDPA", "fwd+bwd ms", "fwd+bwd vs SDPA", "note"), rows))


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
