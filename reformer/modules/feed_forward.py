"""The feed-forward block of a reversible layer (``g``): LayerNorm → dense → dropout → activation → dense → dropout.

Same modules, parameter names and numerics as transformers' ``ChunkReformerFeedForward``. Beside the plain forward
(the modules called in order, in chunks of ``chunk_size_feed_forward`` positions) it holds two CPU paths that stand
in for the modules only when they are plain (``fast_path.plain_modules``), with a ReLU activation and no dropout:

- ``forward`` with a ``residual``: ``residual + g(x)`` in blocks of rows (LayerNorm, dense + ReLU, output dense and
  the residual add while the block is in cache), written into ``residual`` itself when the caller owns it;
- ``reverse_blocked``: the reversible backward of ``Y2 = X2 + g(Y1)`` in blocks of rows, without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from reformer_kernels.cpu_linear import enough_rows, onednn_applicable, onednn_linear, weight_grad

from .fast_path import CPU_BLOCK_ROWS, blocked_cpu, linear, plain_modules, row_blocks


class ReformerFeedForwardDense(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.act_fn = ACT2FN[config.hidden_act]
        self.dense = nn.Linear(config.hidden_size, config.feed_forward_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # transformers' order: dense → dropout → activation
        if self.fuses_relu():
            # no dropout between them: the linear and the ReLU fuse
            return linear(self.dense, hidden_states, relu=True)
        hidden_states = F.dropout(linear(self.dense, hidden_states), p=self.dropout, training=self.training)
        if plain_modules(self.act_fn):
            # in place on the fresh [B, L, FF] output (no backward of linear/dropout needs it)
            return F.relu_(hidden_states)
        return self.act_fn(hidden_states)

    def fuses_relu(self) -> bool:
        """A plain ReLU with no dropout before it: it may run fused into the dense layer's product."""
        return plain_modules(self.act_fn) and not (self.training and self.dropout > 0)


class ReformerFeedForwardOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.feed_forward_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.dropout(linear(self.dense, hidden_states), p=self.dropout, training=self.training)


class ChunkReformerFeedForward(nn.Module):
    """``g``, applied in chunks of ``chunk_size_feed_forward`` positions when that is > 0 (a last shorter chunk is
    allowed)."""

    def __init__(self, config):
        super().__init__()
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = ReformerFeedForwardDense(config)
        self.output = ReformerFeedForwardOutput(config)

    def forward(
        self, attention_output: torch.Tensor, residual: torch.Tensor | None = None, in_place: bool = False
    ) -> torch.Tensor:
        """``g(attention_output)``, or ``residual + g(attention_output)`` when ``residual`` is given (written into
        ``residual`` itself when ``in_place`` and the blocked CPU path applies)."""
        if residual is not None and self._blockable(attention_output, residual):
            return self._forward_blocked(attention_output, residual, in_place)
        chunk = self.chunk_size_feed_forward
        if chunk <= 0 or attention_output.shape[self.seq_len_dim] <= chunk:
            out = self.forward_chunk(attention_output)
        else:
            parts = attention_output.split(chunk, dim=self.seq_len_dim)
            out = torch.cat([self.forward_chunk(part) for part in parts], dim=self.seq_len_dim)
        return out if residual is None else residual + out

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.dense(self.layer_norm(hidden_states)))

    def _modules_in_order(self) -> tuple[nn.Module, ...]:
        return (self.layer_norm, self.dense.dense, self.dense.act_fn, self.output.dense)

    def _blockable(self, attention_output: torch.Tensor, residual: torch.Tensor) -> bool:
        """Blocked path: plain modules, ReLU, no dropout, no gradient, large fp32 CPU input (rows are independent,
        so blocking changes no result; ``chunk_size_feed_forward`` only bounds memory and is subsumed)."""
        # the cheapest condition first: a decoding step (one row) fails it
        return (
            enough_rows(attention_output)
            and self.dense.fuses_relu()
            and blocked_cpu(attention_output, *self._modules_in_order())
            and residual.is_contiguous()
            and residual.dtype == attention_output.dtype
            and residual.shape == attention_output.shape
        )

    def _forward_blocked(self, attention_output: torch.Tensor, residual: torch.Tensor, in_place: bool) -> torch.Tensor:
        """``residual + g(attention_output)`` in blocks of rows: the block's intermediates stay in cache and the
        residual is added straight into the output rows."""
        norm, dense, output = self.layer_norm, self.dense.dense, self.output.dense
        hidden = attention_output.shape[-1]
        rows = attention_output.reshape(-1, hidden)  # [N, H]
        residual_rows = residual.reshape(-1, hidden)  # [N, H]
        out = residual_rows if in_place else torch.empty_like(residual_rows)  # [N, H]
        for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
            h = F.layer_norm(rows[block], (hidden,), norm.weight, norm.bias, norm.eps)  # [n, H]
            h = onednn_linear(h, dense.weight, dense.bias, relu=True)  # [n, FF]
            h = onednn_linear(h, output.weight, output.bias)  # [n, H]
            torch.add(residual_rows[block], h, out=out[block])  # [n, H]
        return out.view_as(residual)

    def reverse_fusable(self, *tensors: torch.Tensor) -> bool:
        """Whether ``reverse_blocked`` applies: plain modules, ReLU, no dropout, autocast off, large fp32 CPU
        tensors of one shape (``Y1, Y2, dY1, dY2``)."""
        first = tensors[0]
        return (
            self.dense.fuses_relu()
            and plain_modules(*self._modules_in_order())
            and not torch.is_autocast_enabled(first.device.type)
            and onednn_applicable(first, self.dense.dense.weight)
            and all(p.dtype == torch.float32 for p in self.parameters())
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == first.shape for t in tensors)
        )

    @torch.no_grad()
    def reverse_blocked(
        self,
        attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
        """The reversible backward of ``Y2 = X2 + g(Y1)`` in blocks of rows: from ``Y1, Y2, dY1, dY2`` returns
        ``X2 = Y2 - g(Y1)``, ``dY1 + (dg/dY1)^T dY2`` and the gradients of ``g``'s parameters.

        Each block recomputes LayerNorm (keeping its mean and 1/std), dense + ReLU and the output dense, then
        runs their backward while the block is in cache; the input gradients go through oneDNN and the weight
        gradients are summed over blocks in block order (deterministic). Same numbers as autograd over the
        unblocked graph up to fp32 summation order. ``in_place``: ``X2`` overwrites ``Y2`` and the new ``dY1`` the
        old one, block by block (the caller owns both buffers).
        """
        norm, dense, output = self.layer_norm, self.dense.dense, self.output.dense
        hidden = attn_output.shape[-1]
        rows, y2_rows = attn_output.reshape(-1, hidden), hidden_states.reshape(-1, hidden)  # [N, H] each
        grad_y1_rows = grad_attn_output.reshape(-1, hidden)  # [N, H]
        grad_y2_rows = grad_hidden_states.reshape(-1, hidden)  # [N, H]
        x2 = y2_rows if in_place else torch.empty_like(y2_rows)  # [N, H]
        grad_y1 = grad_y1_rows if in_place else torch.empty_like(grad_y1_rows)  # [N, H]
        params = (norm.weight, norm.bias, dense.weight, dense.bias, output.weight, output.bias)
        grads = {p: torch.zeros_like(p) for p in params}
        # oneDNN computes a @ w^T: the transposed weights turn it into dY @ W
        dense_t, output_t = dense.weight.t().contiguous(), output.weight.t().contiguous()  # [H, FF], [FF, H]
        for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
            x = rows[block]  # [n, H]
            normed, mean, rstd = torch.ops.aten.native_layer_norm(x, [hidden], norm.weight, norm.bias, norm.eps)
            act = onednn_linear(normed, dense.weight, dense.bias, relu=True)  # [n, FF]
            torch.sub(y2_rows[block], onednn_linear(act, output.weight, output.bias), out=x2[block])  # [n, H]
            grad_out = grad_y2_rows[block]  # [n, H]
            grads[output.weight].add_(weight_grad(grad_out, act))  # [H, FF]
            grads[output.bias].add_(grad_out.sum(0))
            grad_act = torch.ops.aten.threshold_backward(onednn_linear(grad_out, output_t, None), act, 0)  # [n, FF]
            grads[dense.weight].add_(weight_grad(grad_act, normed))  # [FF, H]
            grads[dense.bias].add_(grad_act.sum(0))
            grad_normed = onednn_linear(grad_act, dense_t, None)  # [n, H]
            grad_x, grad_gamma, grad_beta = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, [hidden], mean, rstd, norm.weight, norm.bias, [True, True, True]
            )  # [n, H], [H], [H]
            torch.add(grad_y1_rows[block], grad_x, out=grad_y1[block])  # [n, H]
            grads[norm.weight].add_(grad_gamma)
            grads[norm.bias].add_(grad_beta)
        return x2.view_as(hidden_states), grad_y1.view_as(grad_attn_output), grads


__all__ = ["ChunkReformerFeedForward", "ReformerFeedForwardDense", "ReformerFeedForwardOutput"]
