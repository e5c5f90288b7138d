"""The feed-forward block of a reversible layer (``g``): LayerNorm → dense → dropout → activation → dense → dropout.

Same modules, parameter names and numerics as transformers' ``ChunkReformerFeedForward``. Beside the plain forward
(the modules called in order, in chunks of ``chunk_size_feed_forward`` positions) it holds two CPU paths that stand
in for the modules only when they are plain (``fast_path.plain_modules``), with a ReLU activation:

- ``forward`` with a ``residual``: ``residual + g(x)`` in blocks of rows (LayerNorm, dense + ReLU, output dense and
  the residual add while the block is in cache), written into ``residual`` itself when the caller owns it;
- ``reverse_blocked``: the reversible backward of ``Y2 = X2 + g(Y1)`` in blocks of rows, without autograd.

Training-time dropout runs inside the blocks too: both masks are drawn up front exactly as the plain forward's
``F.dropout`` calls draw them (same RNG stream, same order, per ``chunk_size_feed_forward`` chunk), kept as bool
(``fast_path.dropout_keep_mask``) and applied per block; the reversible backward draws them again from the RNG
state the forward recorded (``reversible.layer_backward``). So the only ``[B, L, feed_forward_size]`` tensor of a
training step is that bool mask, a quarter of F.dropout's fp32 noise, with no fp32 activation beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from reformer_kernels.cpu_linear import enough_rows, onednn_applicable, onednn_linear, weight_grad

from .fast_path import (
    CPU_BLOCK_ROWS,
    blocked_cpu,
    dropout,
    dropout_keep_mask,
    dropout_noise,
    linear,
    plain_modules,
    row_blocks,
    unhooked,
)


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
        hidden_states = dropout(linear(self.dense, hidden_states), self.dropout, self.training)
        if plain_modules(self.act_fn):
            # in place on the fresh [B, L, FF] output (no backward of linear/dropout needs it)
            return F.relu_(hidden_states)
        return self.act_fn(hidden_states)

    def fuses_relu(self) -> bool:
        """A plain ReLU with no dropout before it: it may run fused into the dense layer's product."""
        return plain_modules(self.act_fn) and not (self.training and self.dropout > 0)

    def relu_activation(self) -> bool:
        """The activation is a plain ReLU (the blocked paths know how to differentiate it)."""
        return plain_modules(self.act_fn)


class ReformerFeedForwardOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.feed_forward_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return dropout(linear(self.dense, hidden_states), self.dropout, self.training)


def _forward_inline(hidden_states: torch.Tensor, layer_norm: nn.Module, dense: nn.Module, output: nn.Module):
    """``forward_chunk``'s operations with the modules' own calls, in their order (``_inline_modules``), on the rows
    (a 2-D input saves ``F.linear`` two reshapes per product: the same products and bits)."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, hidden]
    rows = F.layer_norm(rows, layer_norm.normalized_shape, layer_norm.weight, layer_norm.bias, layer_norm.eps)
    rows = torch.relu(F.linear(rows, dense.weight, dense.bias))  # [N, feed_forward_size]
    return F.linear(rows, output.weight, output.bias).view(hidden_states.shape)  # [..., hidden]


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
        chunk = self.chunk_size_feed_forward
        one_chunk = chunk <= 0 or attention_output.shape[self.seq_len_dim] <= chunk
        if not enough_rows(attention_output):
            # a decoding step's rows: the plain modules' own operations, without the module calls
            modules = self._inline_modules() if one_chunk else None
            if modules is not None:
                out = _forward_inline(attention_output, *modules)
                return out if residual is None else residual + out
        elif residual is not None and self._blockable(attention_output, residual):
            return self._forward_blocked(attention_output, residual, in_place)
        if one_chunk:
            out = self.forward_chunk(attention_output)
        else:
            parts = attention_output.split(chunk, dim=self.seq_len_dim)
            out = torch.cat([self.forward_chunk(part) for part in parts], dim=self.seq_len_dim)
        return out if residual is None else residual + out

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.dense(self.layer_norm(hidden_states)))

    def _inline_modules(self) -> tuple[nn.Module, nn.Module, nn.Module] | None:
        """``(layer_norm, dense, output)`` linear layers when ``_forward_inline`` computes what calling the modules
        does: plain modules (a ReLU activation), the two wrappers' own forwards, no active dropout; else None. For
        small inputs (a decoding step: too few rows for the blocked path), where a module call costs more than its
        product."""
        dense, output = self.dense, self.output
        if type(dense) is not ReformerFeedForwardDense or type(output) is not ReformerFeedForwardOutput:
            return None
        if (dense.training and dense.dropout > 0) or (output.training and output.dropout > 0):
            return None
        layer_norm, dense_linear, output_linear = self.layer_norm, dense.dense, output.dense
        if not (unhooked(dense, output) and plain_modules(layer_norm, dense_linear, dense.act_fn, output_linear)):
            return None
        return layer_norm, dense_linear, output_linear

    def _modules_in_order(self) -> tuple[nn.Module, ...]:
        return (self.layer_norm, self.dense.dense, self.dense.act_fn, self.output.dense)

    def _blockable(self, attention_output: torch.Tensor, residual: torch.Tensor) -> bool:
        """Blocked path: plain modules, ReLU, no gradient, large fp32 CPU input (rows are independent, so blocking
        changes no result; ``chunk_size_feed_forward`` only bounds memory and is subsumed, except for the order in
        which dropout masks are drawn, which ``_dropout_masks`` follows)."""
        # blocked_cpu first: its first test, the row count, is the cheapest, and a decoding step (one row) fails it
        return (
            blocked_cpu(attention_output, *self._modules_in_order())
            and self.dense.relu_activation()
            and residual.is_contiguous()
            and residual.dtype == attention_output.dtype
            and residual.shape == attention_output.shape
        )

    def _dropout_masks(
        self, shape: torch.Size, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The keep masks (bool, ``[B*L, FF]`` and ``[B*L, H]``, or None) of the dense and output dropouts for an input
        of ``shape [B, L, H]``, drawn as the plain forward's ``F.dropout`` calls draw them: per chunk of
        ``chunk_size_feed_forward`` positions (the whole sequence when that is <= 0), dense mask then output mask."""
        batch_size, seq_len, hidden = shape
        width = self.dense.dense.out_features
        p_dense, p_out = self.dense.dropout, self.output.dropout
        dense_on, out_on = self.dense.training and p_dense > 0, self.output.training and p_out > 0
        if not (dense_on or out_on):
            return None, None
        chunk = self.chunk_size_feed_forward
        if chunk <= 0 or seq_len <= chunk:
            keep_dense = dropout_keep_mask((batch_size * seq_len, width), p_dense, self.dense.training, device)
            keep_out = dropout_keep_mask((batch_size * seq_len, hidden), p_out, self.output.training, device)
            return keep_dense, keep_out
        keep_dense = torch.empty(batch_size, seq_len, width, dtype=torch.bool, device=device) if dense_on else None
        keep_out = torch.empty(batch_size, seq_len, hidden, dtype=torch.bool, device=device) if out_on else None
        for start in range(0, seq_len, chunk):
            part = slice(start, min(start + chunk, seq_len))
            n = part.stop - part.start
            if dense_on:
                keep_dense[:, part] = dropout_keep_mask((batch_size, n, width), p_dense, True, device)
            if out_on:
                keep_out[:, part] = dropout_keep_mask((batch_size, n, hidden), p_out, True, device)
        return (
            None if keep_dense is None else keep_dense.view(-1, width),
            None if keep_out is None else keep_out.view(-1, hidden),
        )

    def _dense_block(
        self, normed: torch.Tensor, keep_dense: torch.Tensor | None, block: slice
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``relu(dropout(dense(normed)))`` of one block ``[n, FF]`` and the dropout noise it used (or None)."""
        dense = self.dense.dense
        if keep_dense is None:
            return onednn_linear(normed, dense.weight, dense.bias, relu=True), None
        noise = dropout_noise(keep_dense[block], self.dense.dropout, normed.dtype)  # [n, FF]
        return onednn_linear(normed, dense.weight, dense.bias).mul_(noise).relu_(), noise

    def _forward_blocked(self, attention_output: torch.Tensor, residual: torch.Tensor, in_place: bool) -> torch.Tensor:
        """``residual + g(attention_output)`` in blocks of rows: the block's intermediates stay in cache and the
        residual is added straight into the output rows."""
        norm, output = self.layer_norm, self.output.dense
        hidden = attention_output.shape[-1]
        rows = attention_output.reshape(-1, hidden)  # [N, H]
        residual_rows = residual.reshape(-1, hidden)  # [N, H]
        out = residual_rows if in_place else torch.empty_like(residual_rows)  # [N, H]
        keep_dense, keep_out = self._dropout_masks(attention_output.shape, rows.device)  # [N, FF], [N, H] or None
        for block in row_blocks(rows.shape[0], CPU_BLOCK_ROWS):
            h = F.layer_norm(rows[block], (hidden,), norm.weight, norm.bias, norm.eps)  # [n, H]
            h = self._dense_block(h, keep_dense, block)[0]  # [n, FF]
            h = onednn_linear(h, output.weight, output.bias)  # [n, H]
            noise = dropout_noise(None if keep_out is None else keep_out[block], self.output.dropout, h.dtype)
            if noise is not None:
                h.mul_(noise)
            torch.add(residual_rows[block], h, out=out[block])  # [n, H]
        return out.view_as(residual)

    def reverse_fusable(self, *tensors: torch.Tensor) -> bool:
        """Whether ``reverse_blocked`` applies: plain modules, ReLU, autocast off, large fp32 CPU tensors of one
        shape (``Y1, Y2, dY1, dY2``)."""
        first = tensors[0]
        return (
            self.dense.relu_activation()
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

        With dropout the caller replays the RNG state recorded before the forward's ``g``: the masks are drawn
        again here, first thing, as the forward drew them.
        """
        norm, dense, output = self.layer_norm, self.dense.dense, self.output.dense
        keep_dense, keep_out = self._dropout_masks(attn_output.shape, attn_output.device)  # [N, FF], [N, H] or None
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
            act, noise_dense = self._dense_block(normed, keep_dense, block)  # [n, FF], [n, FF] or None
            out = onednn_linear(act, output.weight, output.bias)  # [n, H]
            grad_out = grad_y2_rows[block]  # [n, H]
            noise_out = dropout_noise(None if keep_out is None else keep_out[block], self.output.dropout, out.dtype)
            if noise_out is not None:
                # the output dropout and its backward: out * noise, grad * noise
                out.mul_(noise_out)
                grad_out = grad_out * noise_out  # [n, H]
            torch.sub(y2_rows[block], out, out=x2[block])  # [n, H]
            grads[output.weight].add_(weight_grad(grad_out, act))  # [H, FF]
            grads[output.bias].add_(grad_out.sum(0))
            grad_act = torch.ops.aten.threshold_backward(onednn_linear(grad_out, output_t, None), act, 0)  # [n, FF]
            if noise_dense is not None:
                # backward of the dense dropout (before the ReLU): the gradient times the same noise
                grad_act.mul_(noise_dense)
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
