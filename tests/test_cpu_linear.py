"""The model's CPU linear layers (reformer_kernels/cpu_linear.py): oneDNN for large fp32 inputs, nn.Linear numerics."""

from __future__ import annotations

import pytest
import torch

from reformer_kernels import cpu_linear


@pytest.mark.parametrize("relu", [False, True], ids=["none", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_nn_linear(relu, bias):
    # >= ONEDNN_MIN_ROWS rows, without and with autograd, vs nn.Linear (+ ReLU): outputs and the
    # gradients of input, weight and bias (the weight gradient spans two 1024-row blocks)
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80, bias=bias)
    x = torch.randn(2, cpu_linear.ONEDNN_MIN_ROWS // 2 + 3, 96, requires_grad=True)
    assert cpu_linear.onednn_applicable(x, layer.weight) == cpu_linear.ONEDNN_LINEAR
    grad_out = torch.randn(2, x.shape[1], 80)
    expected = layer(x)
    expected = torch.relu(expected) if relu else expected
    expected_grads = torch.autograd.grad(expected, (x, *layer.parameters()), grad_out)
    with torch.no_grad():
        fast = cpu_linear.linear(x, layer.weight, layer.bias, relu=relu)
    assert fast.shape == expected.shape
    torch.testing.assert_close(fast, expected.detach(), atol=1e-5, rtol=1e-5)
    with_grad = cpu_linear.linear(x, layer.weight, layer.bias, relu=relu)
    torch.testing.assert_close(with_grad, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(with_grad, (x, *layer.parameters()), grad_out)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not cpu_linear.ONEDNN_LINEAR, reason="torch build without oneDNN's _linear_pointwise")
@pytest.mark.parametrize("rows", [1, 1023, 1024, 2500])
@pytest.mark.parametrize("out_features, in_features", [(48, 72), (72, 48)])
@pytest.mark.parametrize("library", ["onednn", "mkl"])
def test_weight_grad_matches_mm(rows, out_features, in_features, library, monkeypatch):
    # block boundaries: one partial block, exactly one block, two full blocks and a tail; wide and narrow
    # outputs; through either library
    monkeypatch.setenv(cpu_linear.GEMM_ENV_VAR, library)
    generator = torch.Generator().manual_seed(rows)
    grad_out = torch.randn(rows, out_features, generator=generator)
    inputs = torch.randn(rows, in_features, generator=generator)
    got = cpu_linear.weight_grad(grad_out, inputs)
    want = grad_out.double().t().mm(inputs.double())
    assert got.shape == (out_features, in_features) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    # the blocks are summed in a fixed order: bit-identical on repeat
    assert torch.equal(got, cpu_linear.weight_grad(grad_out, inputs))


@pytest.fixture
def gemm_env(monkeypatch):
    monkeypatch.delenv(cpu_linear.GEMM_ENV_VAR, raising=False)
    return monkeypatch


@pytest.mark.skipif(not cpu_linear.ONEDNN_LINEAR, reason="torch build without oneDNN's _linear_pointwise")
@pytest.mark.parametrize(
    "setting, kind, linear_library, grad_library",
    [
        ("onednn", ("AuthenticAMD", "Zen 4"), "onednn", "onednn"),
        ("mkl", ("GenuineIntel", None), "mkl", "mkl"),
        ("auto", ("AuthenticAMD", "Zen 4"), "onednn", "mkl"),
        ("auto", ("AuthenticAMD", "Zen 5"), "onednn", "onednn"),
        ("auto", ("GenuineIntel", None), "onednn", "onednn"),
        (None, ("AuthenticAMD", "Zen 4"), "onednn", "mkl"),
    ],
    ids=["fixed-onednn", "fixed-mkl", "auto-zen4", "auto-zen5", "auto-intel", "unset-zen4"],
)
def test_library_by_setting_and_cpu_kind(gemm_env, setting, kind, linear_library, grad_library):
    # the library that runs is the one gemm_library names, bit for bit: REFORMER_CPU_GEMM when fixed, else
    # MKL for weight gradients only on the CPU kinds where it was measured faster
    if setting is not None:
        gemm_env.setenv(cpu_linear.GEMM_ENV_VAR, setting)
    gemm_env.setattr(cpu_linear, "cpu_kind", lambda: kind)
    assert (cpu_linear.gemm_library("linear"), cpu_linear.gemm_library("weight_grad")) == (linear_library, grad_library)
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(1100, 96, generator=generator), torch.randn(80, 96), torch.randn(80)
    grad_out = torch.randn(1100, 80, generator=generator)
    linear_fn = {"onednn": cpu_linear._linear_onednn, "mkl": cpu_linear._linear_mkl}[linear_library]
    grad_fn = {"onednn": cpu_linear._weight_grad_onednn, "mkl": cpu_linear._weight_grad_mkl}[grad_library]
    assert torch.equal(cpu_linear.onednn_linear(x, weight, bias, relu=True), linear_fn(x, weight, bias, True))
    assert torch.equal(cpu_linear.weight_grad(grad_out, x), grad_fn(grad_out, x))
    # both libraries agree with a float64 product
    want = grad_out.double().t().mm(x.double())
    torch.testing.assert_close(cpu_linear.weight_grad(grad_out, x).double(), want, atol=1e-4, rtol=1e-5)


def test_this_machine_cpu_kind_matches_cpu_info():
    from reformer_kernels import cpu_info

    info = cpu_info.cpu_info()
    assert cpu_linear.cpu_kind() == (info["vendor"], info["microarchitecture"])


def test_bad_gemm_library_setting_names_the_variable(gemm_env):
    gemm_env.setenv(cpu_linear.GEMM_ENV_VAR, "blas")
    with pytest.raises(ValueError, match="REFORMER_CPU_GEMM"):
        cpu_linear.onednn_linear(torch.randn(1024, 8), torch.randn(4, 8), None)
