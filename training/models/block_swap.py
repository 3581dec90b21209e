"""Block swap: the last N transformer blocks live in host memory and visit the GPU one at a time.

Each swapped block's weights (parameters and buffers) are held in pinned host memory. A
forward pre-hook on every block makes the block about to run resident on the compute
device and starts copying the next swapped block on a side CUDA stream, so the copy
overlaps the current block's compute; a swapped block that is neither running nor next is
evicted (its tensors point back at the host copies and the device copies are freed). In
the backward pass the same schedule runs in reverse:

* with gradient checkpointing, the block is recomputed in backward, so its forward
  pre-hook runs again and fetches it (and prefetches the block before it);
* without, the weights autograd saved for the backward are not kept on the GPU: a
  saved-tensor hook packs each swapped block's weight as a reference to its slot and
  unpacking fetches the block back (and prefetches the one before it).

The direction flips when the gradient reaches the model's output. On a CPU-only machine
the copies are no-ops (host and device are the same memory) but the schedule, the hooks
and the saved-tensor references run exactly as on a GPU, which is what the tests check.
The swapped weights are frozen, so nothing is ever copied back to the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .blocks import transformer_blocks


@dataclass
class _Slot:
    """One tensor of a swapped block: where it lives in the module and its host copy."""

    module: nn.Module
    name: str
    is_parameter: bool
    host: torch.Tensor

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            getattr(self.module, self.name).data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def current(self) -> torch.Tensor:
        tensor = getattr(self.module, self.name)
        return tensor.data if self.is_parameter else tensor


@dataclass(frozen=True)
class _SavedWeight:
    """A saved-for-backward view of a swapped weight, stored as its slot instead of its device memory."""

    block: int
    slot: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class BlockSwap:
    """Keeps the last `blocks_to_swap` transformer blocks of `model` in host memory (see the module doc)."""

    def __init__(self, model: nn.Module, blocks_to_swap: int):
        blocks = transformer_blocks(model)
        if not 0 < blocks_to_swap <= len(blocks):
            raise ValueError(f"blocks_to_swap={blocks_to_swap} must be between 1 and the model's {len(blocks)} "
                             "transformer blocks (0 turns block swap off)")
        self.model = model
        self.blocks = blocks
        self.first_swapped = len(blocks) - blocks_to_swap
        self.device = torch.device("cpu")
        self.slots: dict[int, list[_Slot]] = {}
        self.resident: set[int] = set()
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.direction = 1  # +1 forward, -1 backward
        self.stream: torch.cuda.Stream | None = None
        self.log: list[tuple[str, int]] = []  # ("fetch" | "evict", block): the schedule, for tests and debugging
        self._hooks = [model.register_forward_pre_hook(self._model_starts),
                       model.register_forward_hook(self._model_ends)]
        self._saved_hooks: contextlib.ExitStack | None = None
        for index, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda m, args, i=index: self._block_starts(i)))
            self._hooks.append(block.register_forward_hook(lambda m, args, out, i=index: self._block_ends(i),
                                                           always_call=True))  # an exception must close the hooks

    @property
    def swapped(self) -> range:
        return range(self.first_swapped, len(self.blocks))

    # --- placement -------------------------------------------------------------------

    def place(self, device: torch.device | str) -> None:
        """Move the model to `device`, except the swapped blocks' tensors, which go to (pinned) host memory."""
        self.release()
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        swapped_modules = {id(m) for i in self.swapped for m in self.blocks[i].modules()}
        for module in self.model.modules():
            if id(module) in swapped_modules:
                continue
            for name, param in module._parameters.items():
                if param is not None:
                    param.data = param.data.to(self.device)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        pin = torch.cuda.is_available()  # pinned pages make the host -> GPU copies asynchronous
        for index in self.swapped:
            if index in self.slots:  # placed before: the host copies are already there
                continue
            slots = []
            for module in self.blocks[index].modules():
                for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                    if tensor is None:
                        continue
                    host = tensor.detach().to("cpu")
                    slots.append(_Slot(module, name, name in module._parameters, host.pin_memory() if pin else host))
            self.slots[index] = slots
            for slot in slots:
                slot.set(self._offloaded(slot))

    def release(self) -> None:
        """Evict every swapped block (after training or sampling: nothing of them stays on the device)."""
        for index in sorted(self.resident | set(self.pending)):
            self._evict(index)

    def remove(self) -> None:
        """Take the hooks off (the blocks stay where they are)."""
        for hook in self._hooks:
            hook.remove()

    # --- transfers -------------------------------------------------------------------

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def _fetch(self, index: int) -> None:
        """Start copying swapped block `index` to the device (on the side stream) unless it is there or on its way."""
        if index in self.resident or index in self.pending:
            return
        self.log.append(("fetch", index))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            copies = [self._to_device(slot.host) for slot in self.slots[index]]
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        self.pending[index] = (copies, event)

    def _make_resident(self, index: int) -> None:
        if index in self.resident:
            return
        self._fetch(index)
        copies, event = self.pending.pop(index)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for copy in copies:  # the allocator must not reuse them while the compute stream still reads them
                copy.record_stream(compute)
        for slot, copy in zip(self.slots[index], copies):
            slot.set(copy)
        self.resident.add(index)

    def _offloaded(self, slot: _Slot) -> torch.Tensor:
        """What an evicted slot holds: its host copy."""
        return slot.host

    def _evict(self, index: int) -> None:
        self.pending.pop(index, None)
        if index in self.resident:
            self.log.append(("evict", index))
            for slot in self.slots[index]:
                slot.set(self._offloaded(slot))
            self.resident.discard(index)

    def _enter(self, index: int) -> None:
        """Block `index` is about to compute: make it resident, prefetch the next one, evict the rest."""
        following = index + self.direction
        keep = {index, following}
        for other in sorted(self.resident | set(self.pending)):
            if other not in keep:
                self._evict(other)
        if index in self.slots:
            self._make_resident(index)
        if following in self.slots:
            self._fetch(following)

    # --- hooks -----------------------------------------------------------------------

    def _model_starts(self, module: nn.Module, args) -> None:
        self.direction = 1

    def _model_ends(self, module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward_starts)

    def _backward_starts(self, grad: torch.Tensor) -> None:
        self.direction = -1
        last = len(self.blocks) - 1
        if last in self.slots:
            self._fetch(last)

    def _block_starts(self, index: int) -> None:
        self._block_ends(index)
        self._enter(index)
        checkpointed = getattr(self.model, "gradient_checkpointing", False)
        if index in self.slots and torch.is_grad_enabled() and not checkpointed:
            # Checkpointing saves nothing inside the block (it recomputes), and its own saved-tensor
            # hooks must stay in charge there; without it, weights are saved as slot references.
            self._saved_hooks = contextlib.ExitStack()
            self._saved_hooks.enter_context(torch.autograd.graph.saved_tensors_hooks(
                lambda tensor, i=index: self._pack(i, tensor), self._unpack))

    def _block_ends(self, index: int) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.close()
            self._saved_hooks = None

    def _pack(self, index: int, tensor: torch.Tensor) -> torch.Tensor | _SavedWeight:
        storage = tensor.untyped_storage().data_ptr()
        for position, slot in enumerate(self.slots[index]):
            if slot.current().untyped_storage().data_ptr() == storage and tensor.dtype == slot.host.dtype:
                return _SavedWeight(index, position, tuple(tensor.shape), tuple(tensor.stride()),
                                    tensor.storage_offset())
        return tensor

    def _unpack(self, packed: torch.Tensor | _SavedWeight) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self._enter(packed.block)
        weight = self.slots[packed.block][packed.slot].current()
        return weight.as_strided(packed.size, packed.stride, packed.offset)


def enable_block_swap(model: nn.Module, blocks_to_swap: int) -> BlockSwap | None:
    """Swap the last `blocks_to_swap` blocks of `model` (0: none, and any earlier swap is taken off)."""
    previous = getattr(model, "block_swap", None)
    if previous is not None:
        previous.release()
        previous.remove()
        model.block_swap = None
    if blocks_to_swap:
        model.block_swap = BlockSwap(model, blocks_to_swap)
    return getattr(model, "block_swap", None)


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to(device)`, keeping swapped blocks in host memory when block swap is on."""
    swap: BlockSwap | None = getattr(model, "block_swap", None)
    if swap is None:
        return model.to(device)
    swap.place(device)
    return model


@contextlib.contextmanager
def blocks_released(model: nn.Module) -> Iterator[None]:
    """Inside: run the model; on exit no swapped block is left on the device."""
    try:
        yield
    finally:
        swap = getattr(model, "block_swap", None)
        if swap is not None:
            swap.release()
