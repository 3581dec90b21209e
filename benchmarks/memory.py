"""Memory of a LoRA rank-32 training step at 1024x1024 at real model sizes: bf16 / fp8 / + block swap / + checkpointing.

    python -m dit_trainer.benchmarks memory [--quick]

The full models are accounted on a CPU too (only --quick switches to tiny configs, in MiB).

Models at their released shapes (random weights): Z-Image (6B), Flux.1-dev (12B), Flux.2
klein 4B / 9B and Qwen-Image (20B); one 1024x1024 image and a 512-token caption. Rows:
bf16 base, fp8_scaled base, fp8 + N swapped blocks, and that with gradient checkpointing.

Every row is an exact accounting on the full model, built on the meta device (no memory):
base weights on the GPU and in host memory, adapter parameters, their gradients and AdamW
states, and activations. Activations come from a measured run: one block of each kind at
the real width, materialised block by block, a real forward and backward at a reduced
token count, with the bytes autograd saves counted per block and scaled by the token
ratio (the attention kernels keep O(tokens) for the backward, so saved bytes are linear in
tokens) and the block count. With checkpointing a block keeps only its inputs, plus one
block's activations while it is recomputed.

On a GPU (without --quick) each row is also run for real: the full model materialised
block by block on the device (swapped blocks in host memory), 1024x1024, and the peak
CUDA memory and the median step time are measured. On a CPU those columns are n/a.

Host RAM of loading: a reduced-depth real-width checkpoint is written and loaded in a
fresh process in each storage; its peak resident memory (VmHWM, which counts the mapped
file) and peak anonymous memory (what the load created) are printed next to the file size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..training.models.block_swap import enable_block_swap, move_model
from ..training.models.blocks import BLOCK_STACKS, block_linear_names, block_names
from ..training.models.loader import save_dit
from ..training.models.quantization import quantize_linears
from ..training.models.qwen_image import QwenImageConfig
from ..training.models.zimage import ZImageConfig
from ..training.network.network import LoRANetwork, NetworkConfig
from .common import Setup, parse_setup, table, time_ms
from .train_step import FULL, QUICK, ModelShape, _sample

GIB, MIB = 2**30, 2**20
GPU_ITERS = 3  # timed full-model steps per row on a GPU (median)
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32, per adapter parameter
REDUCED_IMAGE_SIDE = 16  # the measured run: 16 x 16 = 256 image tokens ...
REDUCED_TEXT_TOKENS = 64  # ... and a 64-token caption


@dataclass(frozen=True)
class Case:
    """A model at its real depth and the blocks the swap rows keep in host memory."""

    shape: ModelShape
    blocks_to_swap: int


def _real_depth(shape: ModelShape) -> ModelShape:
    config = shape.config
    if isinstance(config, ZImageConfig):
        config = replace(config, n_layers=shape.real_depth[0], n_refiner_layers=ZImageConfig().n_refiner_layers)
    elif isinstance(config, QwenImageConfig):
        config = replace(config, num_layers=shape.real_depth[0])
    else:
        config = replace(config, depth=shape.real_depth[0], depth_single_blocks=shape.real_depth[1])
    return replace(shape, config=config)


# Swapped blocks chosen so fp8 + swap fits the targets (Flux.1-dev <= 16 GB, Qwen-Image
# <= 24 GB, klein 9B <= 12 GB) with room for the allocator.
REAL = [Case(_real_depth(shape), swap) for shape, swap in zip(FULL, (12, 16, 8, 14, 16))]
TINY = [Case(shape, 1) for shape in QUICK]
ROWS = (("bf16", "bf16", False, False), ("fp8", "fp8_scaled", False, False),
        ("fp8 + swap", "fp8_scaled", True, False), ("fp8 + swap + ckpt", "fp8_scaled", True, True))


def _reduced(shape: ModelShape) -> ModelShape:
    """One block of each kind, the real width, a reduced token count: the measured run."""
    config = shape.config
    if isinstance(config, ZImageConfig):
        config = replace(config, n_layers=1, n_refiner_layers=1)
    elif isinstance(config, QwenImageConfig):
        config = replace(config, num_layers=1)
    else:
        config = replace(config, depth=1, depth_single_blocks=1)
    side = min(shape.latent[1], REDUCED_IMAGE_SIDE * config.patch_size)
    return replace(shape, config=config, latent=(shape.latent[0], side),
                   text=(min(shape.text[0], REDUCED_TEXT_TOKENS), shape.text[1]))


def _tokens(shape: ModelShape) -> int:
    return shape.image_tokens() + shape.text[0]


# --- exact accounting on the meta device --------------------------------------------


def storage_bytes(model: nn.Module, storage: str) -> dict[str, int]:
    """Bytes of every block (by name) and of the rest ('') when the base is stored as `storage`."""
    float8 = set(block_linear_names(model)) if storage.startswith("fp8") else set()
    blocks = block_names(model)
    owner = {}
    for block in blocks:
        for name, _ in model.get_submodule(block).named_parameters():
            owner[f"{block}.{name}"] = block
    out = dict.fromkeys(["", *blocks], 0)
    for name, param in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in float8 and name.endswith(".weight"):
            rows = param.shape[0] if storage == "fp8_scaled" else 1
            size = param.numel() + 4 * rows  # one byte per weight, a float32 scale per row / tensor
        else:
            size = param.numel() * 2  # bf16
        out[owner.get(name, "")] += size
    return out


@dataclass
class Account:
    weights_gpu: int
    weights_host: int
    adapter: int
    activations: int

    @property
    def training_state(self) -> int:
        """Adapter parameters, their gradients and AdamW's two states, all fp32."""
        return self.adapter * (2 + ADAMW_STATES)

    @property
    def gpu(self) -> int:
        return self.weights_gpu + self.training_state + self.activations


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes per token, measured: per block (by stack), outside the blocks, block inputs."""

    per_block: dict[str, float]  # stack -> bytes per token of one block
    inputs: dict[str, float]  # stack -> bytes per token of one block's tensor inputs (what checkpointing keeps)
    outside: float

    def total(self, model: nn.Module, tokens: int, checkpointing: bool) -> int:
        counts = {stack: len(getattr(model, stack)) for stack in BLOCK_STACKS[model.architecture]}
        if checkpointing:
            kept = sum(self.inputs[s] * n for s, n in counts.items()) + max(self.per_block.values())
        else:
            kept = sum(self.per_block[s] * n for s, n in counts.items())
        return int((kept + self.outside) * tokens)


def account(model: nn.Module, storage: str, blocks_to_swap: int, checkpointing: bool, tokens: int,
            activations: Activations, rank: int) -> Account:
    sizes = storage_bytes(model, storage)
    blocks = block_names(model)
    swapped = blocks[len(blocks) - blocks_to_swap:] if blocks_to_swap else []
    host = sum(sizes[b] for b in swapped)
    window = sum(sorted((sizes[b] for b in swapped), reverse=True)[:2])  # the block running + the one arriving
    adapter = LoRANetwork(model, model.architecture, NetworkConfig(rank=rank, alpha=rank))
    adapter_bytes = sum(p.numel() * 4 for p in adapter.parameters())
    return Account(sum(sizes.values()) - host + window, host, adapter_bytes,
                   activations.total(model, tokens, checkpointing))


# --- materialising and measuring ------------------------------------------------------


def materialise(shape: ModelShape, storage: str, device: torch.device, host_blocks: int = 0) -> nn.Module:
    """The model with random weights, built on the meta device and materialised block by block
    (each block quantised before the next exists; the last `host_blocks` blocks on the CPU)."""
    with torch.device("meta"):
        model = shape.build()
    blocks = block_names(model)
    on_host = set(blocks[len(blocks) - host_blocks:]) if host_blocks else set()
    torch.manual_seed(0)
    fmt = storage if storage.startswith("fp8") else None

    def fill(module: nn.Module, where: torch.device) -> None:
        module.to_empty(device=where, recurse=True).to(torch.bfloat16)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0.0, 0.02)

    for name, child in model.named_children():
        if name not in BLOCK_STACKS[model.architecture]:
            fill(child, device)
    for param_name, param in list(model._parameters.items()):
        model._parameters[param_name] = nn.Parameter(torch.zeros(param.shape, dtype=torch.bfloat16, device=device))
    for block in blocks:
        module = model.get_submodule(block)
        fill(module, torch.device("cpu") if block in on_host else device)
        if fmt:
            quantize_linears(module, [n for n, m in module.named_modules() if isinstance(m, nn.Linear)], fmt)
    return model.requires_grad_(False).eval()


def measure_activations(shape: ModelShape) -> tuple[Activations, float]:
    """Saved bytes per token on the reduced model (CPU or GPU agnostic: counted, not allocated), and its step ms."""
    reduced = _reduced(shape)
    model = materialise(reduced, "bf16", torch.device("cpu"))
    setup = Setup(torch.device("cpu"), torch.bfloat16, True, warmup=0, iters=1)
    x, sigma, cond = _sample(reduced, setup)
    network = LoRANetwork(model, model.architecture, NetworkConfig(rank=reduced.rank, alpha=reduced.rank)).attach()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *network.parameters())}
    per_block: dict[str, list[int]] = {}
    inputs: dict[str, int] = {}
    outside = {}
    current: list[dict[int, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            (current[-1] if current else outside)[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = []
    for name in block_names(model):
        stack = name.split(".")[0]

        def start(module, args, stack=stack):
            inputs[stack] = sum(a.nbytes for a in args if isinstance(a, torch.Tensor))
            current.append({})

        def end(module, args, output, stack=stack):
            per_block.setdefault(stack, []).append(sum(current.pop().values()))

        block = model.get_submodule(name)
        hooks += [block.register_forward_pre_hook(start), block.register_forward_hook(end)]
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, sigma, **cond.model_inputs(model)).float().square().mean()
        loss.backward()
        optimizer.step()

    milliseconds = time_ms(step, setup)
    for hook in hooks:
        hook.remove()
    tokens = _tokens(reduced)
    return Activations({s: max(v) / tokens for s, v in per_block.items()},
                       {s: v / tokens for s, v in inputs.items()}, sum(outside.values()) / tokens), milliseconds


def gpu_step(case: Case, storage: str, swap: bool, checkpointing: bool, setup: Setup) -> tuple[float, float]:
    """(peak GiB, ms / step) of the full model on the GPU."""
    shape = case.shape
    torch.cuda.empty_cache()
    model = materialise(shape, storage, setup.device, case.blocks_to_swap if swap else 0)
    if swap:
        enable_block_swap(model, case.blocks_to_swap)
    move_model(model, setup.device)
    model.gradient_checkpointing = checkpointing
    network = LoRANetwork(model, model.architecture, NetworkConfig(rank=shape.rank, alpha=shape.rank))
    network.to(setup.device).attach()
    x, sigma, cond = _sample(shape, replace(setup, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    inputs = cond.model_inputs(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, sigma, **inputs).float().square().mean()
        loss.backward()
        optimizer.step()

    step()  # AdamW's states exist from here: the peak of a steady-state step is what counts
    torch.cuda.reset_peak_memory_stats(setup.device)
    milliseconds = time_ms(step, replace(setup, warmup=1, iters=GPU_ITERS))  # whole-model steps: seconds each
    peak = torch.cuda.max_memory_allocated(setup.device) / GIB
    del model, network, optimizer
    return peak, milliseconds


# --- host RAM of loading ------------------------------------------------------------------

_LOAD_PROBE = r"""
import json, os, sys, threading, time
from dit_trainer.training.models.setup import load_base

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def anonymous():  # resident minus file-backed pages: what the OS cannot drop (the mapped file can be)
    with open("/proc/self/statm") as f:
        resident, shared = (int(x) for x in f.read().split()[1:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart VmHWM from the current RSS: imports are not the load's
base_rss, base_anon = status("VmRSS"), anonymous()
peak, done = [base_anon], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0005)

sampler = threading.Thread(target=sample)
sampler.start()
model = load_base(sys.argv[1], sys.argv[2])
done.set()
sampler.join()
print(json.dumps({"rss": status("VmHWM") - base_rss, "anonymous": max(peak[0], anonymous()) - base_anon}))
"""


def loading_peak(path: Path, storage: str) -> tuple[float, float] | tuple[None, None]:
    """Peak resident and peak anonymous memory (GiB) of loading `path` as `storage` in a fresh process."""
    if not sys.platform.startswith("linux"):
        return None, None
    probe = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(path), storage], capture_output=True,
                           text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, timeout=1800)
    if probe.returncode:
        raise RuntimeError(f"loading probe failed: {probe.stderr[-2000:]}")
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    return report["rss"] / GIB, report["anonymous"] / GIB


def host_ram_table(case: Case) -> str:
    reduced = _reduced(case.shape)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reduced.safetensors"
        save_dit(materialise(reduced, "bf16", torch.device("cpu")), path)
        size = path.stat().st_size / GIB
        rows = [(storage, size, *loading_peak(path, storage)) for storage in ("bf16", "fp8_e4m3fn", "fp8_scaled")]
    # Resident memory counts the mapped file's pages (page cache the OS can drop); anonymous memory is
    # what the load created: the cast or quantised tensors it keeps, plus one tensor's temporaries.
    return table(("load as", "file GiB", "peak host RSS GiB", "of it anonymous GiB"), rows)


# --- the tables -------------------------------------------------------------------------------


def run_case(case: Case, setup: Setup, host_ram: bool = True) -> None:
    shape = case.shape
    with torch.device("meta"):
        full = shape.build()
    n_blocks = len(block_names(full))
    activations, reduced_ms = measure_activations(shape)
    mode = setup.describe() if setup.device.type == "cuda" or setup.quick_asked else "cpu: accounted, not run"
    print(f"Memory, {shape.title} ({shape.blocks()}, width {shape.width()}, {shape.image_tokens()} image + "
          f"{shape.text[0]} text tokens, LoRA rank {shape.rank}; swap rows: {case.blocks_to_swap} of {n_blocks} "
          f"blocks)  [{mode}]")
    on_gpu = setup.device.type == "cuda" and not setup.quick_asked
    unit, name = (MIB, "MiB") if setup.quick_asked else (GIB, "GiB")
    rows = []
    for label, storage, swap, checkpointing in ROWS:
        bytes_ = account(full, storage, case.blocks_to_swap if swap else 0, checkpointing, _tokens(shape),
                         activations, shape.rank)
        peak, ms = gpu_step(case, storage, swap, checkpointing, setup) if on_gpu else (None, None)
        rows.append((label, bytes_.weights_gpu / unit, bytes_.weights_host / unit, bytes_.training_state / unit,
                     bytes_.activations / unit, bytes_.gpu / unit, peak, ms))
    print(table(("row", "weights GPU", "weights host", "adapter+grad+AdamW", "activations", f"GPU total {name}",
                 "measured peak GiB", "ms / step"), rows))
    bf16_ms = rows[0][-1]
    if bf16_ms is not None:
        print("  step time vs bf16: " + ", ".join(f"{r[0]} {r[-1] / bf16_ms:.2f}x" for r in rows[1:]))
    reduced = _reduced(shape)
    print(f"  measured run: {reduced.blocks()} at width {reduced.width()}, {_tokens(reduced)} tokens, "
          f"{reduced_ms:.0f} ms / step on the CPU; saved bytes per token per block: "
          + ", ".join(f"{s} {v / 1024:.1f} KiB" for s, v in activations.per_block.items()))
    if host_ram:
        print("  host RAM of loading (reduced-depth file, fresh process):")
        print(host_ram_table(case))


def run(setup: Setup) -> None:
    for i, case in enumerate(TINY if setup.quick_asked else REAL):
        if i:
            print()
        run_case(case, setup, host_ram=i == 0 or not setup.quick_asked)  # quick: one model's, to stay quick


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
