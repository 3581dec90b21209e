"""DoRA weight norm: Triton kernel vs the eager reference vs the materialised norm, against
the time to read W0 once at the GPU's peak DRAM bandwidth (the floor for any exact norm).

    python -m dit_trainer.benchmarks.dora_norm [--quick] [--dtype bfloat16]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import dora
from ..kernels.dora_reference import AXES
from .common import Setup, parse_setup, ratio, table, time_ms

# (label, out_features, in_features)
FULL_SHAPES = [
    ("Flux.1 attn proj", 3072, 3072),
    ("Flux.1 MLP down", 3072, 12288),
    ("Z-Image attn proj", 3840, 3840),
]
FULL_RANKS = (16, 64)
QUICK_SHAPES = [("quick", 192, 256)]
QUICK_RANKS = (16,)


def peak_read_ms(nbytes: int, device: torch.device) -> tuple[float | None, str]:
    """Time to stream nbytes at the device's theoretical DRAM bandwidth (double data rate
    x bus width x memory clock, from the device properties), and how it was found."""
    if device.type != "cuda":
        return None, "no GPU"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not (clock_khz and bus_bits):
        return None, "this torch does not report the memory clock"
    bandwidth = 2 * clock_khz * 1e3 * bus_bits / 8
    return nbytes / bandwidth * 1e3, f"{bandwidth / 1e9:.0f} GB/s"


def _compare(setup: Setup, n_out: int, n_in: int, rank: int, dtype: torch.dtype, axis: str) -> list[tuple]:
    """Rows (implementation, ms, vs read-W0, vs Triton) for one weight."""
    torch.manual_seed(0)
    w_full = torch.randn(n_out, n_in, device=setup.device) * n_in**-0.5
    # fp32 LoRA masters: the kernel's slower, tf32x3 path.
    lora_A = torch.randn(rank, n_in, device=setup.device) * n_in**-0.5
    lora_B = torch.randn(n_out, rank, device=setup.device) * 0.01
    w_scale = None
    if dtype == torch.float8_e4m3fn:
        w_scale = w_full.abs().amax() / 448.0  # e4m3 max
        weight = (w_full / w_scale).to(dtype)
    else:
        weight = w_full.to(dtype)
    base_sq = dora.base_sq_norm(weight, axis, weight_scale=w_scale)

    def norm(backend: str) -> torch.Tensor:
        return dora.dora_weight_norm(weight, lora_A, lora_B, 0.5, axis, base_sq, weight_scale=w_scale, backend=backend)

    def materialised() -> torch.Tensor:
        w = weight.float() if w_scale is None else weight.float() * w_scale
        return (w + 0.5 * lora_B @ lora_A).norm(dim=0 if axis == "input" else 1)

    floor, how = peak_read_ms(weight.numel() * weight.element_size(), setup.device)
    triton_ms = time_ms(lambda: norm("triton"), setup) if setup.device.type == "cuda" else None
    rows = [
        (f"read W0 once at peak ({how})", floor),
        ("Triton kernel", triton_ms),
        ("eager reference (no B@A)", time_ms(lambda: norm("torch"), setup)),
        ("materialised ||W0 + sBA|| (PEFT-style)", time_ms(materialised, setup)),
    ]
    return [(name, t, ratio(t, floor), ratio(t, triton_ms)) for name, t in rows]


def run(setup: Setup) -> None:
    shapes, ranks = (QUICK_SHAPES, QUICK_RANKS) if setup.quick else (FULL_SHAPES, FULL_RANKS)
    dtypes = [setup.dtype]
    if setup.device.type == "cuda" and torch.cuda.get_device_capability(setup.device) >= (8, 9):
        dtypes.append(torch.float8_e4m3fn)
    print(f"DoRA weight norm  [{setup.describe()}]")
    for label, n_out, n_in in shapes:
        for rank in ranks:
            for dtype in dtypes:
                for axis in AXES:
                    dtype_name = str(dtype).removeprefix("torch.")
                    print(f"\n{label}: out={n_out} in={n_in} rank={rank} {dtype_name} axis={axis}")
                    rows = _compare(setup, n_out, n_in, rank, dtype, axis)
                    print(table(("implementation", "ms", "vs read-W0", "vs Triton"), rows))


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
