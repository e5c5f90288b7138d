"""The model's large fp32 CPU matrix multiplies: oneDNN, or MKL where it was measured faster on this CPU kind.

Why two libraries: torch's CPU fp32 ``mm`` is MKL's sgemm, which on AMD CPUs runs its AVX2 code,
while oneDNN uses AVX-512 where the CPU has it; which one is faster depends on the CPU and the shape,
not on the ISA level alone (``python -m benchmarks.linear_backends`` times both on the model's shapes
per ISA setting; the measurements are in the README's Performance section and the commit that added
this choice): on one CPU kind oneDNN wins every forward product and MKL every weight gradient, on
another oneDNN wins most weight gradients too.

So the library is chosen once per process from the CPU kind (``gemm_library``): MKL for the weight
gradients on the kinds where it was measured faster at every model shape (``MKL_WEIGHT_GRAD_CPUS``),
oneDNN for everything else, as before. A per-shape micro-benchmark at the first call was tried and
dropped: on a shared machine its choices were erratic and the training step came out slower.
``REFORMER_CPU_GEMM=onednn|mkl`` (read at each call) fixes the library for everything; the two differ by
fp32 summation order (relative ~1e-7).

oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise`` (a private op of PyTorch's CPU
build, used by Inductor); everything falls back to ``F.linear`` when it is missing, and for other
dtypes/devices, non-contiguous inputs and small inputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _onednn_linear_available()
# below this many rows the per-call oneDNN setup is not worth it (e.g. one-token decoding steps)
ONEDNN_MIN_ROWS = 1024


def enough_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` has the ``ONEDNN_MIN_ROWS`` rows that ``onednn_applicable`` requires (a cheap first test)."""
    return x.dim() > 0 and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]


def onednn_applicable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` runs through oneDNN (large contiguous fp32 CPU input)."""
    return (
        ONEDNN_LINEAR
        and enough_rows(x)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_contiguous()
    )


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def _linear_mkl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    # torch's CPU fp32 addmm is MKL's sgemm (with the default float32 matmul precision)
    out = F.linear(x, weight, bias)
    return F.relu_(out) if relu else out


GEMM_ENV_VAR = "REFORMER_CPU_GEMM"
GEMM_LIBRARIES = ("auto", "onednn", "mkl")
# CPU kinds (vendor, core) on which MKL's weight gradients were measured faster than oneDNN's at every
# one of the model's shapes, with AVX-512 and with AVX2 code paths (benchmarks/linear_backends.py).
# Everywhere else, and for every forward product, oneDNN: the library every shape used before.
MKL_WEIGHT_GRAD_CPUS = frozenset({("AuthenticAMD", "Zen 4")})


@functools.lru_cache(maxsize=1)
def cpu_kind() -> tuple[str | None, str | None]:
    """``(vendor, core)`` of this CPU (``cpu_info.vendor_and_core``), read once per process."""
    from .cpu_info import vendor_and_core

    return vendor_and_core()


def gemm_library(operation: str = "linear") -> str:
    """The library (``onednn`` or ``mkl``) that runs ``operation`` (``linear`` or ``weight_grad``) here.

    ``REFORMER_CPU_GEMM=onednn|mkl`` (read at each call) fixes it; unset or ``auto``: MKL for weight
    gradients on the CPU kinds of ``MKL_WEIGHT_GRAD_CPUS``, oneDNN otherwise."""
    value = os.environ.get(GEMM_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in GEMM_LIBRARIES:
        raise ValueError(f"{GEMM_ENV_VAR} must be one of {GEMM_LIBRARIES}; got {value!r}")
    if value != "auto":
        return value
    return "mkl" if operation == "weight_grad" and cpu_kind() in MKL_WEIGHT_GRAD_CPUS else "onednn"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``x @ W^T + b`` (then ReLU), no autograd, through ``gemm_library("linear")`` (oneDNN by default)."""
    if gemm_library("linear") == "mkl":
        return _linear_mkl(x, weight, bias, relu)
    return _linear_onednn(x, weight, bias, relu)


def row_blocks(num_rows: int, block_rows: int) -> Iterator[slice]:
    """Slices of ``block_rows`` consecutive rows covering ``range(num_rows)`` (the last one may be shorter)."""
    return (slice(start, min(start + block_rows, num_rows)) for start in range(0, num_rows, block_rows))


# rows per block of a weight gradient (see weight_grad)
WEIGHT_GRAD_BLOCK_ROWS = 1024


def weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad_out^T @ inputs`` (``[out, in]``) of ``[N, out]`` and ``[N, in]`` fp32 rows: oneDNN or MKL.

    oneDNN computes ``a @ w^T``; with ``a = grad_out^T`` and ``w = inputs^T`` passed as transposed views
    (oneDNN reads the strides; no copies) it is the weight gradient, in 1,024-row blocks summed in block
    order (deterministic; 512 to 4,096 rows per block measured within 5%). MKL: one ``mm`` of the
    transposed view. ``gemm_library("weight_grad")`` picks one.
    """
    if gemm_library("weight_grad") == "mkl":
        return _weight_grad_mkl(grad_out, inputs)
    return _weight_grad_onednn(grad_out, inputs)


def _weight_grad_onednn(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    total = None
    for block in row_blocks(grad_out.shape[0], WEIGHT_GRAD_BLOCK_ROWS):
        part = _linear_onednn(grad_out[block].t(), inputs[block].t(), None, False)  # [out, in]
        total = part if total is None else total.add_(part)
    return total


def _weight_grad_mkl(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return grad_out.t().mm(inputs)  # [out, in]


class _OneDNNLinear(torch.autograd.Function):
    """``x @ W^T + b`` (then ReLU) through ``onednn_linear``; backward: dX through ``onednn_linear``, dW
    through ``weight_grad`` (each oneDNN or MKL per shape), db as nn.Linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu: bool):
        out = onednn_linear(x, weight, bias, relu)
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grads = onednn_linear_backward(grad_out, x, weight, out, ctx.relu, (needs_x, needs_w, ctx.has_bias and needs_b))
        return (*grads, None)


def onednn_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    relu: bool,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` of ``onednn_linear(x, weight, bias, relu)`` (``out``: its output, read with ``relu``);
    dX through ``onednn_linear``, dW through ``weight_grad``, db as nn.Linear's; None where ``needs`` is False."""
    if relu:
        grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
    grad_out = grad_out.contiguous()
    rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
    # dX = dY @ W: onednn_linear computes a @ w^T, so pass W^T ([in, out], small) as its weight
    grad_x = onednn_linear(grad_out, weight.t().contiguous(), None) if needs[0] else None  # [..., in]
    grad_w = weight_grad(rows, x.reshape(-1, x.shape[-1])) if needs[1] else None  # [out, in]
    grad_b = rows.sum(0) if needs[2] else None  # [out]
    return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU when ``relu``), through ``onednn_linear`` where it applies."""
    if onednn_applicable(x, weight):
        if needs_grad(x, weight, bias):
            return _OneDNNLinear.apply(x, weight, bias, relu)
        return onednn_linear(x, weight, bias, relu)
    out = F.linear(x, weight, bias)
    return F.relu_(out) if relu else out
