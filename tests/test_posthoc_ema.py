"""Post-hoc EMA: gamma from sigma_rel, the betas of each mode, the merge vs a direct weighted sum, files."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dit_trainer.training.posthoc_ema import (
    merge_adapter_files,
    merge_state_dicts,
    posthoc_betas,
    sigma_rel_to_gamma,
)


@pytest.mark.parametrize("sigma_rel,gamma", [(0.05, 16.97), (0.10, 6.94)])  # EDM2 (Karras et al. 2024), Sec. 3.1
def test_gamma_matches_the_edm2_paper(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.15, 0.28])
def test_gamma_solves_the_sigma_rel_relation(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g > 0
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)


def test_sigma_rel_outside_the_range_is_refused():
    for bad in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match=r"sigma_rel .* must be in \(0, 0.2887\)"):
            sigma_rel_to_gamma(bad)


def test_betas_fixed_and_linear():
    assert posthoc_betas(4, "beta", beta=0.9) == [0.9, 0.9, 0.9]
    assert posthoc_betas(4, "linear", beta=0.9, beta2=0.99) == pytest.approx([0.9, 0.945, 0.99])
    assert posthoc_betas(2, "linear", beta=0.9, beta2=0.99) == [0.9]


def test_sigma_rel_betas_use_the_checkpoint_index_as_t():
    g = sigma_rel_to_gamma(0.1)
    # t_j = j as in musubi-tuner: the first merge has t = 1, beta = 0, so checkpoint 0 drops out
    assert posthoc_betas(4, "sigma_rel", sigma_rel=0.1) == pytest.approx([0.0, 0.5 ** (g + 1), (2 / 3) ** (g + 1)])


def test_sigma_rel_betas_from_steps_are_the_product_of_per_step_betas():
    g = sigma_rel_to_gamma(0.15)
    steps = [3, 7, 12]
    expected = [math.prod((1 - 1 / s) ** (g + 1) for s in range(a + 1, b + 1)) for a, b in zip(steps, steps[1:])]
    assert posthoc_betas(3, "sigma_rel", sigma_rel=0.15, steps=steps) == pytest.approx(expected, rel=1e-9)
    evenly_from_zero = posthoc_betas(4, "sigma_rel", sigma_rel=0.15, steps=[0, 50, 100, 150])
    assert evenly_from_zero == pytest.approx(posthoc_betas(4, "sigma_rel", sigma_rel=0.15))


@pytest.mark.parametrize(
    "args,match",
    [
        ((1, "beta"), "at least 2 checkpoints"),
        ((3, "karras"), "mode 'karras' is not one of"),
        ((3, "linear"), "needs beta2"),
        ((3, "sigma_rel"), "needs sigma_rel"),
        ((3, "beta", 1.5), r"beta 1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        posthoc_betas(*args)


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="steps only apply to mode 'sigma_rel'"):
        posthoc_betas(3, "beta", steps=[1, 2, 3])
    with pytest.raises(ValueError, match="must be 3 increasing values"):
        posthoc_betas(3, "sigma_rel", sigma_rel=0.1, steps=[1, 1, 2])


def direct_ema(states, betas, key):
    """sum_j w_j S_j with w_0 = prod(betas), w_j = (1 - beta_j) prod_{k > j} beta_k, in float64."""
    weights = []
    for j in range(len(states)):
        own = 1.0 if j == 0 else 1.0 - betas[j - 1]
        weights.append(own * math.prod(betas[j:]))
    assert sum(weights) == pytest.approx(1.0)
    return sum(w * s[key].double() for w, s in zip(weights, states))


def synthetic_states(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "diffusion_model.x.lora_A.weight": torch.randn(2, 3, generator=g),
            "diffusion_model.x.lora_B.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16),
            "diffusion_model.x.dora_scale": torch.randn(1, 3, generator=g),
            "diffusion_model.x.alpha": torch.tensor(2.0),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "mode,kw", [("beta", {"beta": 0.8}), ("linear", {"beta": 0.5, "beta2": 0.9}), ("sigma_rel", {"sigma_rel": 0.2})]
)
def test_merge_matches_the_direct_weighted_sum(mode, kw):
    states = synthetic_states()
    betas = posthoc_betas(len(states), mode, **kw)
    merged = merge_state_dicts(states, betas)
    for key in ("diffusion_model.x.lora_A.weight", "diffusion_model.x.dora_scale"):
        torch.testing.assert_close(merged[key].double(), direct_ema(states, betas, key), rtol=1e-6, atol=1e-6)
    lora_b = "diffusion_model.x.lora_B.weight"
    assert merged[lora_b].dtype == torch.bfloat16  # back in the file's dtype, averaged in fp32
    # bf16 keeps 8 bits of mantissa: compare at its resolution
    torch.testing.assert_close(merged[lora_b].double(), direct_ema(states, betas, lora_b), rtol=1e-2, atol=1e-2)
    assert torch.equal(merged["diffusion_model.x.alpha"], torch.tensor(2.0))


def test_merge_refuses_different_alphas_keys_and_shapes():
    states = synthetic_states(2)
    states[1]["diffusion_model.x.alpha"] = torch.tensor(4.0)
    with pytest.raises(ValueError, match=r"b: 'diffusion_model.x.alpha' differs from a"):
        merge_state_dicts(states, [0.9], names=["a", "b"])
    states = synthetic_states(2)
    del states[1]["diffusion_model.x.dora_scale"]
    with pytest.raises(ValueError, match=r"b lacks key 'diffusion_model.x.dora_scale' compared with a"):
        merge_state_dicts(states, [0.9], names=["a", "b"])
    states = synthetic_states(2)
    states[1]["diffusion_model.x.lora_A.weight"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"b: 'diffusion_model.x.lora_A.weight' has shape \(4, 3\), a has \(2, 3\)"):
        merge_state_dicts(states, [0.9], names=["a", "b"])
    with pytest.raises(ValueError, match="2 checkpoints need 1 betas, got 2"):
        merge_state_dicts(synthetic_states(2), [0.9, 0.9])


def write(tmp_path, name, state, steps=None):
    path = tmp_path / name
    metadata = {"ss_network_dim": "2", "note": name}
    if steps is not None:
        metadata["ss_steps"] = str(steps)
    save_file(state, str(path), metadata=metadata)
    return path


def test_files_are_ordered_by_ss_steps_and_keep_the_newest_metadata(tmp_path):
    states = synthetic_states(3)
    paths = [
        write(tmp_path, "c.safetensors", states[2], 300),
        write(tmp_path, "a.safetensors", states[0], 100),
        write(tmp_path, "b.safetensors", states[1], 200),
    ]
    tensors, metadata = merge_adapter_files(paths, mode="linear", beta=0.5, beta2=0.8)
    expected = merge_state_dicts(states, [0.5, 0.8])
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    assert metadata["note"] == "c.safetensors" and metadata["ss_network_dim"] == "2"
    record = json.loads(metadata["dit_trainer_posthoc_ema"])
    assert record["files"] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert record["steps"] == [100, 200, 300] and record["order"] == "ss_steps" and record["betas"] == [0.5, 0.8]


def test_files_fall_back_to_the_step_in_the_name_then_the_given_order(tmp_path):
    states = synthetic_states(2)
    late, early = write(tmp_path, "run_step_000200.safetensors", states[1]), write(tmp_path, "run_step_000100.safetensors", states[0])
    tensors, metadata = merge_adapter_files([late, early], beta=0.7)
    assert torch.equal(tensors["diffusion_model.x.lora_A.weight"], merge_state_dicts(states, [0.7])["diffusion_model.x.lora_A.weight"])
    assert json.loads(metadata["dit_trainer_posthoc_ema"])["order"] == "file name"
    first, second = write(tmp_path, "zeta.safetensors", states[0]), write(tmp_path, "alpha.safetensors", states[1])
    tensors, metadata = merge_adapter_files([first, second], beta=0.7)
    assert json.loads(metadata["dit_trainer_posthoc_ema"])["files"] == ["zeta.safetensors", "alpha.safetensors"]
    assert torch.equal(tensors["diffusion_model.x.dora_scale"], merge_state_dicts(states, [0.7])["diffusion_model.x.dora_scale"])


def test_checkpoint_folders_give_the_step_and_the_label(tmp_path):
    states = synthetic_states(2)
    for step, state in ((200, states[1]), (100, states[0])):
        (tmp_path / f"step_{step:06d}").mkdir()
        write(tmp_path / f"step_{step:06d}", "adapter.safetensors", state)
    paths = [tmp_path / "step_000200" / "adapter.safetensors", tmp_path / "step_000100" / "adapter.safetensors"]
    tensors, metadata = merge_adapter_files(paths, beta=0.6)
    record = json.loads(metadata["dit_trainer_posthoc_ema"])
    assert record["files"] == ["step_000100/adapter.safetensors", "step_000200/adapter.safetensors"]
    assert record["steps"] == [100, 200]
    key = "diffusion_model.x.lora_A.weight"
    assert torch.equal(tensors[key], merge_state_dicts(states, [0.6])[key])


def test_sigma_rel_with_t_from_steps(tmp_path):
    states = synthetic_states(3)
    paths = [write(tmp_path, f"s{i}.safetensors", s, steps) for i, (s, steps) in enumerate(zip(states, [100, 200, 400]))]
    tensors, metadata = merge_adapter_files(paths, mode="sigma_rel", sigma_rel=0.1, t_from_steps=True)
    betas = posthoc_betas(3, "sigma_rel", sigma_rel=0.1, steps=[100, 200, 400])
    key = "diffusion_model.x.lora_A.weight"
    torch.testing.assert_close(tensors[key].double(), direct_ema(states, betas, key), rtol=1e-6, atol=1e-6)
    assert json.loads(metadata["dit_trainer_posthoc_ema"])["gamma"] == pytest.approx(sigma_rel_to_gamma(0.1))


def test_file_errors_name_the_files(tmp_path):
    states = synthetic_states(2)
    one = write(tmp_path, "one.safetensors", states[0], 100)
    with pytest.raises(ValueError, match="at least 2 checkpoint files, got 1"):
        merge_adapter_files([one])
    twin = write(tmp_path, "twin.safetensors", states[1], 100)
    with pytest.raises(ValueError, match="one.safetensors and twin.safetensors are both at step 100"):
        merge_adapter_files([one, twin])
    other = dict(states[1])
    other["diffusion_model.y.alpha"] = torch.tensor(1.0)
    extra = write(tmp_path, "extra.safetensors", other, 200)
    with pytest.raises(ValueError, match="extra.safetensors has an extra key 'diffusion_model.y.alpha' compared with one.safetensors"):
        merge_adapter_files([one, extra])
    plain = write(tmp_path, "plain.safetensors", states[1])
    with pytest.raises(ValueError, match="t_from_steps needs each file's step"):
        merge_adapter_files([one, plain], mode="sigma_rel", sigma_rel=0.1, t_from_steps=True)
