"""Settings advisor: warnings for the documented far-off settings, none for the shipped examples."""

import build_example_workflows as builder
from dit_trainer.training.advisor import network_advice, run_advice, training_advice
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.network.network import NetworkConfig

ORDINARY = dict(optimizer="adamw", lr=1e-4, rank=16, alpha=16.0, use_rslora=False, steps=2000, batch_size=1,
                grad_accum=1, images=20, resolution=1024, timestep_method="shift", shift=3.0)


def advice(**changes):
    return training_advice("flux", **{**ORDINARY, **changes})


def test_ordinary_recipes_get_no_warning():
    assert advice() == []
    assert advice(lr=8e-4, rank=4, alpha=1.0) == []  # sd-scripts' Flux recipe at alpha 1
    assert advice(optimizer="adamw_schedulefree", lr=1e-3) == []
    assert training_advice("qwen_image", **{**ORDINARY, "rank": 32, "alpha": 32.0, "use_rslora": True,
                                            "resolution": 1328, "shift": 2.2}) == []


def test_flux_lr_1e_2_with_adamw_warns_at_any_alpha():
    for alpha in (16.0, 1.0):
        (warning,) = advice(lr=1e-2, alpha=alpha)
        assert "lr 0.01 with adamw is far above" in warning


def test_effective_lr_far_off_warns():
    (warning,) = advice(lr=2e-3, rank=16, alpha=32.0)  # effective 4e-3: above 2e-3, below the plain-lr bound
    assert "effective lr" in warning and "above" in warning
    (warning,) = advice(lr=1e-5, rank=128, alpha=1.0)
    assert "below" in warning


def test_5000_steps_on_10_images_warns():
    (warning,) = advice(steps=5000, images=10)
    assert "each image 500 times" in warning and "memorise" in warning
    assert "barely learn" in advice(steps=20, images=100)[0]


def test_rank_batch_resolution_and_shift_far_off_warn():
    assert "rank 512" in network_advice("flux", 512)[0]
    assert any("batch_size 128" in w for w in advice(batch_size=128, steps=20))
    assert "resolution 4096" in advice(resolution=4096)[0]
    assert "discrete_flow_shift 20" in advice(shift=20.0)[0]
    assert advice(timestep_method="flux_shift", shift=20.0) == []  # the shift only matters for 'shift'


def architecture_of(checkpoint: str) -> str:
    name = checkpoint.lower()
    if "qwen" in name:
        return "qwen_image"
    if "flux2" in name or "klein" in name:
        return "flux2"
    return "flux" if "flux" in name else "zimage"


def example_trainings():
    """(stem, architecture, TrainConfig, NetworkConfig, resolution) of every shipped example but the demo."""
    for make in builder.GRAPHS:
        graph = make()
        nodes = {node.key: node for node in graph.nodes}
        if graph.demo or "train" not in nodes:
            continue
        w = nodes["train"].widgets
        defaults = TrainConfig()
        train = TrainConfig(
            steps=w.get("steps", defaults.steps), lr=w.get("lr", defaults.lr),
            optimizer=w.get("optimizer", defaults.optimizer), batch_size=w.get("batch_size", 1),
            grad_accum=w.get("grad_accum", 1),
            timesteps={"method": w.get("timestep_sampling", defaults.timesteps.method),
                       "discrete_flow_shift": w.get("discrete_flow_shift", defaults.timesteps.discrete_flow_shift)})
        network = NetworkConfig(**{k: v for k, v in nodes["network"].widgets.items()
                                   if k in ("algo", "rank", "alpha", "use_rslora")})
        yield (graph.stem, architecture_of(nodes["model"].widgets["checkpoint"]), train, network,
               nodes["data"].widgets.get("resolution", 1024))


def test_the_example_workflows_raise_no_warning():
    checked = 0
    for stem, architecture, train, network, resolution in example_trainings():
        # A typical dataset of 20 images, as the recipes assume.
        assert run_advice(architecture, train, network, 20, resolution) == [], stem
        checked += 1
    assert checked >= 5
