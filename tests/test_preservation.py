"""Differential output preservation and regularisation images."""

import itertools

import pytest
import torch

from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.loop import train
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.preservation import WithRegularisation, dop_loss
from data_helpers import CountingEncoders, build, small_config, write_image
from test_resume import tiny_model_and_data

NETWORK = NetworkConfig(rank=4, alpha=4)


def with_class_prompts(data: LatentDataset, seed: int = 9) -> LatentDataset:
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    return LatentDataset(data.latents, data.cond, class_cond=Conditioning(torch.randn(n, 3, 8, generator=g),
                                                                          torch.full((n,), 3)))


def probe(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, 4, 4, generator=g), torch.tensor([0.2, 0.4, 0.6, 0.8])


def test_dop_loss_is_zero_for_an_adapter_that_changes_nothing():
    model, data = tiny_model_and_data()
    network = LoRANetwork(model, "zimage", NETWORK).attach()  # B = 0: the adapter is a no-op
    noisy, sigma = probe()
    cls = with_class_prompts(data).class_cond.rows([0, 1, 2, 3])
    assert dop_loss(model, network, noisy, sigma, cls).item() == 0.0
    with torch.no_grad():
        for adapter in network.adapters:
            adapter.lora_B.normal_(0, 0.1)
    loss = dop_loss(model, network, noisy, sigma, cls)
    assert loss.item() > 0
    loss.backward()  # the gradient reaches the adapter; the base side has none
    assert all(a.lora_B.grad is not None for a in network.adapters)
    assert all(a.enabled for a in network.adapters), "the adapter is enabled again after the base pass"


def drift_on_class_prompts(dop_weight: float) -> float:
    """Mean squared difference adapter vs base on the class prompts after a short, aggressive run."""
    model, data = tiny_model_and_data()
    data = with_class_prompts(data)
    network = LoRANetwork(model, "zimage", NETWORK).attach()
    cfg = TrainConfig(steps=40, batch_size=2, lr=1e-2, seed=1, preservation={"dop_weight": dop_weight})
    train(model, network, data, cfg)
    noisy, sigma = probe()
    inputs = data.class_cond.rows([0, 1, 2, 3]).model_inputs(model)
    with torch.no_grad():
        adapted = model(noisy, sigma, **inputs)
        network.set_enabled(False)
        base = model(noisy, sigma, **inputs)
    return float((adapted - base).square().mean())


def test_dop_keeps_the_base_output_on_class_prompts():
    without, with_dop = drift_on_class_prompts(0.0), drift_on_class_prompts(1.0)
    print(f"class-prompt drift from the base: without DOP {without:.3g}, with DOP {with_dop:.3g}")
    assert without > 0
    assert with_dop < 0.5 * without, (with_dop, without)  # stated margin: at least 2x closer to the base


def test_dop_without_class_prompts_is_a_clear_error():
    model, data = tiny_model_and_data()
    with pytest.raises(ValueError, match="trigger_word and class_word"):
        train(model, LoRANetwork(model, "zimage", NETWORK).attach(), data,
              TrainConfig(steps=1, preservation={"dop_weight": 1.0}))


def test_folder_dataset_encodes_class_prompts_up_front(tmp_path):
    for i, caption in enumerate(["ohwx man, beach", "[trigger] at night"]):
        write_image(tmp_path / f"img{i}.png", 32, 32, seed=i)
        (tmp_path / f"img{i}.txt").write_text(caption)
    encoders = CountingEncoders()
    data = build(tmp_path, small_config(cache_latents_to_disk=False, trigger_word="ohwx", class_word="man"), encoders)
    assert sorted(encoders.captions_seen) == sorted(["ohwx man, beach", "man man, beach", "ohwx at night",
                                                     "man at night"])
    calls = encoders.text_calls
    batch = next(data.batches(2, seed=0))
    assert encoders.text_calls == calls  # DOP needs no text encoder while training fixed captions
    states, lengths = encoders.text.encode(["man man, beach", "man at night"])

    def rows(context, lens):
        return {tuple(row[: int(n)].flatten().tolist()) for row, n in zip(context, lens)}

    assert rows(batch.class_cond.context, batch.class_cond.context_lens) == rows(states, lengths)


def test_regularisation_batches_alternate_with_their_weight_and_resume_mid_stream():
    _, data = tiny_model_and_data()
    g = torch.Generator().manual_seed(2)
    reg = LatentDataset(torch.randn(3, 4, 4, 4, generator=g) + 10, Conditioning(torch.randn(3, 3, 8, generator=g),
                                                                                torch.full((3,), 3)))
    mixed = WithRegularisation(data, reg, 0.5)
    full = list(itertools.islice(mixed.batches(2, seed=1), 9))
    assert [b.loss_scale for b in full] == [1.0, 0.5] * 4 + [1.0]
    assert all((b.latents.mean() > 5) == (i % 2 == 1) for i, b in enumerate(full))  # reg images are the +10 ones
    for start in (1, 4, 5):
        tail = list(itertools.islice(mixed.batches(2, seed=1, start=start), 9 - start))
        assert all(torch.equal(a.latents, b.latents) and a.loss_scale == b.loss_scale
                   for a, b in zip(full[start:], tail))


def test_resume_is_exact_with_dop_and_regularisation_images(tmp_path):
    def setup():
        model, data = tiny_model_and_data()
        network = LoRANetwork(model, "zimage", NetworkConfig(rank=4, alpha=4, dropout=0.1)).attach()
        g = torch.Generator().manual_seed(2)
        reg = LatentDataset(torch.randn(3, 4, 4, 4, generator=g), Conditioning(torch.randn(3, 3, 8, generator=g),
                                                                               torch.full((3,), 3)))
        return model, network, with_class_prompts(data), reg

    cfg = TrainConfig(steps=10, batch_size=2, grad_accum=2, lr=5e-3, seed=4,
                      preservation={"dop_weight": 0.5, "reg_weight": 0.7})
    model, network, data, reg = setup()
    straight = train(model, network, data, cfg, regularisation_data=reg)
    model, resumed_network, data, reg = setup()
    seen = []
    train(model, resumed_network, data, cfg, on_progress=lambda e: seen.append(e), should_stop=lambda: len(seen) >= 4,
          run_dir=tmp_path, regularisation_data=reg)
    model, resumed_network, data, reg = setup()
    resumed = train(model, resumed_network, data, cfg, run_dir=tmp_path, resume_from=tmp_path, regularisation_data=reg)
    assert resumed.losses == straight.losses
    for key, value in network.state_dict().items():
        assert torch.equal(value, resumed_network.state_dict()[key]), key
