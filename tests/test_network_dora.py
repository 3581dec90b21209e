"""DoRA layer: output axis equals PEFT's DoRA, the norm never materialises B @ A, norms are exact."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit_trainer.training.network.lora import LoRAModule

IN, OUT, RANK = 24, 40, 4  # non-square, so [out, in] differs from its transpose


def random_base(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        base.weight.normal_(0, 0.3)
        if bias:
            base.bias.normal_(0, 0.5)
    return base.requires_grad_(False)


def trained_dora(base: nn.Linear, axis: str, alpha: float = 3.0, use_rslora: bool = False, seed: int = 1) -> LoRAModule:
    adapter = LoRAModule("probe", base, rank=RANK, alpha=alpha, algo="dora", dora_axis=axis, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(OUT, RANK, generator=g) * 0.4)
        adapter.magnitude.mul_(1 + 0.3 * torch.randn(adapter.magnitude.shape, generator=g))
    return adapter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_axis_matches_peft_dora_outputs_and_gradients(use_rslora):
    base = random_base()
    ours = trained_dora(base, "output", use_rslora=use_rslora)
    ours.attach()
    peft_base = nn.Linear(IN, OUT)
    peft_base.load_state_dict(base.state_dict())
    config = LoraConfig(r=RANK, lora_alpha=3.0, target_modules=["lin"], use_dora=True, use_rslora=use_rslora)
    peft_model = get_peft_model(Holder(peft_base), config)
    layer = peft_model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    assert layer.scaling["default"] == pytest.approx(ours.scale)

    x = torch.randn(2, 5, IN)
    x_ours, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_peft = base(x_ours), peft_model(x_peft)
    assert rel_err(y_ours, F.linear(x, base.weight, base.bias)) > 1e-2  # the trained adapter changes the layer
    # PEFT divides by ||V||, we by ||V|| + eps (eps = 1.2e-7, ComfyUI's): 1e-6 relative covers it.
    assert rel_err(y_ours, y_peft) < 1e-6
    upstream = torch.randn_like(y_ours)
    y_ours.backward(upstream)
    y_peft.backward(upstream)
    assert rel_err(x_ours.grad, x_peft.grad) < 1e-6
    assert rel_err(ours.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(ours.lora_B.grad, layer.lora_B["default"].weight.grad) < 1e-5
    assert rel_err(ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad) < 1e-5


def test_input_axis_is_not_the_output_axis():
    """Negative control: the two axes really differ on a trained adapter."""
    base = random_base()
    x = torch.randn(3, IN)
    out_axis = trained_dora(base, "output")
    out_axis.attach()
    y_out = base(x)
    out_axis.detach_from_base()
    in_axis = trained_dora(base, "input")
    in_axis.attach()
    assert rel_err(base(x), y_out) > 1e-2


@pytest.mark.parametrize("axis,dim", [("input", 0), ("output", 1)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_memory_efficient_norm_equals_materialised_norm(axis, dim, use_rslora):
    adapter = trained_dora(random_base(), axis, use_rslora=use_rslora)
    materialised = (adapter.base.weight + adapter.scale * adapter.lora_B @ adapter.lora_A).norm(dim=dim)
    torch.testing.assert_close(adapter.dora_norm(), materialised.detach(), rtol=1e-5, atol=1e-6)


class OutputShapes(TorchDispatchMode):
    """Records (op, shape) of every op output, except views of the frozen base weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_storage = weight.untyped_storage().data_ptr()
        self.records: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.weight_storage:
                self.records.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_dora_forward_backward_never_builds_an_out_by_in_tensor(axis, multiplier):
    base = random_base()
    adapter = trained_dora(base, axis)
    adapter.attach()
    adapter.multiplier = multiplier
    adapter.base_sq()  # the cached ||W0||^2 is read once per base weight, outside the step
    x = torch.randn(3, 7, IN, requires_grad=True)
    with OutputShapes(base.weight) as probe:
        loss = base(x).square().sum()
        forward_ops = len(probe.records)
        loss.backward()
    assert 0 < forward_ops < len(probe.records), "the probe must see the forward and the backward"
    assert adapter.lora_A.grad is not None and adapter.magnitude.grad is not None
    big = [(op, shape) for op, shape in probe.records if shape in ((OUT, IN), (IN, OUT))]
    assert not big, f"[out, in]-sized tensors allocated: {big}"


def test_probe_catches_a_materialised_product():
    """Negative control: the naive norm ||W0 + s B A|| does allocate [out, in]."""
    adapter = trained_dora(random_base(), "output")
    with OutputShapes(adapter.base.weight) as probe:
        (adapter.base.weight + adapter.scale * adapter.lora_B @ adapter.lora_A).norm(dim=1)
    assert (OUT, IN) in [shape for _, shape in probe.records]


@pytest.mark.parametrize("axis", ["input", "output"])
def test_bias_is_not_rescaled(axis):
    """PEFT's handling: DoRA rescales W x, the bias is added unscaled."""
    base = random_base()
    adapter = trained_dora(base, axis)
    adapter.attach()
    x = torch.randn(4, IN)
    with torch.no_grad():
        expected = x @ adapter.adapted_weight().t() + base.bias
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)
