"""Checkpoints and exact resume: N steps + save + resume + M steps == N + M steps."""

import pytest
import torch

from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.checkpoint import (
    ADAPTER_FILE,
    EMA_ADAPTER_FILE,
    STATE_FILE,
    TrainState,
    list_checkpoints,
    load_state,
    save_state,
)
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.loop import train
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from dit_trainer.training.network.comfy_format import read_safetensors
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig

LORA_WITH_DROPOUTS = NetworkConfig(rank=4, alpha=2, dropout=0.1, rank_dropout=0.2, module_dropout=0.1)


def tiny_model_and_data():
    torch.manual_seed(0)
    cfg = ZImageConfig(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=8, t_mid_dim=32, axes_dims=[4, 6, 6])
    model = ZImageDiT(cfg).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    # 5 examples, batch 2: every epoch is a fresh shuffle and drops one example.
    data = LatentDataset(torch.randn(5, 4, 4, 4, generator=g), Conditioning(torch.randn(5, 3, 8, generator=g), torch.full((5,), 3)))
    return model, data


def fresh(network_cfg: NetworkConfig):
    model, data = tiny_model_and_data()
    network = LoRANetwork(model, "zimage", network_cfg).attach()
    return model, network, data


def run_config(**overrides) -> TrainConfig:
    values = dict(steps=20, batch_size=2, grad_accum=2, lr=5e-3, schedule="cosine", warmup_steps=3, seed=7,
                  ema_decay=0.9, ema_start_step=2, save_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def interrupted_then_resumed(tmp_path, network_cfg, cfg, stop_after=10):
    model, network, data = fresh(network_cfg)
    seen = []
    first = train(model, network, data, cfg, on_progress=lambda e: seen.append(e.step),
                  should_stop=lambda: len(seen) >= stop_after, run_dir=tmp_path)
    assert first.stopped_early and first.steps_done == stop_after
    model, network, data = fresh(network_cfg)  # a new process: nothing carried over in memory
    second = train(model, network, data, cfg, run_dir=tmp_path, resume_from=tmp_path)
    return network, second


def assert_same_state(a: dict, b: dict, exact: bool):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    "network_cfg,optimizer",
    [(LORA_WITH_DROPOUTS, "adamw"), (NetworkConfig(algo="dora", rank=4, alpha=4), "adamw_schedulefree")],
    ids=["lora-dropouts-adamw", "dora-schedulefree"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, network_cfg, optimizer):
    cfg = run_config(optimizer=optimizer, schedule="constant" if optimizer == "adamw_schedulefree" else "cosine")
    model, network, data = fresh(network_cfg)
    straight = train(model, network, data, cfg, run_dir=tmp_path / "straight")

    resumed_network, resumed = interrupted_then_resumed(tmp_path / "split", network_cfg, cfg)
    assert resumed.steps_done == 20
    assert resumed.losses == straight.losses  # same batches, noise, sigmas and dropout masks
    assert_same_state(resumed_network.state_dict(), network.state_dict(), exact=True)
    assert_same_state(resumed.ema.state_dict(), straight.ema.state_dict(), exact=True)
    # The final checkpoints' adapter files (eval weights, EMA) agree too.
    for name in (ADAPTER_FILE, EMA_ADAPTER_FILE):
        a, _ = read_safetensors(straight.last_checkpoint / name)
        b, _ = read_safetensors(resumed.last_checkpoint / name)
        assert_same_state(a, b, exact=True)


def test_exception_in_a_progress_callback_leaves_a_resumable_checkpoint(tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt_at_6(event):
        if event.step == 6:
            raise Interrupted

    cfg = run_config()
    model, network, data = fresh(LORA_WITH_DROPOUTS)
    with pytest.raises(Interrupted):
        train(model, network, data, cfg, on_progress=interrupt_at_6, run_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006"]

    model, network, data = fresh(LORA_WITH_DROPOUTS)
    resumed = train(model, network, data, cfg, run_dir=tmp_path, resume_from=tmp_path)
    model, reference, data = fresh(LORA_WITH_DROPOUTS)
    straight = train(model, reference, data, cfg)
    assert resumed.losses == straight.losses
    assert_same_state(network.state_dict(), reference.state_dict(), exact=True)


def test_periodic_checkpoints_keep_the_last_states_and_every_adapter(tmp_path):
    model, network, data = fresh(NetworkConfig(rank=2))
    train(model, network, data, run_config(steps=10, save_every=2, keep_last=2, ema_decay=0.0), run_dir=tmp_path)
    folders = list_checkpoints(tmp_path)
    assert [p.name for p in folders] == [f"step_{s:06d}" for s in (2, 4, 6, 8, 10)]
    assert [(p / STATE_FILE).exists() for p in folders] == [False, False, False, True, True]
    assert all((p / ADAPTER_FILE).exists() for p in folders)
    _, meta = read_safetensors(folders[0] / ADAPTER_FILE)
    assert meta["ss_steps"] == "2"


def test_schedulefree_checkpoint_adapter_holds_the_eval_weights(tmp_path):
    model, network, data = fresh(NetworkConfig(rank=2))
    result = train(model, network, data, run_config(steps=6, optimizer="adamw_schedulefree", schedule="constant", ema_decay=0.0), run_dir=tmp_path)
    saved, _ = read_safetensors(result.last_checkpoint / ADAPTER_FILE)
    state = load_state(result.last_checkpoint)
    # On return the network holds the eval weights x; the resumable state holds the training values y.
    a_eval = network.adapters[0].lora_A.detach()
    assert torch.equal(saved[f"diffusion_model.{network.names[0]}.lora_A.weight"], a_eval)
    assert not torch.equal(state.trainable["adapters.0.lora_A"], a_eval)


def test_resume_refuses_a_different_batch_size(tmp_path):
    model, network, data = fresh(NetworkConfig(rank=2))
    train(model, network, data, run_config(steps=2, warmup_steps=0, ema_decay=0.0), run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"global batch of 2 \(batch_size 2 x 1 process"):
        train(model, network, data, run_config(steps=4, batch_size=1, warmup_steps=0, ema_decay=0.0), run_dir=tmp_path, resume_from=tmp_path)


def test_state_round_trip_keeps_int_keys_tuples_and_tensors(tmp_path):
    state = TrainState(
        step=3, micro_batches=6, losses=[0.5, 0.25], skipped_nonfinite=1,
        trainable={"w": torch.arange(4.0)},
        optimizer={"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"betas": (0.9, 0.99), "params": [0]}]},
        scheduler={"last_epoch": 3, "base_lrs": [0.1]},
        rng={"torch": torch.get_rng_state()}, config={"seed": 1}, ema=None,
    )
    back = load_state(save_state(tmp_path / "step_000003", state))
    assert back.optimizer["state"][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert back.optimizer["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back.losses == [0.5, 0.25] and back.micro_batches == 6 and back.ema is None
    assert torch.equal(back.rng["torch"], state.rng["torch"])


def test_missing_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(*fresh(NetworkConfig(rank=2)), run_config(steps=2, warmup_steps=0), resume_from=tmp_path)


QUALITY_OPTIONS = dict(
    noise={"offset": 0.05, "multires_iterations": 3, "multires_discount": 0.4},
    loss={"weighting": "min_snr", "min_snr_gamma": 5.0},
    timesteps={"method": "logit_normal", "num_buckets": 4},
)


@pytest.mark.parametrize("options", [QUALITY_OPTIONS, dict(loss={"weighting": "cosmap"},
                                                          timesteps={"method": "mode", "num_buckets": 3})],
                         ids=["offset-multires-minsnr-logitnormal-buckets", "cosmap-mode-buckets"])
def test_resume_is_exact_with_loss_noise_and_timestep_options(tmp_path, options):
    cfg = run_config(steps=12, **options)
    model, network, data = fresh(LORA_WITH_DROPOUTS)
    straight = train(model, network, data, cfg)
    assert straight.losses != train(*fresh(LORA_WITH_DROPOUTS), run_config(steps=12)).losses  # the options act
    resumed_network, resumed = interrupted_then_resumed(tmp_path, LORA_WITH_DROPOUTS, cfg, stop_after=5)
    assert resumed.losses == straight.losses
    assert_same_state(resumed_network.state_dict(), network.state_dict(), exact=True)
