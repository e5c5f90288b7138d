"""Linear layers through oneDNN on large CPU fp32 inputs (the model's matrix multiplies).

Why: torch's CPU fp32 ``mm`` goes to MKL, which on AMD CPUs runs its AVX2 code, while oneDNN uses
AVX-512. On the 2-core AMD EPYC (Zen 5) of our CI, L=16384 rows, 2 threads: [256 -> 512] + ReLU 26.7 ->
17.3 ms, [512 -> 256] 19.2 -> 8.9 ms, [256 -> 128] 4.6 -> 2.3 ms, same CPU time per wall time.
Results differ from MKL's only by fp32 summation order (max relative difference ~7e-7).

oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise`` (a private op of PyTorch's CPU
build, used by Inductor); everything falls back to ``F.linear`` when it is missing, and for other
dtypes/devices, non-contiguous inputs and small inputs.
"""

from __future__ import annotations

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


def onednn_applicable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` runs through oneDNN (large contiguous fp32 CPU input)."""
    return (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
    )


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``x @ W^T + b`` (then ReLU) through oneDNN, no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def row_blocks(num_rows: int, block_rows: int) -> Iterator[slice]:
    """Slices of ``block_rows`` consecutive rows covering ``range(num_rows)`` (the last one may be shorter)."""
    return (slice(start, min(start + block_rows, num_rows)) for start in range(0, num_rows, block_rows))


# rows per block of a weight gradient (see weight_grad)
WEIGHT_GRAD_BLOCK_ROWS = 1024


def weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad_out^T @ inputs`` (``[out, in]``) of ``[N, out]`` and ``[N, in]`` fp32 rows, through oneDNN.

    oneDNN computes ``a @ w^T``; with ``a = grad_out^T`` and ``w = inputs^T`` passed as transposed views
    (oneDNN reads the strides; no copies) it is the weight gradient. Blocks of rows are summed in block
    order (deterministic). Measured at N=16384, 2 threads, ms: [512 x 256] 21.5 (MKL ``mm``) / 22.5 (blocks
    transposed into contiguous copies first) / 18.0 (strided views), [256 x 512] 22.5 / 21.7 / 15.6,
    [384 x 256] 16.2 / 18.8 / 12.8; [256 x 128] 5.9 / 9.9 / 8.0 (MKL wins this small one, not worth a
    second path). 1024-row blocks; 512 to 4096 measured within 5%.
    """
    total = None
    for block in row_blocks(grad_out.shape[0], WEIGHT_GRAD_BLOCK_ROWS):
        part = onednn_linear(grad_out[block].t(), inputs[block].t(), None)  # [out, in]
        total = part if total is None else total.add_(part)
    return total


class _OneDNNLinear(torch.autograd.Function):
    """``x @ W^T + b`` (then ReLU) through oneDNN; backward: dX and dW through oneDNN, db as nn.Linear's."""

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
        if ctx.relu:
            grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grad_out = grad_out.contiguous()
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dX = dY @ W: oneDNN computes a @ w^T, so pass W^T ([in, out], small) as its weight
            grad_x = onednn_linear(grad_out, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(rows, x.reshape(-1, x.shape[-1]))  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU when ``relu``), through oneDNN where it applies."""
    if onednn_applicable(x, weight):
        if needs_grad(x, weight, bias):
            return _OneDNNLinear.apply(x, weight, bias, relu)
        return onednn_linear(x, weight, bias, relu)
    out = F.linear(x, weight, bias)
    return F.relu_(out) if relu else out
