"""Attention dispatch: backend choice from (fake) capabilities, fallbacks, errors, numerics."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from dit_trainer.kernels import attention as attn

HAS_CUDA = torch.cuda.is_available()
ALL = ("cute", "flash", "sdpa")
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "capability, dtype, head_dim, installed, expected",
    [
        ((9, 0), bf16, 128, ALL, "cute"),  # H100
        ((10, 0), fp16, 128, ALL, "cute"),  # B200
        ((9, 0), bf16, 128, ("flash", "sdpa"), "flash"),  # Hopper without flash-attn-4
        ((9, 0), bf16, 256, ALL, "flash"),  # head_dim FA4 does not take here
        ((9, 0), bf16, 72, ALL, "flash"),
        ((8, 0), bf16, 128, ALL, "flash"),  # A100: FA4 is Hopper / Blackwell only
        ((8, 9), fp16, 64, ALL, "flash"),  # Ada
        ((8, 6), bf16, 128, ("cute", "sdpa"), "sdpa"),  # Ampere with only FA4 installed
        ((9, 0), fp32, 128, ALL, "sdpa"),  # flash kernels are 16-bit only
        ((9, 0), bf16, 100, ALL, "sdpa"),  # not a multiple of 8
        ((9, 0), bf16, 512, ALL, "sdpa"),
        ((7, 5), fp16, 128, ALL, "sdpa"),  # Turing
        ((12, 0), bf16, 128, ALL, "sdpa"),  # consumer Blackwell: neither package targets it
        ((9, 0), bf16, 128, ("sdpa",), "sdpa"),
    ],
)
def test_auto_picks_the_best_available(capability, dtype, head_dim, installed, expected):
    assert attn.select_backend("cuda", dtype, head_dim, "auto", capability=capability, installed=installed) == expected


def test_auto_on_cpu_and_sdpa_requests_are_sdpa():
    assert attn.select_backend("cpu", bf16, 128, "auto", installed=ALL) == "sdpa"
    assert attn.select_backend("cpu", fp32, 128) == "sdpa"
    assert attn.select_backend("cuda", bf16, 128, "sdpa", capability=(9, 0), installed=ALL) == "sdpa"


def test_key_mask_defers_flash_backends_to_sdpa():
    kw = dict(capability=(9, 0), installed=ALL, masked=True)
    assert attn.select_backend("cuda", bf16, 128, "auto", **kw) == "sdpa"
    assert attn.select_backend("cuda", bf16, 128, "cute", **kw) == "sdpa"
    assert attn.select_backend("cuda", bf16, 128, "flash", **kw) == "sdpa"


def test_explicit_backends_that_fit_are_honoured():
    kw = dict(capability=(9, 0), installed=ALL)
    assert attn.select_backend("cuda", bf16, 128, "cute", **kw) == "cute"
    assert attn.select_backend("cuda", bf16, 128, "flash", **kw) == "flash"


@pytest.mark.parametrize(
    "requested, kwargs, message",
    [
        ("cute", dict(capability=(8, 0), installed=ALL), r"compute capability 9\.x or 10\.x .* this GPU is 8\.0"),
        (
            "cute",
            dict(capability=(9, 0), installed=("sdpa",)),
            r"flash-attn-4 package is not importable; install it with `pip install comfyui-dit-trainer\[cuda\]",
        ),
        (
            "flash",
            dict(capability=(9, 0), installed=("cute", "sdpa")),
            r"flash-attn 2 package is not importable; install it with `pip install comfyui-dit-trainer\[flash2\]",
        ),
        ("flash", dict(capability=(7, 5), installed=ALL), r"compute capability 8\.x or 9\.x"),
        ("cute", dict(capability=(9, 0), installed=ALL, dtype=fp32), r"float16 or bfloat16 inputs, got torch\.float32"),
        ("cute", dict(capability=(9, 0), installed=ALL, head_dim=256), r"head_dim 256 is not one of \(64, 96, 128\)"),
    ],
)
def test_explicit_unavailable_backend_raises(requested, kwargs, message):
    dtype = kwargs.pop("dtype", bf16)
    head_dim = kwargs.pop("head_dim", 128)
    with pytest.raises(RuntimeError, match=message):
        attn.select_backend("cuda", dtype, head_dim, requested, **kwargs)


@pytest.mark.parametrize("requested, extra", [("cute", "[cuda]"), ("flash", "[flash2]")])
def test_explicit_flash_backend_on_cpu_raises(requested, extra):
    q = torch.randn(1, 4, 2, 64)
    installed = set(attn.available_backends())
    with pytest.raises(RuntimeError, match=f"backend '{requested}' cannot run: .*tensors are on cpu") as err:
        attn.attention(q, q, q, backend=requested)
    if requested not in installed:
        assert f"pip install comfyui-dit-trainer{extra}" in str(err.value)


def test_unknown_backend_raises():
    message = r"attention backend 'xformers' is not one of \('auto', 'cute', 'flash', 'sdpa'\)"
    with pytest.raises(ValueError, match=message):
        attn.select_backend("cpu", bf16, 128, "xformers")


def test_available_backends_always_has_sdpa():
    backends = attn.available_backends()
    assert backends[-1] == "sdpa" and set(backends) <= set(ALL)


def test_choice_is_logged_once_per_backend_and_device(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    q = torch.randn(1, 3, 2, 8)
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        for _ in range(3):
            attn.attention(q, q, q)
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa on cpu"]


def manual_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(D) + mask) v in fp64, [B, L, H, D] layout."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_sdpa_matches_manual_softmax(masked, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    key_mask = None
    if masked:
        key_mask = torch.rand(2, 9, generator=g) > 0.4
        key_mask[:, 0] = True  # every query keeps at least one key
    out = attn.attention(q, k, v, key_mask, backend=backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), manual_attention(q, k, v, key_mask), atol=1e-5, rtol=1e-5)
    if masked:
        # The mask must matter: masked keys' values cannot reach the output.
        v2 = v.clone()
        v2[~key_mask] = 1e3
        torch.testing.assert_close(attn.attention(q, k, v2, key_mask, backend=backend), out)


def test_attention_compiles_without_graph_break():
    q = torch.randn(1, 5, 2, 8)
    mask = torch.ones(1, 5, dtype=torch.bool)
    compiled = torch.compile(attn.attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, q, q, mask), attn.attention(q, q, q, mask))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [fp16, bf16])
@pytest.mark.parametrize("backend", ["cute", "flash"])
def test_flash_backends_match_sdpa(backend, dtype):
    if backend not in attn.available_backends():
        pytest.skip(f"{backend} is not installed here")
    try:
        attn.select_backend("cuda", dtype, 128, backend)
    except RuntimeError as err:
        pytest.skip(str(err))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 128, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 300, 4, 128, device="cuda", dtype=dtype, generator=g)
    outs = {}
    for name in (backend, "sdpa"):
        for t in (q, k, v):
            t.grad = None
        out = attn.attention(q, k, v, backend=name)
        out.backward(grad)
        outs[name] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == bf16 else dict(atol=5e-3, rtol=5e-3)
    for got, want in zip(outs[backend], outs["sdpa"]):
        torch.testing.assert_close(got, want, **tol)
