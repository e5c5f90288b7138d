"""The LM head, and the encoder's final LayerNorm fused with a row-wise head on CPU.

``ReformerOnlyLMHead``: ``logits = h @ decoder.weight^T + decoder.bias`` over ``2 * hidden_size`` features, in chunks
of ``chunk_size_lm_head`` positions when that is > 0. ``bias`` is the parameter transformers (5.24) keeps beside
``decoder.bias`` and never adds; it is kept, frozen (no gradient, so DistributedDataParallel sees no unused
parameter), for the same state-dict keys and parameter names.

``final_layer_norm``: ``LayerNorm(cat([Y1, Y2], -1))``, then a row-wise head; without autograd on plain modules in
blocks of rows, so neither the ``[B, L, 2 * hidden]`` concatenation nor the normalised rows are ever whole tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reformer_kernels.cpu_linear import needs_grad, onednn_applicable, onednn_linear

from .fast_path import CPU_BLOCK_ROWS, eager_fast_paths, linear, plain_modules, row_blocks


class ReformerOnlyLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.seq_len_dim = 1
        self.chunk_size_lm_head = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        chunk = self.chunk_size_lm_head
        if chunk <= 0 or hidden_states.shape[self.seq_len_dim] <= chunk:
            return self.forward_chunk(hidden_states)
        parts = hidden_states.split(chunk, dim=self.seq_len_dim)
        return torch.cat([self.forward_chunk(part) for part in parts], dim=self.seq_len_dim)

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear(self.decoder, hidden_states)


def _fusable_head(head: nn.Module | None) -> bool:
    """A head the blocked path may apply itself: none, or an unhooked LM head with a plain decoder."""
    if head is None:
        return True
    return (
        type(head) is ReformerOnlyLMHead
        and not (head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__)
        and plain_modules(head.decoder)
    )


def final_layer_norm(
    layer_norm: nn.Module, attn_output: torch.Tensor, hidden_states: torch.Tensor, head: nn.Module | None = None
) -> torch.Tensor:
    """``head(layer_norm(cat([attn_output, hidden_states], -1)))`` (``head`` None: the identity), ``[B, L, out]``."""
    blocked = (
        eager_fast_paths()
        and plain_modules(layer_norm)
        and _fusable_head(head)
        and not needs_grad(attn_output, hidden_states, *layer_norm.parameters())
        and attn_output.shape[1] > CPU_BLOCK_ROWS
    )
    if not blocked:
        out = layer_norm(torch.cat([attn_output, hidden_states], dim=-1))
        return out if head is None else head(out)
    width = 2 * attn_output.shape[-1]
    out = None
    for block in row_blocks(attn_output.shape[1], CPU_BLOCK_ROWS):
        rows = torch.cat([attn_output[:, block], hidden_states[:, block]], dim=-1)  # [B, n, 2H]
        rows = F.layer_norm(rows, (width,), layer_norm.weight, layer_norm.bias, layer_norm.eps)  # [B, n, 2H]
        if head is not None:
            decoder = head.decoder
            flat = rows.reshape(-1, width)  # [B*n, 2H]
            if onednn_applicable(flat, decoder.weight):
                rows = onednn_linear(flat, decoder.weight, decoder.bias).view(*rows.shape[:2], -1)  # [B, n, V]
            else:
                rows = F.linear(rows, decoder.weight, decoder.bias)  # [B, n, V]
        if out is None:
            out = rows.new_empty(attn_output.shape[0], attn_output.shape[1], rows.shape[-1])  # [B, L, 2H or V]
        out[:, block] = rows
    return out


__all__ = ["ReformerOnlyLMHead", "final_layer_norm"]
