"""Per-block torch.compile: equals eager, and a new bucket shape reuses the compiled graphs."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from dit_trainer.training.models.block_compile import compile_blocks
from dit_trainer.training.models.block_swap import enable_block_swap, move_model
from dit_trainer.training.network.network import NetworkConfig, seeded_network

from tiny_models import tiny_conditioning, tiny_model


def forward(model, side: int) -> torch.Tensor:
    x = torch.randn(2, model.cfg.in_channels, side, side, generator=torch.Generator().manual_seed(side))
    return model(x, torch.tensor([0.3, 0.6]), **tiny_conditioning(model, 2).model_inputs(model))


def test_compiled_blocks_equal_eager_and_do_not_recompile_for_new_sequence_lengths() -> None:
    torch._dynamo.reset()
    eager = tiny_model("flux")
    compiled = tiny_model("flux")
    for model in (eager, compiled):
        seeded_network(model, "flux", NetworkConfig(rank=4, alpha=4), seed=1).attach()
    enable_block_swap(compiled, 1)  # the swap hooks stay eager around the compiled forwards
    move_model(compiled, "cpu")
    # aot_eager traces and runs the graphs through AOTAutograd without a C compiler.
    assert compile_blocks(compiled, backend="aot_eager") == 4
    assert compile_blocks(compiled, backend="aot_eager") == 0  # once only
    with torch.no_grad():
        torch.testing.assert_close(forward(compiled, 8), forward(eager, 8), rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        for side in (12, 16):  # other buckets: other image token counts
            torch.testing.assert_close(forward(compiled, side), forward(eager, side), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
