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
        "Training step, Z-Image (tiny)",
        "Training step, Flux.1-dev (tiny)",
        "Training step, Flux.2 klein (tiny)",
        "Training step, Qwen-Image (tiny)",
        "DoRA output axis (torch)",
        "ms / step",
    ):
        assert expected in out
    # Every model's table has its LoRA row and both DoRA axes (rows start with two spaces).
    tables = out.split("Training step, ")[1:]
    assert len(tables) == 4
    for model_table in tables:
        for row in ("\n  LoRA ", "\n  DoRA input axis (torch)", "\n  DoRA output axis (torch)"):
            assert row in model_table, model_table


def test_full_shapes_are_the_released_models():
    from dataclasses import replace

    from dit_trainer.benchmarks import dora_layer, train_step
    from dit_trainer.training.models.flux import FluxConfig
    from dit_trainer.training.models.flux_layouts import flux_variant
    from dit_trainer.training.models.qwen_image import QwenImageConfig

    # Each Flux slice, at its released depth, is the released model (widths, heads, text
    # width, MLP, guidance), and its latent gives 1024x1024's 4096 image tokens.
    released = {"Flux.1-dev": "flux1-dev", "Flux.2 klein 4B": "flux2-klein-4b", "Flux.2 klein 9B": "flux2-klein-9b"}
    by_title = {shape.title: shape for shape in train_step.FULL}
    for title, variant in released.items():
        shape = by_title[title]
        double, single = shape.real_depth
        assert flux_variant(replace(shape.config, depth=double, depth_single_blocks=single)) == variant, title
        assert shape.image_tokens() == 4096, title
        assert isinstance(shape.config, FluxConfig) and shape.text[1] == shape.config.context_in_dim, title
    qwen = by_title["Qwen-Image"]
    assert replace(qwen.config, num_layers=qwen.real_depth[0]) == QwenImageConfig()  # the released 20B model
    assert qwen.image_tokens() == 4096 and qwen.text[1] == qwen.config.joint_attention_dim

    # Every DoRA layer shape is a Linear of that model (in, out, bias), built without memory.
    layers = {}
    for shape in train_step.FULL:
        with torch.device("meta"):
            model = shape.build()
        layers[shape.title] = {
            (m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, torch.nn.Linear)
        }
    model_of = {"Flux.1 ": "Flux.1-dev", "Flux.2 klein 4B ": "Flux.2 klein 4B", "Flux.2 klein 9B ": "Flux.2 klein 9B",
                "Z-Image ": "Z-Image", "Qwen-Image ": "Qwen-Image"}
    for label, n_in, n_out, _, bias in dora_layer.FULL_SHAPES:
        (title,) = [title for prefix, title in model_of.items() if label.startswith(prefix)]
        assert (n_in, n_out, bias) in layers[title], label
