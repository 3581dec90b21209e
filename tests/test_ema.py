"""Online EMA: a hand-computed sequence with start_step and update_every, warmup, swap-in, state."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dit_trainer.training.ema import AdapterEMA


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.adapter = nn.Parameter(torch.zeros(2, dtype=dtype))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def set_weights(module: Tiny, value: float) -> None:
    with torch.no_grad():
        module.adapter.fill_(value)


def run(ema: AdapterEMA, module: Tiny, weights: dict[int, float]) -> list[float]:
    seen = []
    for step, value in weights.items():
        set_weights(module, value)
        ema.update(step)
        seen.append(ema.state_dict()["adapter"][0].item())
    return seen


def test_sequence_with_start_step_and_update_every():
    module = Tiny()
    ema = AdapterEMA(module, decay=0.5, start_step=2, update_every=2)
    seen = run(ema, module, {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0, 6: 60.0})
    # steps 1, 2 (<= start_step): copy; 3 and 5: skipped ((step - 2) % 2 != 0); 4 and 6: average
    after_4 = 0.5 * 20.0 + 0.5 * 40.0
    assert seen == pytest.approx([10.0, 20.0, 20.0, after_4, after_4, 0.5 * after_4 + 0.5 * 60.0])


def test_averages_from_the_initial_weights_when_start_step_is_zero():
    module = Tiny()
    set_weights(module, 1.0)
    ema = AdapterEMA(module, decay=0.9)
    seen = run(ema, module, {1: 2.0, 2: 4.0})
    first = 0.9 * 1.0 + 0.1 * 2.0
    assert seen == pytest.approx([first, 0.9 * first + 0.1 * 4.0])


def test_warmup_ramps_the_decay_up_to_its_cap():
    module = Tiny()
    ema = AdapterEMA(module, decay=0.2, start_step=1, warmup=True)
    seen = run(ema, module, {1: 8.0, 2: 4.0, 3: 2.0, 4: 1.0})
    d0, d1, d2 = 1 / 10, 2 / 11, 0.2  # (1 + k) / (10 + k), capped at decay from k = 2 on (3/12 > 0.2)
    e2 = d0 * 8.0 + (1 - d0) * 4.0
    e3 = d1 * e2 + (1 - d1) * 2.0
    assert seen == pytest.approx([8.0, e2, e3, d2 * e3 + (1 - d2) * 1.0])


def test_only_trainable_parameters_are_tracked_in_fp32():
    module = Tiny(dtype=torch.bfloat16)
    ema = AdapterEMA(module, decay=0.999)
    set_weights(module, 1.0)
    ema.update(1)
    state = ema.state_dict()
    assert list(state) == ["adapter"]
    assert state["adapter"].dtype == torch.float32
    assert state["adapter"][0].item() == pytest.approx(0.001)  # below bf16 resolution near 1, kept in fp32


def test_applied_swaps_in_the_average_and_restores_even_on_error():
    module = Tiny()
    ema = AdapterEMA(module, decay=0.5)
    set_weights(module, 4.0)
    ema.update(1)  # ema = 2
    with ema.applied(module):
        assert module.adapter.tolist() == [2.0, 2.0]
    assert module.adapter.tolist() == [4.0, 4.0]
    with pytest.raises(RuntimeError, match="preview failed"):
        with ema.applied(module):
            raise RuntimeError("preview failed")
    assert module.adapter.tolist() == [4.0, 4.0]


def test_state_round_trips_through_safetensors_and_continues_identically(tmp_path):
    settings = {"decay": 0.8, "start_step": 1, "update_every": 2, "warmup": True}
    module = Tiny()
    ema = AdapterEMA(module, **settings)
    run(ema, module, {1: 1.0, 2: 3.0, 3: 5.0})
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))

    def resume(load: bool) -> list[float]:
        resumed_module = Tiny()  # a fresh process: the adapter weights come from the checkpoint
        set_weights(resumed_module, 5.0)
        resumed = AdapterEMA(resumed_module, **settings)
        if load:
            resumed.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
        return run(resumed, resumed_module, {4: 7.0, 5: 9.0, 6: 11.0})

    uninterrupted = run(ema, module, {4: 7.0, 5: 9.0, 6: 11.0})
    assert resume(load=True) == uninterrupted
    assert resume(load=False) != uninterrupted  # the loaded state is what carries the history


def test_load_refuses_a_state_of_another_network():
    ema = AdapterEMA(Tiny(), decay=0.5)
    with pytest.raises(ValueError, match=r"missing \['adapter'\], unexpected \['lora_B'\]"):
        ema.load_state_dict({"lora_B": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'adapter' has shape \(3,\), the parameter \(2,\)"):
        ema.load_state_dict({"adapter": torch.zeros(3)})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"decay 1.0 must be in \[0, 1\)"):
        AdapterEMA(Tiny(), decay=1.0)
    with pytest.raises(ValueError, match="update_every 0"):
        AdapterEMA(Tiny(), update_every=0)
    frozen = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        AdapterEMA(frozen)
