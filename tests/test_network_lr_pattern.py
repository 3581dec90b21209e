"""Per-module learning rates (lr_pattern): the optimizer groups and the verbose listing carry each module's lr."""

import logging

import pytest
import torch

from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.optimizers import make_optimizer
from test_adapter_math import tiny_model

PATTERN = {r"layers\.0\..*": 0.5, r"layers\..*\.attention\..*": 2.0}  # first fullmatch wins


def expected_multiplier(name: str) -> float:
    if name.startswith("layers.0."):
        return 0.5
    if name.startswith("layers.") and ".attention." in name:
        return 2.0
    return 1.0


def test_groups_carry_each_modules_lr_with_loraplus_on_top():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, lr_pattern=PATTERN, loraplus_lr_ratio=4.0))
    groups = network.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["lora_A x0.5", "lora_A x2", "lora_A", "lora_B x0.5", "lora_B x2", "lora_B"]
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == len(list(network.parameters()))  # every parameter in exactly one group
    for adapter in network.adapters:
        multiplier = expected_multiplier(adapter.name)
        assert lr_of[id(adapter.lora_A)] == pytest.approx(1e-3 * multiplier), adapter.name
        assert lr_of[id(adapter.lora_B)] == pytest.approx(1e-3 * multiplier * 4.0), adapter.name
    optimizer = make_optimizer("adamw", groups, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_loha_factors_get_their_module_multiplier():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(algo="loha", rank=2, lr_pattern=PATTERN))
    lr_of = {id(p): g["lr"] for g in network.param_groups(1e-3) for p in g["params"]}
    for adapter in network.adapters:
        for p in adapter.parameters():
            assert lr_of[id(p)] == pytest.approx(1e-3 * expected_multiplier(adapter.name))


def test_verbose_listing_shows_the_effective_lr(caplog):
    with caplog.at_level(logging.INFO):
        network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2, lr_pattern=PATTERN, verbose=True))
        network.param_groups(1e-3)
    assert "adapted layers.0.attention.qkv: linear, rank 2, alpha 1, lora, lr x0.5" in caplog.text
    assert "adapted layers.1.attention.qkv: linear, rank 2, alpha 1, lora, lr x2" in caplog.text
    assert "lr layers.1.attention.qkv: lora_A 0.002, lora_B 0.002" in caplog.text
    assert "lr layers.1.feed_forward.w1: lora_A 0.001, lora_B 0.001" in caplog.text


def test_default_groups_are_unchanged_without_a_pattern():
    network = LoRANetwork(tiny_model(), "zimage", NetworkConfig(rank=2))
    assert [(g["name"], g["lr"]) for g in network.param_groups(1e-3)] == [("lora_A", 1e-3), ("lora_B", 1e-3)]


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match="lr_pattern: invalid regex"):
        NetworkConfig(lr_pattern={"layers.(": 0.5})
    with pytest.raises(ValueError, match="finite"):
        NetworkConfig(lr_pattern={"layers.*": float("inf")})
