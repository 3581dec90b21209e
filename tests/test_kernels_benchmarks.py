"""The benchmarks' quick mode (small shapes, PyTorch paths on CPU) runs, so they do not rot."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny CPU ops on a shared, busy machine spend most of their time in OpenMP
    # hand-offs; one thread keeps this check quick. Restored for the tests after it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_benchmarks_quick_mode_runs(capsys, one_thread):
    pytest.importorskip("peft")
    from dit_trainer.benchmarks.__main__ import main

    # The benchmarks seed the global RNG; keep that from leaking into later tests.
    with torch.random.fork_rng():
        main(["--quick", "--iters", "1"])
    out = capsys.readouterr().out
    for expected in (
        "DoRA layer, forward + backward",
        "vs PEFT DoRA",
        "DoRA output axis (PEFT)",
        "DoRA input axis (ours, torch)",
        "DoRA weight norm",
        "vs read-W0",
        "Attention",
        "fwd+bwd vs SDPA",
        "Training step, Z-Image-shaped DiT",
        "DoRA output axis (torch)",
        "ms / step",
    ):
        assert expected in out
