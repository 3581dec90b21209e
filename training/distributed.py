"""Several processes, one run: which rows each process trains, how their gradients meet, who writes files.

`accelerate launch --num_processes N -m dit_trainer.training.cli train run.toml` starts N
copies of the CLI (torchrun under accelerate); accelerate's PartialState gives each its
index and the process group (NCCL on GPUs, gloo on CPUs). Nothing here starts processes.

Decisions, and why:

* `batch_size` is per process (kohya's and accelerate's convention: it is what one GPU
  must hold), so the global batch is batch_size x processes. The run's settings record
  the global batch (run_settings.py) and a checkpoint stores its process count, so a run
  continues on another number of processes whenever the global batch stays the same
  (2 x 2 resumes as 1 x 4 and the reverse).
* Every process draws the same GLOBAL batch stream (the data stream is a pure function of
  the seed and the batches drawn), the same noise and sigmas for the whole global batch,
  and keeps its own contiguous slice of rows (`local_rows`). The union of the slices is
  exactly what one process with the global batch trains on, and the data position in a
  checkpoint (global batches drawn) means the same on any number of processes.
* Each process's loss is its share of the GLOBAL loss: its rows' weighted sum divided by
  the global batch's weight (`loss_share`; every process holds the whole global batch, so
  this needs no communication). The global loss and its gradient are then plain sums
  over processes, also for uneven slices (a bucket's short last batch) and for a process
  that gets no rows at all.
* Gradients: the adapter network is hook-based and lives outside the model, so DDP would
  never see a forward through the module that owns the trainable parameters, and wrapping
  model + network in one DDP module would make DDP broadcast the whole frozen base at
  start-up. Instead the trainable gradients are summed with one all-reduce of a single
  flat buffer after the backward of the optimizer step's last micro-batch (`sum_gradients`):
  once per optimizer step whatever grad_accum is, and for adapters of a few MB the lost
  overlap with backward costs little next to the base's forward and backward.
* After that sum every process holds the same gradients, so clipping, the optimizer
  update, max-norm rescaling and the EMA compute the same values on every process without
  further communication; `check_in_step` verifies it at every checkpoint.
* Only the main process writes files (run record, checkpoints, adapters, samples, plots,
  tracker logs, demo data). `on_main` runs a writer there and hands its result, or its
  error, to the others, so a failure on the main process ends every process with the
  same message instead of leaving them waiting.
* Stop requests (Cancel, Ctrl-C, SIGTERM) are agreed with `first_reason`, so all processes
  stop after the same step, with one complete checkpoint and the same exit code.
* A frozen base that does not fit one GPU (`[train] fsdp = true`): `shard_frozen_base`
  shards it with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per transformer
  block and the rest at the root, as accelerate's FSDP2 plugin does with its transformer
  wrap policy. Each block is moved to the device and sharded in turn, so the GPU never
  holds more than the shards plus one whole block. The adapters stay outside the sharded
  modules, replicated, with their gradients summed as above: FSDP only all-gathers the
  frozen weights for each block's forward and backward, so the maths is the unsharded
  one. The loop calls fully_shard itself rather than `accelerator.prepare(model)` with
  accelerate's FSDP plugin: accelerate's FSDP2 preparation re-points the optimizer's
  parameters at the model's sharded ones, and ours are the adapter's, outside the model;
  and accelerate enables FSDP on accelerators only, while fully_shard runs under gloo on
  CPUs too, which is how it is tested. Every process then takes part in each forward,
  so with fsdp the previews are rendered by all of them (the main process keeps them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .data.latents import LatentBatch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    index: int  # this process's rank
    count: int  # processes in the run

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def several(self) -> bool:
        return self.count > 1


def processes() -> Processes:
    """This process's place in the run (one process, index 0, outside `accelerate launch`).

    `cpu` when CUDA is absent: accelerate then joins a launched run with gloo (MULTI_CPU).
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes)


def local_rows(rows: int, procs: Processes) -> torch.Tensor:
    """This process's contiguous slice of a global batch of `rows` (as even as possible; may be empty)."""
    return torch.arange(rows).tensor_split(procs.count)[procs.index]


def local_batch(batch: LatentBatch, rows: torch.Tensor) -> LatentBatch:
    weights = None if batch.weights is None else batch.weights[rows]
    class_cond = None if batch.class_cond is None else batch.class_cond.rows(rows)  # DOP prompts of the same rows
    return replace(batch, latents=batch.latents[rows], cond=batch.cond.rows(rows), weights=weights,
                   class_cond=class_cond)


def loss_share(batch: LatentBatch, rows: torch.Tensor) -> float:
    """The part of the global batch's loss weight that `rows` carry: local mean x share sums to the global mean.

    flow_loss is a (weighted) mean over all elements, and the rows of one batch have one
    size, so the share is the rows' fraction of the weight (of the row count, unweighted).
    """
    if batch.weights is None:
        return len(rows) / batch.latents.shape[0]
    total = batch.weights.sum()
    return float(batch.weights[rows].sum() / total) if total > 0 else len(rows) / batch.latents.shape[0]


def sum_over(value: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum of `value` over all processes (itself with one process)."""
    return reduce(value, "sum") if procs.several else value


def sum_gradients(params: list[torch.Tensor], procs: Processes) -> None:
    """Replace each parameter's gradient by its sum over processes (one all-reduce of one flat buffer).

    A parameter without a gradient (no rows here, or unused) takes part with zeros, so every
    process sends the same layout.
    """
    if not procs.several:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = reduce(_flatten_dense_tensors(grads), "sum")
    for p, summed in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = summed.view_as(p)


def first_reason(reason: str | None, procs: Processes, device: torch.device) -> str | None:
    """The reason of the lowest-ranked process that has one (a stop request), the same on every process.

    One scalar all-reduce per call; the reasons themselves are gathered only when there is one.
    """
    if not procs.several:
        return reason
    if sum_over(torch.tensor([float(reason is not None)], device=device), procs).item() == 0:
        return None
    return next(r for r in gather_object([reason]) if r is not None)


def check_in_step(params: list[torch.Tensor], procs: Processes, step: int) -> None:
    """Raise unless every process holds the same trainable values (they must: same gradients, same update)."""
    if not procs.several:
        return
    local = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [local.clone() for _ in range(procs.count)]
    torch.distributed.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            f"the processes hold different adapter weights at step {step}: their updates diverged; "
            "report this with the run's config (every process must run the same code and options)"
        )


def _share(value: object, procs: Processes) -> object:
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn: Callable[[], T], procs: Processes | None = None) -> T:
    """Run `fn` on the main process only and return its result on every process.

    An exception on the main process is raised on every process, so none is left waiting.
    """
    procs = procs or processes()
    if not procs.several:
        return fn()
    outcome: tuple[bool, object] = (True, None)
    if procs.is_main:
        try:
            outcome = (True, fn())
        except Exception as error:  # handed to the other processes, raised everywhere below
            outcome = (False, error)
    ok, value = _share(outcome, procs)
    if not ok:
        raise value  # the same error (a copy of it on the other processes), so the CLI prints one message
    return value


def main_first(fn: Callable[[], T], procs: Processes | None = None) -> T:
    """Run `fn` on the main process, then on the others (it fills caches they read); its result on each."""
    procs = procs or processes()
    if not procs.several:
        return fn()
    result = on_main(fn, procs)
    return result if procs.is_main else fn()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DiT: the members of its top-level ModuleLists (layers, double_blocks, ...)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def shard_frozen_base(model: nn.Module, procs: Processes, device: torch.device) -> None:
    """Shard the frozen base across the processes with FSDP2, block by block (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("train option fsdp shards a frozen base; this model has trainable weights (train an "
                         "adapter network, or turn fsdp off)")
    mesh = init_device_mesh(device.type, (procs.count,))
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = sum(p.to_local().nbytes for p in model.parameters())
    whole = sum(p.nbytes for p in model.parameters())  # a DTensor's nbytes is the whole tensor's
    log.info("fsdp: the frozen base is sharded over %d processes in %d blocks + the rest; this process holds "
             "%.1f MB of its %.1f MB", procs.count, len(blocks), held / 2**20, whole / 2**20)
