"""Validation loss: deterministic across runs and resumes, held out by seed, and it sees overfitting."""

import json

import pytest
import torch

from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.loop import train
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.validation import VALIDATION_FILE, ValidationConfig, due, holdout_split

from test_resume import fresh

NETWORK = NetworkConfig(rank=4, alpha=4, dropout=0.1)


def held_out(n: int = 3, offset: float = 0.0, seed: int = 5) -> LatentDataset:
    g = torch.Generator().manual_seed(seed)
    return LatentDataset(torch.randn(n, 4, 4, 4, generator=g) + offset,
                         Conditioning(torch.randn(n, 3, 8, generator=g), torch.full((n,), 3)))


def config(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=2, lr=5e-3, seed=3, ema_decay=0.9,
                  validation=ValidationConfig(every=4))
    values.update(overrides)
    return TrainConfig(**values)


def run(cfg, tmp_path=None, validation=None):
    model, network, data = fresh(NETWORK)
    events = []
    result = train(model, network, data, cfg, on_progress=events.append, run_dir=tmp_path,
                   validation_data=validation)
    return result, events


def test_validation_is_identical_across_runs_and_never_changes_training(tmp_path):
    cfg = config()
    first, events = run(cfg, tmp_path / "a", held_out())
    second, _ = run(cfg, tmp_path / "b", held_out())
    assert [r["step"] for r in first.validation] == [0, 4, 8, 12]
    assert first.validation == second.validation  # bit for bit: fixed sigmas, fixed noise, eval mode
    assert set(first.validation[0]["by_sigma"]) == {"1", "0.75", "0.5", "0.25"}
    # The losses are the same as a run without validation: it draws from no training generator.
    plain, _ = run(TrainConfig(**{**cfg.__dict__, "validation": ValidationConfig()}))
    assert plain.losses == first.losses and plain.validation == []
    # Progress events carry each point once, the step-0 baseline with the first event.
    sent = [point for event in events for point in event.validation]
    assert sent == [(r["step"], r["loss"]) for r in first.validation]
    assert events[0].validation[0][0] == 0
    # The run folder holds the series.
    lines = (tmp_path / "a" / VALIDATION_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == first.validation


def test_validation_series_survives_interrupt_and_resume(tmp_path):
    cfg = config(steps=20, grad_accum=2, validation=ValidationConfig(every=3))
    straight, _ = run(cfg, tmp_path / "straight", held_out())
    model, network, data = fresh(NETWORK)
    seen = []
    train(model, network, data, cfg, on_progress=lambda e: seen.append(e.step),
          should_stop=lambda: len(seen) >= 10, run_dir=tmp_path / "split", validation_data=held_out())
    model, network, data = fresh(NETWORK)
    resumed = train(model, network, data, cfg, run_dir=tmp_path / "split", resume_from=tmp_path / "split",
                    validation_data=held_out())
    assert resumed.losses == straight.losses
    assert resumed.validation == straight.validation
    lines = (tmp_path / "split" / VALIDATION_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == straight.validation


def test_validation_loss_rises_when_overfitting_another_distribution():
    # Training images around +2, held-out ones around -2: fitting the first makes the second worse.
    model, network, _ = fresh(NETWORK)
    train_data = held_out(4, offset=2.0, seed=1)
    cfg = config(steps=60, lr=2e-2, ema_decay=0.0, validation=ValidationConfig(every=20))
    result = train(model, network, train_data, cfg, validation_data=held_out(4, offset=-2.0, seed=2))
    losses = [r["loss"] for r in result.validation]
    print(f"held-out validation loss by step {[r['step'] for r in result.validation]}: {[f'{v:.4f}' for v in losses]}")
    assert sum(result.losses[-10:]) / 10 < 0.9 * sum(result.losses[:10]) / 10  # it does fit the training data
    assert losses[-1] > 1.1 * losses[0], losses  # and the held-out loss rises by more than 10%


def test_holdout_split_is_seeded_and_disjoint():
    data = held_out(10)
    train_a, val_a = holdout_split(data, 0.3, seed=1)
    train_b, val_b = holdout_split(data, 0.3, seed=1)
    _, val_c = holdout_split(data, 0.3, seed=2)
    assert len(val_a) == 3 and len(train_a) == 7
    assert torch.equal(val_a.latents, val_b.latents) and torch.equal(train_a.latents, train_b.latents)
    assert not torch.equal(val_a.latents, val_c.latents)
    rows = {tuple(r.flatten().tolist()) for r in torch.cat([train_a.latents, val_a.latents])}
    assert len(rows) == 10  # every image once, in one part only


def test_validation_split_trains_without_the_held_out_images():
    cfg = config(validation_split=0.4, steps=4)
    model, network, data = fresh(NETWORK)
    split = train(model, network, data, cfg)
    # The same as training on the kept part with the held-out part as a separate validation set.
    model, network, data = fresh(NETWORK)
    kept, held = holdout_split(data, 0.4, cfg.seed)
    separate = train(model, network, kept, config(steps=4), validation_data=held)
    assert [r["step"] for r in split.validation] == [0, 4]
    assert split.losses == separate.losses and split.validation == separate.validation
    with pytest.raises(ValueError, match="both validation_split and a validation dataset"):
        train(*fresh(NETWORK), cfg, validation_data=held_out())


def test_due_and_options():
    cfg = ValidationConfig(every=5)
    assert [s for s in range(0, 13) if due(cfg, s, 12)] == [0, 5, 10, 12]
    assert not due(ValidationConfig(), 5, 10)
    with pytest.raises(ValueError, match="sigmas"):
        ValidationConfig(sigmas=[1.5])
    with pytest.raises(ValueError, match="validation every is 0"):
        train(*fresh(NETWORK), TrainConfig(steps=2), validation_data=held_out())
