"""Block swap: identical losses and adapter gradients with it on and off (fp32, CPU), with and without
gradient checkpointing, on fp8 bases, across a resume; and the swapped weights really leave the device.

On a CPU the real copies are no-ops, so `Poisoned` makes them visible: a fetch is a real copy,
and an evicted block holds NaN. Any computation that touched a block that was not fetched,
forward or backward, would turn the loss or a gradient into NaN instead of the exact values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from dit_trainer.training.config import TrainConfig
from dit_trainer.training.loop import train
from dit_trainer.training.models.block_swap import BlockSwap, enable_block_swap, move_model
from dit_trainer.training.models.blocks import transformer_blocks
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.network.network import NetworkConfig, seeded_network

from tiny_models import ARCHITECTURES, tiny_data, tiny_inputs, tiny_model


class Poisoned(BlockSwap):
    """Fetches are real copies (tracked), evicted blocks hold NaN."""

    def __init__(self, model, blocks_to_swap):
        super().__init__(model, blocks_to_swap)
        self.copies: list[tuple[int, StorageWeakRef]] = []
        self.most_resident = 0

    def _to_device(self, host):
        copy = host.clone()
        # The storage, not the tensor object: a parameter's `.data = copy` keeps only the storage.
        self.copies.append((id(host), StorageWeakRef(copy.untyped_storage())))
        return copy

    def _offloaded(self, slot):
        return torch.full_like(slot.host, float("nan")) if slot.host.is_floating_point() else slot.host

    def _make_resident(self, index):
        super()._make_resident(index)
        self.most_resident = max(self.most_resident, len(self.resident))

    def alive_blocks(self) -> int:
        """Swapped blocks with at least one device copy still alive (held by the module or by autograd)."""
        hosts = {id(slot.host): index for index, slots in self.slots.items() for slot in slots}
        return len({hosts[host] for host, ref in self.copies if not ref.expired()})


def model_with_network(architecture: str, swap: int, checkpointing: bool, algo: str = "lora",
                       quantize: str | None = None):
    model = load_dit(tiny_model(architecture).state_dict(), quantize=quantize)
    model.gradient_checkpointing = checkpointing
    network = seeded_network(model, architecture, NetworkConfig(algo=algo, rank=4, alpha=4), seed=5).attach()
    with torch.no_grad():  # B away from zero, so the adapter changes every output
        for adapter in network.adapters:
            adapter.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(6))
    if swap:  # after the DoRA magnitudes were read: from here on an evicted block holds NaN
        model.block_swap = Poisoned(model, swap)
    move_model(model, "cpu")
    return model, network


def loss_and_grads(model, network) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, sigma, inputs = tiny_inputs(model)
    loss = (model(x, sigma, **inputs) - x).square().mean()
    params = [p for p in network.parameters() if p.requires_grad]
    # Qwen-Image's last block computes a text stream nothing reads: its adapters get no gradient.
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros(()) if g is None else g for g in grads]


CASES = [(a, c, algo, q) for a in ARCHITECTURES for c in (False, True) for algo, q in (("lora", None), ("dora", None))]
CASES += [("flux", c, "dora", "fp8_scaled") for c in (False, True)] + [("qwen_image", False, "lora", "fp8_e4m3fn")]


@pytest.mark.parametrize("architecture,checkpointing,algo,quantize", CASES)
def test_block_swap_gives_identical_losses_and_adapter_gradients(architecture, checkpointing, algo, quantize):
    reference = loss_and_grads(*model_with_network(architecture, 0, checkpointing, algo, quantize))
    n_blocks = len(transformer_blocks(tiny_model(architecture)))
    for swap in (1, n_blocks - 1, n_blocks):
        model, network = model_with_network(architecture, swap, checkpointing, algo, quantize)
        loss, grads = loss_and_grads(model, network)
        assert torch.equal(loss, reference[0]), swap
        for got, want in zip(grads, reference[1]):
            assert torch.equal(got, want), swap
        assert model.block_swap.most_resident <= 2  # the block running and the one being copied


@pytest.mark.parametrize("checkpointing", [False, True])
def test_between_forward_and_backward_only_two_swapped_blocks_stay_on_the_device(checkpointing: bool) -> None:
    model, network = model_with_network("zimage", 4, checkpointing)
    x, sigma, inputs = tiny_inputs(model)
    loss = (model(x, sigma, **inputs) - x).square().mean()
    assert model.block_swap.alive_blocks() <= 2  # autograd holds slot references, not the weights
    loss.backward()
    log = model.block_swap.log
    fetched = [index for event, index in log if event == "fetch"]
    # Forward fetches the swapped blocks in order, backward in reverse (re-fetching what was evicted).
    assert fetched == [1, 2, 3, 4, 3, 2, 1]
    model.block_swap.release()
    assert model.block_swap.alive_blocks() == 0


def test_without_the_saved_tensor_references_autograd_would_keep_every_swapped_block(monkeypatch) -> None:
    """Negative control for the test above: it measures what autograd keeps alive."""
    monkeypatch.setattr(Poisoned, "_pack", lambda self, index, tensor: tensor)
    model, network = model_with_network("zimage", 4, checkpointing=False)
    x, sigma, inputs = tiny_inputs(model)
    loss = model(x, sigma, **inputs).square().mean()  # the graph holds what autograd saved
    # Blocks 2-4 (the main layers); swapped block 1, the context refiner, is not adapted and its input
    # needs no gradient, so autograd saves nothing of it either way.
    assert model.block_swap.alive_blocks() == 3 and loss.requires_grad


def train_run(swap: int, checkpointing: bool, run_dir: Path | None = None, stop_after: int | None = None,
              resume: bool = False):
    model, network = model_with_network("flux", swap, checkpointing)
    cfg = TrainConfig(steps=6, batch_size=2, lr=5e-3, seed=3, gradient_checkpointing=checkpointing)
    seen: list[int] = []
    result = train(model, network, tiny_data(model), cfg, on_progress=lambda e: seen.append(e.step),
                   should_stop=None if stop_after is None else (lambda: len(seen) >= stop_after),
                   run_dir=run_dir, resume_from=run_dir if resume else None)
    return result, network


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_with_block_swap_and_a_resume_equals_training_without(tmp_path: Path, checkpointing: bool) -> None:
    plain, plain_network = train_run(0, checkpointing)
    first, _ = train_run(3, checkpointing, tmp_path, stop_after=3)
    assert first.stopped_early and first.steps_done == 3
    resumed, network = train_run(3, checkpointing, tmp_path, resume=True)
    assert resumed.losses == plain.losses
    for key, value in plain_network.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


def test_blocks_to_swap_out_of_range_names_the_block_count() -> None:
    model = tiny_model("qwen_image")
    with pytest.raises(ValueError, match="between 1 and the model's 3 transformer blocks"):
        enable_block_swap(model, 4)
    assert enable_block_swap(model, 0) is None
    swap = enable_block_swap(model, 2)
    assert model.block_swap is swap and list(swap.swapped) == [1, 2]


def test_the_model_table_sets_storage_block_swap_and_compile() -> None:
    from dit_trainer.training.models.quantization import Float8Linear
    from dit_trainer.training.run_config import parse_run_config
    from dit_trainer.training.runner import load_model

    cfg = parse_run_config({"model": {"dtype": "fp8_scaled", "blocks_to_swap": 2}, "data": {}})
    model = load_model(cfg.model.checkpoint, cfg.model.dtype, cfg.model.attention, cfg.model.blocks_to_swap,
                       cfg.model.compile)
    assert len(list(model.block_swap.swapped)) == 2
    assert any(isinstance(m, Float8Linear) for m in model.modules())
    with pytest.raises(ValueError, match=r"\[model\] dtype 'fp4' is not one of"):
        load_model(cfg.model.checkpoint, "fp4", "auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned memory and side-stream copies")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_on_a_gpu_swapped_blocks_stay_off_the_device_and_the_step_is_exact(checkpointing: bool) -> None:
    results = []
    for swap in (0, 3):
        model = load_dit(tiny_model("flux").state_dict())
        network = seeded_network(model, "flux", NetworkConfig(rank=4, alpha=4), seed=5).attach()  # CPU init
        model.gradient_checkpointing = checkpointing
        enable_block_swap(model, swap)
        move_model(model, "cuda")
        network.to("cuda")
        x, sigma, inputs = tiny_inputs(model)
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = (model(x.cuda(), sigma.cuda(), **inputs) - x.cuda()).square().mean()
        grads = torch.autograd.grad(loss, [p for p in network.parameters() if p.requires_grad], allow_unused=True)
        torch.cuda.synchronize()
        if swap:
            model.block_swap.release()
            assert all(p.device.type == "cpu" for i in model.block_swap.swapped
                       for p in model.block_swap.blocks[i].parameters())
        results.append((loss.item(), [None if g is None else g.cpu() for g in grads]))
    assert results[0][0] == results[1][0]
    for plain, swapped in zip(results[0][1], results[1][1]):
        assert (plain is None and swapped is None) or torch.equal(plain, swapped)
