"""Timing, memory and table helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

# Larger than any current GPU's L2 (H100: 50 MB), so zeroing it evicts the previous
# iteration's data and memory-bound kernels are timed from DRAM, as in training.
_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    warmup: int
    iters: int
    quick_asked: bool = False  # --quick given (quick is also implied without CUDA)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        mode = "quick (small shapes, PyTorch paths)" if self.quick else "full"
        return f"{name}, {str(self.dtype).removeprefix('torch.')}, {mode}"


def parse_setup(description: str, argv: Sequence[str] | None = None) -> Setup:
    """--quick (also implied without CUDA), --dtype, --iters."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes; the default without CUDA")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="default: bfloat16 on GPU, float32 on CPU"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (median reported)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    iters = args.iters or (3 if quick else 30)
    return Setup(torch.device("cuda" if cuda else "cpu"), dtype, quick, warmup=1 if quick else 10, iters=iters,
                 quick_asked=args.quick)


def time_ms(fn: Callable[[], object], setup: Setup) -> float:
    """Median wall time of fn() in milliseconds (CUDA events, L2 flushed, on GPU)."""
    for _ in range(setup.warmup):
        fn()
    times = []
    if setup.device.type == "cuda":
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=setup.device)
        for _ in range(setup.iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(setup.iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def saved_mib(fn: Callable[[], object], exclude: Iterable[torch.Tensor]) -> float:
    """MiB that autograd keeps alive for the backward of fn(), counted per storage.

    Storages of `exclude` (weights, parameters, the input) are alive anyway and not
    counted: the figure is the activation memory a layer adds, on any device.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory above the starting point while fn() runs; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned numbers; None prints as n/a."""

    def cell(v: object) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(header), *body]) for i in range(len(header))]
    lines = []
    for row in [list(header), *body]:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:]))
        lines.append("  " + "  ".join([first, *rest]))
    return "\n".join(lines)


def ratio(value: float | None, base: float | None) -> str | None:
    """value / base as '1.23x', or None when either is missing."""
    if value is None or base is None:
        return None
    return f"{value / base:.2f}x"
