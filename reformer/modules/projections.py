"""LayerNorm + input projections, and the output projection with its residual: plain and CPU-blocked.

Without autograd on large fp32 CPU inputs the projections of the attention layers run in blocks of rows:
LayerNorm and one oneDNN product against the concatenated weights while the block is in cache, written into
``[B, L, H * D]`` buffers viewed as ``[B, H, L, D]`` (the layout the attention op reads). The reversible backward
reuses the same blocks (``recompute`` keeps the LayerNorm statistics, ``backward_blocked`` differentiates).
Everything here runs only when ``plain_modules`` holds for the modules it stands in for; otherwise the modules
are called.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reformer_kernels.cpu_linear import enough_rows, onednn_linear, weight_grad
from reformer_kernels.scratch import scratch_empty

from .fast_path import (
    CPU_BLOCK_ROWS,
    blocked_cpu,
    dropout_keep_mask,
    dropout_noise,
    linear,
    plain_modules,
    row_blocks,
)
from .fast_path import dropout as apply_dropout


def _blocked_projections(
    rows: torch.Tensor,
    norm: nn.LayerNorm,
    layers: Sequence[nn.Linear],
    outs: Sequence[torch.Tensor],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``outs[i] = LayerNorm(rows) @ layers[i].weight^T`` for ``rows [N, hidden]`` (bias-free layers, ``outs``
    ``[N, width]`` each), block by block. ``stats``: ``(mean, rstd)`` ``[N, 1]`` buffers that receive the LayerNorm
    statistics (for its backward)."""
    weights = torch.cat([layer.weight for layer in layers])  # [P * width, hidden]
    width = outs[0].shape[1]
    for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
        normed, mean, rstd = torch.ops.aten.native_layer_norm(
            rows[block], [rows.shape[1]], norm.weight, norm.bias, norm.eps
        )  # [n, hidden], [n, 1], [n, 1]
        if stats is not None:
            stats[0][block], stats[1][block] = mean, rstd
        projected = onednn_linear(normed, weights, None)  # [n, P * width]
        for i, out in enumerate(outs):
            out[block] = projected[:, i * width : (i + 1) * width]  # [n, width]


def _blockable(hidden_states: torch.Tensor, norm: nn.Module, layers: Sequence[nn.Module]) -> bool:
    return blocked_cpu(hidden_states, norm, *layers) and all(
        layer.bias is None and layer.weight.shape == layers[0].weight.shape for layer in layers
    )


def project(
    hidden_states: torch.Tensor, layer_norm: nn.Module | None, layers: Sequence[nn.Module]
) -> list[torch.Tensor]:
    """``[layer(layer_norm(hidden_states)) for layer in layers]``, each ``[B, L, width]``.

    Blocked (into scratch buffers, reused by the next layer inside the model's no-grad layer pass) when the
    modules are plain, no gradient is needed and the input is a large fp32 CPU tensor.
    """
    if layer_norm is None or not _blockable(hidden_states, layer_norm, layers):
        if layer_norm is not None:
            hidden_states = layer_norm(hidden_states)
        return [linear(layer, hidden_states) for layer in layers]
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B*L, hidden]
    width = layers[0].weight.shape[0]
    outs = [
        scratch_empty(f"projection.{i}", (rows.shape[0], width), rows.dtype, rows.device) for i in range(len(layers))
    ]
    _blocked_projections(rows, layer_norm, layers, outs)
    return [out.view(*hidden_states.shape[:2], width) for out in outs]


def recompute(
    rows: torch.Tensor, layer_norm: nn.LayerNorm, layers: Sequence[nn.Linear]
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The blocked projections of ``rows [N, hidden]`` for the reversible backward, with the LayerNorm
    statistics ``(mean, rstd)`` ``[N, 1]`` that ``backward_blocked`` needs."""
    stats = (rows.new_empty(rows.shape[0], 1), rows.new_empty(rows.shape[0], 1))
    outs = [rows.new_empty(rows.shape[0], layer.weight.shape[0]) for layer in layers]  # [N, width] each
    _blocked_projections(rows, layer_norm, layers, outs, stats)
    return outs, stats


def backward_blocked(
    rows: torch.Tensor,
    layer_norm: nn.LayerNorm,
    layers: Sequence[nn.Linear],
    grad_outs: Sequence[torch.Tensor],
    stats: tuple[torch.Tensor, torch.Tensor],
    grad_rows: torch.Tensor,
    residual_grad: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Backward of ``project`` over ``rows [N, hidden]`` in blocks (LayerNorm recomputed per block):
    ``grad_rows = residual_grad + d(rows)`` (``grad_rows`` may be ``residual_grad`` itself) and the parameter
    gradients, summed over blocks in block order (deterministic)."""
    hidden = rows.shape[1]
    width = layers[0].weight.shape[0]
    weights_t = torch.cat([layer.weight for layer in layers]).t().contiguous()  # [hidden, P * width]
    grad_weights = weights_t.new_zeros(weights_t.shape[::-1])  # [P * width, hidden]
    grads = {p: torch.zeros_like(p) for p in (layer_norm.weight, layer_norm.bias)}
    mean, rstd = stats
    for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
        normed = torch.ops.aten.native_layer_norm(
            rows[block], [hidden], layer_norm.weight, layer_norm.bias, layer_norm.eps
        )[0]  # [n, hidden]
        grad_projected = torch.cat([g[block] for g in grad_outs], dim=1)  # [n, P * width]
        grad_weights.add_(weight_grad(grad_projected, normed))
        grad_normed = onednn_linear(grad_projected, weights_t, None)  # [n, hidden]
        grad_x, grad_gamma, grad_beta = torch.ops.aten.native_layer_norm_backward(
            grad_normed,
            rows[block],
            [hidden],
            mean[block],
            rstd[block],
            layer_norm.weight,
            layer_norm.bias,
            [True, True, True],
        )  # [n, hidden], [hidden], [hidden]
        torch.add(residual_grad[block], grad_x, out=grad_rows[block])  # [n, hidden]
        grads[layer_norm.weight].add_(grad_gamma)
        grads[layer_norm.bias].add_(grad_beta)
    for i, layer in enumerate(layers):
        grads[layer.weight] = grad_weights[i * width : (i + 1) * width]  # [width, hidden]
    return grads


def project_step(
    hidden_states: torch.Tensor, layer_norm: nn.Module | None, layers: list[nn.Module]
) -> list[torch.Tensor]:
    """``[layer(layer_norm(hidden_states)) for layer in layers]`` for a decoding step's few rows: with plain modules
    their own operations (``F.layer_norm``, ``F.linear``) without the module calls, on the rows ``[B, out]``; else the
    modules called (``[B, 1, out]``)."""
    norms = [] if layer_norm is None else [layer_norm]
    if plain_modules(*norms, *layers):
        # as [rows, hidden]: a 2-D input saves F.linear two reshapes per product (the same product and bits)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B, hidden]
        if layer_norm is not None:
            rows = F.layer_norm(rows, layer_norm.normalized_shape, layer_norm.weight, layer_norm.bias, layer_norm.eps)
        return [F.linear(rows, layer.weight, layer.bias) for layer in layers]  # [B, out] each
    if layer_norm is not None:
        hidden_states = layer_norm(hidden_states)
    return [linear(layer, hidden_states) for layer in layers]


def project_out(
    dense: nn.Module,
    hidden_states: torch.Tensor,
    dropout: float,
    training: bool,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``dropout(dense(hidden_states))``, plus ``residual`` when given. With ``in_place`` (the caller owns
    ``residual``), no gradient and a large fp32 CPU input, the product is added into ``residual`` row block by row
    block (no fresh ``[B, L, hidden]`` tensor); a training-time dropout mask is drawn as ``F.dropout`` draws it
    (``fast_path.dropout_keep_mask``) and applied per block."""
    if (
        residual is not None
        and in_place
        and blocked_cpu(hidden_states, dense)
        and residual.is_contiguous()
        and residual.dtype == hidden_states.dtype
    ):
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, H*D]
        residual_rows = residual.view(-1, residual.shape[-1])  # [N, hidden]
        keep = dropout_keep_mask(tuple(residual_rows.shape), dropout, training, rows.device)  # [N, hidden] or None
        for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
            product = onednn_linear(rows[block], dense.weight, dense.bias)  # [n, hidden]
            noise = dropout_noise(None if keep is None else keep[block], dropout, product.dtype)
            if noise is not None:
                product.mul_(noise)
            torch.add(residual_rows[block], product, out=residual_rows[block])
        return residual
    if not enough_rows(hidden_states) and not (training and dropout > 0) and plain_modules(dense):
        # a decoding step's rows: the plain layer's own product, without the module call
        out = F.linear(hidden_states, dense.weight, dense.bias)
    else:
        out = apply_dropout(linear(dense, hidden_states), dropout, training)
    return out if residual is None else residual + out


__all__ = ["backward_blocked", "plain_modules", "project", "project_out", "project_step", "recompute"]
