"""The memory benchmark: its quick mode runs, and its accounting is exact against materialised models."""

from __future__ import annotations

import pytest
import torch

from dit_trainer.benchmarks import memory
from dit_trainer.benchmarks.common import Setup
from dit_trainer.training.models.blocks import block_names
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig

QUICK = Setup(torch.device("cpu"), torch.float32, True, warmup=0, iters=1, quick_asked=True)


def actual_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def test_quick_mode_prints_every_model_and_row(capsys) -> None:
    with torch.random.fork_rng():
        memory.run(QUICK)
    out = capsys.readouterr().out
    tables = out.split("Memory, ")[1:]
    assert len(tables) == len(memory.TINY)
    for model_table in tables:
        for label, *_ in memory.ROWS:
            assert f"\n  {label} " in model_table
        assert "saved bytes per token per block" in model_table
    assert "peak host RSS GiB" in tables[0] and "fp8_scaled" in tables[0]


@pytest.mark.parametrize("case", memory.TINY, ids=lambda c: c.shape.title)
@pytest.mark.parametrize("storage", ["bf16", "fp8_e4m3fn", "fp8_scaled"])
def test_the_weight_accounting_equals_the_materialised_model(case, storage) -> None:
    with torch.device("meta"):
        meta = case.shape.build()
    sizes = memory.storage_bytes(meta, storage)
    model = memory.materialise(case.shape, storage, torch.device("cpu"))
    assert sum(sizes.values()) == actual_bytes(model)
    for block in block_names(model):
        assert sizes[block] == actual_bytes(model.get_submodule(block)), block
    swapped = block_names(model)[-case.blocks_to_swap:]
    acts = memory.Activations({s: 1.0 for s in memory.BLOCK_STACKS[model.architecture]},
                              {s: 0.5 for s in memory.BLOCK_STACKS[model.architecture]}, 0.0)
    swap = memory.account(meta, storage, case.blocks_to_swap, False, 100, acts, case.shape.rank)
    assert swap.weights_host == sum(actual_bytes(model.get_submodule(b)) for b in swapped)
    network = LoRANetwork(model, model.architecture, NetworkConfig(rank=case.shape.rank, alpha=case.shape.rank))
    assert swap.adapter == sum(p.numel() * 4 for p in network.parameters())
    assert swap.training_state == 4 * swap.adapter  # parameters, gradients, AdamW's two states


def test_checkpointing_keeps_only_block_inputs_plus_one_block() -> None:
    with torch.device("meta"):
        meta = memory.REAL[0].shape.build()  # Z-Image at its real depth: 34 blocks
    acts = memory.Activations({"noise_refiner": 10.0, "context_refiner": 10.0, "layers": 20.0},
                              {"noise_refiner": 1.0, "context_refiner": 1.0, "layers": 2.0}, 3.0)
    assert acts.total(meta, 1, checkpointing=False) == 2 * 10 + 2 * 10 + 30 * 20 + 3
    assert acts.total(meta, 1, checkpointing=True) == 2 * 1 + 2 * 1 + 30 * 2 + 20 + 3
