"""Axial position embedding ops.

- ``axial_position_embedding(position_ids, weights)``: ``[B, L, sum d_a]`` position embeddings.
- ``axial_position_row(weights, position)``: the embedding of one position given as a host integer.
- ``axial_word_embedding(input_ids, word_weight, axial_weights, position_ids=None, *, dropout_p=0.0)``:
  transformers' ``ReformerEmbeddings`` in one pass, ``dropout(E[input_ids]) + axial(position_ids)``
  with the dropout2d pattern on the axial term in training (see ``fused.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backend import use_triton
from .._dispatch import call
from . import fused
from .fused import (
    axial_dropout_mask,
    axial_word_embedding_reference,
    axial_word_embedding_torch,
    check_axial_inputs,
)
from .reference import axial_position_embedding_reference, axial_position_row, axial_strides

__all__ = [
    "axial_dropout_mask",
    "axial_position_embedding",
    "axial_position_embedding_reference",
    "axial_position_row",
    "axial_strides",
    "axial_word_embedding",
    "axial_word_embedding_reference",
]


# ------------------------------------------------------------------------------------------------
# registered operators (torch.library) of the PyTorch path; the dropout masks are inputs (drawn by the
# caller from torch's RNG in transformers' order), so the ops are deterministic
# ------------------------------------------------------------------------------------------------


def _fwd_impl(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: list[torch.Tensor],
    position_ids: torch.Tensor | None,
    word_mask: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``word_weight[input_ids] * word_mask + axial(position_ids) * axial_mask`` ``[B, L, hidden]``
    (``fused.axial_forward``); inputs validated by the callers."""
    return fused.axial_forward(input_ids, word_weight, tables, position_ids, word_mask, axial_mask)


_fwd_op = torch.library.custom_op("reformer_kernels::axial_word_embedding_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(input_ids, word_weight, tables, position_ids, word_mask, axial_mask):
    ref = input_ids if input_ids is not None else position_ids
    hidden = sum(w.shape[1] for w in tables)
    return tables[0].new_empty((*ref.shape, hidden))


@torch.library.custom_op("reformer_kernels::axial_word_embedding_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor,
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: list[torch.Tensor],
    position_ids: torch.Tensor | None,
    word_mask: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
) -> list[torch.Tensor]:
    """``[d word_weight (empty without input_ids), d tables...]`` (``fused.axial_backward``); the weights are read
    for their shapes only."""
    grad_word, grad_tables = fused.axial_backward(
        grad, input_ids, word_weight, tables, position_ids, word_mask, axial_mask
    )
    return [grad.new_empty(0) if grad_word is None else grad_word, *grad_tables]


@_bwd_op.register_fake
def _(grad, input_ids, word_weight, tables, position_ids, word_mask, axial_mask):
    grad_word = grad.new_empty(0) if input_ids is None else torch.empty_like(word_weight)
    return [grad_word, *(torch.empty_like(t) for t in tables)]


def _fwd_setup_context(ctx, inputs, output):
    input_ids, word_weight, tables, position_ids, word_mask, axial_mask = inputs
    ctx.num_tables = len(tables)
    ctx.save_for_backward(input_ids, word_weight, position_ids, word_mask, axial_mask, *tables)


def _fwd_backward(ctx, grad):
    input_ids, word_weight, position_ids, word_mask, axial_mask, *tables = ctx.saved_tensors
    grads = torch.ops.reformer_kernels.axial_word_embedding_bwd(
        grad, input_ids, word_weight, tables, position_ids, word_mask, axial_mask
    )
    grad_word = None if input_ids is None else grads[0]
    return None, grad_word, list(grads[1:]), None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def axial_position_embedding(position_ids: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, L, sum(d_a)]`` embeddings of ``position_ids`` (int32/int64) from factor tables ``[n_a, d_a]``."""
    # types, shapes, dtype/device agreement and 0 <= position_ids < prod(n) on both backends (the
    # reference would silently wrap out-of-range positions); no host sync on CUDA
    check_axial_inputs(None, None, weights, position_ids)
    weights = list(weights)
    if use_triton(position_ids, *weights, unsupported=lambda: _triton_unsupported(weights)):
        from .triton import axial_position_embedding_triton

        return axial_position_embedding_triton(position_ids, weights, check=False)
    # the registered op's position-only path is axial_position_embedding_reference
    return call(
        torch.ops.reformer_kernels.axial_word_embedding_fwd, _fwd_impl, None, None, weights, position_ids, None, None
    )


def _triton_unsupported(tables) -> str | None:
    from .triton import unsupported_reason

    return unsupported_reason(tables)


def axial_word_embedding(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Word + axial position embeddings, ``[B, L, hidden]``, as transformers' ``ReformerEmbeddings``.

    Args:
        input_ids: ``[B, L]`` token ids in ``[0, vocab_size)``, or ``None`` for position
            embeddings only (then ``word_weight`` is ``None`` and ``position_ids`` is required).
        word_weight: ``[vocab_size, hidden]`` word-embedding table, or ``None``.
        axial_weights: factor tables ``[n_a, d_a]`` (any number of axes), ``sum(d_a) = hidden``;
            transformers' ``AxialPositionEmbeddings.weights[a]`` reshaped to ``[n_a, d_a]``.
        position_ids: ``[B, L]`` positions in ``[0, prod(n))``; ``None`` means ``arange(L)`` per
            row. Pass ``None`` in training (``L == prod(n)``): the backward then uses the regular
            segmented reduction instead of sorting.
        dropout_p: ``config.hidden_dropout_prob`` in training, ``0.0`` in eval. Applies elementwise
            dropout to the word rows and transformers' dropout2d pattern (one multiplier per batch
            row and axis-1 index; per batch row and channel for a single axis) to the axial rows.

    The torch backend is bit-identical to transformers (same RNG draws, same order). The Triton
    backend draws the axial multipliers identically but the word dropout from Philox in-kernel
    (a seed drawn with ``torch.randint`` on the device, replayed in the backward; no mask stored).

    How ``ReformerEmbeddings.forward`` should call it (``tables = [w.reshape(n_a, d_a) for ...]``
    over transformers-shaped ``[1, .., n_a, .., 1, d_a]`` parameters; ``reshape`` is a view, so
    the gradients reach the parameters)::

        p = self.dropout if self.training else 0.0
        if inputs_embeds is None:
            # training: position_ids=None (the full grid, L == prod(axial_pos_shape)), as transformers
            # ignores position ids there; eval: None, or arange(start, start + L) expanded
            emb = axial_word_embedding(input_ids, self.word_embeddings.weight, tables, position_ids, dropout_p=p)
        else:
            emb = nn.functional.dropout(inputs_embeds, p, self.training) + axial_word_embedding(
                None, None, tables, position_ids, dropout_p=p)   # position_ids required here
    """
    check_axial_inputs(input_ids, word_weight, axial_weights, position_ids, dropout_p)
    axial_weights = list(axial_weights)
    if use_triton(
        input_ids, word_weight, position_ids, *axial_weights, unsupported=lambda: _triton_unsupported(axial_weights)
    ):
        from .triton import axial_word_embedding_triton

        return axial_word_embedding_triton(
            input_ids, word_weight, list(axial_weights), position_ids, dropout_p=dropout_p, check=False
        )
    return axial_word_embedding_torch(input_ids, word_weight, list(axial_weights), position_ids, dropout_p=dropout_p)
