"""Triton DoRA kernels against the PyTorch reference (and PEFT), on CPU through Triton's
interpreter and on CUDA (`gpu` marker).

Interpreter: TRITON_INTERPRET must be set before triton is first imported, because
triton's own standard library (tl.zeros, tl.sum, ...) is decorated at import time, and
in a full session something (torch._dynamo, another test) imports triton early. So on a
CPU machine the interpreter cases ("interp" ids, `kernels_on("cpu")`) are skipped in
this process and `test_interpreter_cases_in_subprocess` runs this file again in a child
pytest with TRITON_INTERPRET=1 from the start. The parent's environment is never
touched, so other tests that import triton see it unchanged. Running the whole session
with TRITON_INTERPRET=1 runs the interpreter cases in-process instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit_trainer.kernels import dora
from dit_trainer.kernels import dora_reference as ref

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

# Kernel vs reference, inputs scaled so every value is O(1).
# fp32: both sides are fp32 end to end (tf32x3 dots on GPU), only summation order differs.
# fp16 / bf16: loose on purpose. The reference rounds every intermediate (A x, B u,
# s * l, k * ..., each autograd product) to the 16-bit dtype; the kernels keep those in
# fp32 registers. The gap is the reference's rounding: a few ulps (fp16 ulp at 1 is
# 1e-3, bf16 8e-3), summed over the 45-wide and 37-wide reductions of the gradients.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
}

# (device, dtype): the interpreter runs fp32 / fp16 (it mishandles bf16 arithmetic);
# CUDA runs every dtype the kernels accept.
KERNEL_CASES = [
    pytest.param("cpu", torch.float32, id="interp-fp32"),
    pytest.param("cpu", torch.float16, id="interp-fp16"),
    pytest.param("cuda", torch.float32, marks=GPU, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=GPU, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=GPU, id="cuda-bf16"),
]

N_IN, N_OUT = 45, 37  # odd on purpose: every tile edge is ragged
LEAD = (2, 7)


def _require_kernels(device: str) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if device == "cpu" and HAS_CUDA:
        pytest.skip("CUDA present: the compiled kernels are tested by the cuda cases instead")
    if device == "cpu" and not INTERPRET:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_interpreter_cases_in_subprocess")
    if device == "cuda" and INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted in this process, not compiled")


@pytest.fixture
def kernels_on():
    """Call with "cpu" (interpreter) or "cuda": skips unless the kernels run there in this process."""
    return _require_kernels


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the compiled kernels are tested by the cuda cases instead")
@pytest.mark.skipif(INTERPRET, reason="already under TRITON_INTERPRET=1: the cases run in this process")
def test_interpreter_cases_in_subprocess():
    """Every interpreter case of this file, in a child pytest that starts with TRITON_INTERPRET=1."""
    child = ["-q", "--tb=short", "-rf", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *child],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in summary, proc.stdout[-8000:] + proc.stderr[-2000:]


def make_layer(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    axis: str = "output",
    rank: int = 3,
    bias: bool = True,
    seed: int = 0,
) -> dict:
    """Random DoRA layer with O(1) activations; magnitude is off the norm so k != 1."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    weight = rnd(N_OUT, N_IN, std=N_IN**-0.5)
    lora_A = rnd(rank, N_IN, std=N_IN**-0.5).requires_grad_()
    lora_B = rnd(N_OUT, rank, std=0.3).requires_grad_()
    n_mag = N_IN if axis == "input" else N_OUT
    magnitude = (torch.rand(n_mag, generator=g) + 0.5).to(device).requires_grad_()
    return dict(
        x=rnd(*LEAD, N_IN).requires_grad_(),
        weight=weight,
        bias=rnd(N_OUT, std=0.5).requires_grad_() if bias else None,
        lora_A=lora_A,
        lora_B=lora_B,
        magnitude=magnitude,
        scale=0.75,
        axis=axis,
        eps=torch.finfo(torch.float32).eps,
    )


TENSORS = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
LINEAR_ARGS = (*TENSORS, "scale", "axis", "eps")


def fresh_leaves(layer: dict) -> dict:
    """New leaf copies of the layer's trainable tensors (their .grad starts empty)."""
    trainable = {k: v for k, v in layer.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return {k: v.detach().clone().requires_grad_() for k, v in trainable.items()}


def backward_results(y: torch.Tensor, leaves: dict, grad_out: torch.Tensor | None = None) -> dict:
    """Backpropagate grad_out (seeded random by default); the output and every leaf's grad."""
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    return {"y": y.detach(), **{f"d_{k}": v.grad for k, v in leaves.items()}}


def run_layer(layer: dict, backend: str, grad_out: torch.Tensor | None = None) -> dict:
    """dora.dora_linear forward + backward on fresh copies of the trainable tensors."""
    leaves = fresh_leaves(layer)
    y = dora.dora_linear(**{**layer, **leaves}, backend=backend)
    return backward_results(y, leaves, grad_out)


def assert_all_close(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, name
        torch.testing.assert_close(
            actual[name].float(), expected[name].float(), **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}"
        )


# ----------------------------------------------------------------------------- norm


@pytest.mark.parametrize("axis", ref.AXES)
@pytest.mark.parametrize("with_base_sq", [False, True])
def test_reference_norm_equals_materialised_norm(axis, with_base_sq):
    layer = make_layer(axis=axis, rank=5)
    w, a, b, s = layer["weight"].double(), layer["lora_A"].double(), layer["lora_B"].double(), layer["scale"]
    base_sq = dora.base_sq_norm(layer["weight"], axis) if with_base_sq else None
    got = dora.dora_weight_norm(layer["weight"], layer["lora_A"], layer["lora_B"], s, axis, base_sq, backend="torch")
    want = (w + s * b @ a).norm(dim=0 if axis == "input" else 1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("axis", ref.AXES)
@pytest.mark.parametrize("with_base_sq", [False, True])
@pytest.mark.parametrize("rank", [3, 17])
def test_norm_kernel(kernels_on, device, dtype, axis, with_base_sq, rank):
    kernels_on(device)
    layer = make_layer(device, dtype, axis, rank=rank)
    w, a, b, s = layer["weight"], layer["lora_A"], layer["lora_B"], layer["scale"]
    base_sq = dora.base_sq_norm(w, axis) if with_base_sq else None
    got = dora.dora_weight_norm(w, a, b, s, axis, base_sq, backend="triton")
    assert got.dtype == torch.float32 and not got.requires_grad
    # The reference reads the same rounded inputs and works in fp32, so the kernel must
    # match it to fp32 accuracy whatever the storage dtype.
    want = dora.dora_weight_norm(w, a, b, s, axis, base_sq, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    materialised = (w.double() + s * b.double() @ a.double()).norm(dim=0 if axis == "input" else 1)
    torch.testing.assert_close(got.double(), materialised, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("axis", ref.AXES)
@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_norm_kernel_fp8_weight(kernels_on, device, axis, per_row):
    kernels_on(device)
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8_e4m3fn in Triton needs compute capability 8.9+")
    layer = make_layer(device, torch.float32, axis)
    with torch.no_grad():  # rows far apart in size: a per-row scale read along the wrong axis shows
        layer["weight"] *= torch.logspace(-2, 1, layer["weight"].shape[0], device=device)[:, None]
    absmax = layer["weight"].abs().amax(dim=1, keepdim=True) if per_row else layer["weight"].abs().amax()
    w_scale = absmax / 448.0  # e4m3 max
    w_fp8 = (layer["weight"] / w_scale).to(torch.float8_e4m3fn)
    args = (w_fp8, layer["lora_A"], layer["lora_B"], layer["scale"], axis)
    got = dora.dora_weight_norm(*args, weight_scale=w_scale, backend="triton")
    # The reference dequantizes first; the kernel scales each tile as it reads it.
    want = dora.dora_weight_norm(*args, weight_scale=w_scale, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    base_sq = dora.base_sq_norm(w_fp8, axis, weight_scale=w_scale)
    got = dora.dora_weight_norm(*args, base_sq, weight_scale=w_scale, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------ compose


@pytest.mark.parametrize("device, dtype", KERNEL_CASES)
@pytest.mark.parametrize("axis", ref.AXES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [3, 17])
def test_dora_linear_kernel_matches_reference(kernels_on, device, dtype, axis, bias, rank):
    kernels_on(device)
    layer = make_layer(device, dtype, axis, rank=rank, bias=bias)
    expected = run_layer(layer, "torch")
    actual = run_layer(layer, "triton")
    assert_all_close(actual, expected, dtype)


@pytest.mark.parametrize("axis", ref.AXES)
def test_dora_linear_kernel_strided_input_and_broadcast_grad(kernels_on, axis):
    """A transposed (non-contiguous) x and the stride-0 gradient of y.sum()."""
    kernels_on("cpu")
    layer = make_layer(axis=axis)
    # 2-D, so the kernels get the view itself (feature stride 14), not a reshaped copy.
    layer["x"] = torch.randn(N_IN, 14).t().requires_grad_()
    shape = (14, N_OUT)
    expected = run_layer(layer, "torch", torch.ones(()).expand(shape))
    actual = run_layer(layer, "triton", torch.ones(()).expand(shape))
    assert_all_close(actual, expected, torch.float32)


@pytest.mark.parametrize("axis", ref.AXES)
def test_fresh_adapter_is_exact_identity(kernels_on, axis):
    """B = 0 and m = ||W0|| (eps 0): the layer must return the base output bit for bit."""
    kernels_on("cpu")
    layer = make_layer(axis=axis)
    w, a = layer["weight"], layer["lora_A"]
    layer["lora_B"] = torch.zeros_like(layer["lora_B"])
    layer["magnitude"] = dora.dora_weight_norm(w, a, layer["lora_B"], layer["scale"], axis, backend="triton")
    layer["eps"] = 0.0
    y = dora.dora_linear(**layer, backend="triton")
    assert torch.equal(y, F.linear(layer["x"], w, layer["bias"]))


@pytest.mark.parametrize("axis", ref.AXES)
def test_torch_compile_fullgraph_traces_custom_ops(kernels_on, axis):
    """The custom ops' fake and autograd registrations let AOTAutograd trace forward and
    backward in one graph (aot_eager: no inductor codegen, so this stays quick on CPU)."""
    kernels_on("cpu")
    layer = make_layer(axis=axis)

    def step(**kw):
        return dora.dora_linear(**kw, backend="triton")

    expected = run_layer(layer, "triton")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = fresh_leaves(layer)
    actual = backward_results(compiled(**{**layer, **leaves}), leaves)
    assert_all_close(actual, expected, torch.float32)


def test_custom_ops_pass_opcheck(kernels_on):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    kernels_on("cpu")
    from dit_trainer.kernels import dora_input, dora_norm, dora_output  # noqa: F401 (registers the ops)

    ops = torch.ops.dit_trainer
    for axis, op in (("input", ops.dora_linear_input), ("output", ops.dora_linear_output)):
        lay = make_layer(axis=axis)
        w, a, b = lay["weight"], lay["lora_A"], lay["lora_B"]
        norm = ops.dora_norm(w, a.detach(), b.detach(), None, None, lay["scale"], axis)
        base_sq = dora.base_sq_norm(w, axis)
        torch.library.opcheck(ops.dora_norm.default, (w, a.detach(), b.detach(), base_sq, None, lay["scale"], axis))
        args = (lay["x"], w, lay["bias"], a, b, lay["magnitude"], norm, lay["scale"], lay["eps"])
        torch.library.opcheck(op.default, args)
        saved = [t.detach() for t in op(*args)[1:]]
        bwd = ops.dora_linear_input_backward if axis == "input" else ops.dora_linear_output_backward
        plain = [t.detach() for t in (lay["x"], w, a, b, lay["magnitude"], norm)]
        gy = torch.randn(*LEAD, N_OUT)
        torch.library.opcheck(bwd.default, (gy, *plain, *saved, lay["scale"], lay["eps"]))


@pytest.mark.parametrize("axis", ref.AXES)
def test_autograd_function_apply_matches_op(kernels_on, axis):
    """The torch.autograd.Function and the op it is registered on are one computation."""
    kernels_on("cpu")
    from dit_trainer.kernels import dora_input, dora_output

    function = dora_input.DoraInputFunction if axis == "input" else dora_output.DoraOutputFunction
    layer = make_layer(axis=axis)
    via_op = run_layer(layer, "triton")
    w, a, b = layer["weight"], layer["lora_A"], layer["lora_B"]
    norm = dora.dora_weight_norm(w, a, b, layer["scale"], axis, backend="triton")
    leaves = fresh_leaves(layer)
    lay = {**layer, **leaves}
    y = function.apply(*(lay[k] for k in TENSORS), norm, lay["scale"], lay["eps"])[0]
    assert_all_close(backward_results(y, leaves), via_op, torch.float32)


@pytest.mark.parametrize("axis", ref.AXES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_autocast_matches_reference(kernels_on, axis, dtype):
    """fp32 activations and LoRA masters under autocast: the kernels cast like F.linear."""
    kernels_on("cuda")
    layer = make_layer("cuda", torch.float32, axis)
    with torch.autocast("cuda", dtype=dtype):
        expected = run_layer(layer, "torch")
        actual = run_layer(layer, "triton")
    assert_all_close(actual, expected, dtype)


# ----------------------------------------------------------------------- dispatch


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    # Even with the interpreter switched on, "auto" leaves CPU to the reference.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = make_layer()
    assert dora.resolve_backend(*(layer[k] for k in TENSORS), "output", backend="auto") == "torch"
    got = dora.dora_linear(**layer, backend="auto")
    assert torch.equal(got, ref.dora_linear(*(layer[k] for k in LINEAR_ARGS)))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make_layer()
    blocker = r"(tensors are on cpu; the Triton kernels need CUDA|triton is not installed)"
    with pytest.raises(RuntimeError, match=blocker):
        dora.dora_linear(**layer, backend="triton")
    with pytest.raises(RuntimeError, match=blocker):
        dora.dora_weight_norm(layer["weight"], layer["lora_A"], layer["lora_B"], 1.0, "output", backend="triton")


def test_explicit_triton_names_the_blocker(kernels_on):
    kernels_on("cpu")
    layer = make_layer(rank=300)
    with pytest.raises(RuntimeError, match="LoRA rank 300 exceeds 256"):
        dora.dora_linear(**layer, backend="triton")
    layer = make_layer()
    layer["weight"].requires_grad_()
    with pytest.raises(RuntimeError, match="base weight requires grad"):
        dora.dora_linear(**layer, backend="triton")
    # "auto" takes the reference for the same call instead of raising.
    assert dora.resolve_backend(*(layer[k] for k in TENSORS), "output", "auto") == "torch"
    layer = make_layer()
    layer["x"] = layer["x"].double()
    with pytest.raises(RuntimeError, match="activation dtype torch.float64"):
        dora.dora_linear(**layer, backend="triton")
    # A pointer from another device would be read as if it were local: refuse instead.
    layer = make_layer()
    layer["magnitude"] = layer["magnitude"].detach().to("meta")
    with pytest.raises(RuntimeError, match="magnitude is on meta but x is on cpu"):
        dora.dora_linear(**layer, backend="triton")


def test_bad_arguments_raise():
    layer = make_layer()
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        dora.dora_linear(**layer, backend="cuda")
    with pytest.raises(ValueError, match="axis 'rows' is not one of"):
        dora.dora_linear(**{**layer, "axis": "rows"})
    with pytest.raises(ValueError, match=r"lora_A is \(3, 44\) \(want \[rank, 45\]\)"):
        dora.dora_linear(**{**layer, "lora_A": layer["lora_A"][:, :44]})
    with pytest.raises(ValueError, match=r"base_sq has shape \(45,\), the output axis needs \(37,\)"):
        dora.dora_linear(**layer, base_sq=dora.base_sq_norm(layer["weight"], "input"))


# --------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize(
    "device, backend",
    [
        pytest.param("cpu", "torch", id="reference"),
        pytest.param("cpu", "triton", id="interp"),
        pytest.param("cuda", "triton", marks=GPU, id="cuda"),
    ],
)
def test_output_axis_matches_peft_dora(kernels_on, device, backend):
    """PEFT's DoRA (LoraConfig(use_dora=True)) is the output axis: same output and grads.

    PEFT divides by the norm without an eps (and computes it in the weight dtype, by
    materialising B @ A); with eps=0 and fp32 the two agree to rounding. With the
    engine's eps = finfo(float32).eps the factor differs by eps / ||row|| ~ 1e-7 relative.
    """
    peft = pytest.importorskip("peft")
    if backend == "triton":
        kernels_on(device)
    rank, alpha = 4, 8
    # PEFT initialises from the global RNG: seed it without disturbing other tests.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT)).to(device)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, target_modules=["0"], init_lora_weights=False)
        model = peft.get_peft_model(base, config)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(N_OUT, device=device) + 0.5)
        x = torch.randn(*LEAD, N_IN, device=device, requires_grad=True)
        grad_out = torch.randn(*LEAD, N_OUT, device=device)
    y_peft = model(x)
    y_peft.backward(grad_out)

    lora_A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    lora_B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    y = dora.dora_linear(x_ours, weight, bias, lora_A, lora_B, magnitude, alpha / rank, "output", 0.0, backend=backend)
    y.backward(grad_out)

    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_peft, **tol)
    torch.testing.assert_close(x_ours.grad, x.grad, **tol)
    torch.testing.assert_close(lora_A.grad, layer.lora_A["default"].weight.grad, **tol)
    torch.testing.assert_close(lora_B.grad, layer.lora_B["default"].weight.grad, **tol)
    torch.testing.assert_close(magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, **tol)
