"""Axial position embeddings in PyTorch: the specification of the axial op.

With ``axial_pos_shape = (n_0, ..., n_{k-1})`` and factor tables ``W_a`` of shape ``[n_a, d_a]``,
position ``p < prod(n)`` is written in mixed radix, most significant axis first,
``p = ((i_0 * n_1 + i_1) * n_2 + i_2) ...``, and its embedding is ``concat_a W_a[i_a]``
(width ``sum(d_a) = hidden_size``). This is the row-major flattening transformers uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def axial_strides(axial_pos_shape: Sequence[int]) -> list[int]:
    """Mixed-radix place values: ``stride_a = prod(n_{a+1:})``."""
    strides, running = [], 1
    for size in reversed(axial_pos_shape):
        strides.append(running)
        running *= size
    return strides[::-1]


def axial_position_embedding_reference(position_ids: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Look up axial position embeddings.

    Args:
        position_ids: ``[B, L]`` int64 positions, each in ``[0, prod(n))``.
        weights: the factor tables, ``weights[a]`` of shape ``[n_a, d_a]``.

    Returns:
        ``[B, L, sum(d_a)]`` embeddings, differentiable in every table.
    """
    shape = [w.shape[0] for w in weights]
    parts = []
    for table, stride, size in zip(weights, axial_strides(shape), shape):
        parts.append(gather_rows(table, (position_ids // stride) % size))  # [B, L, d_a]
    return torch.cat(parts, dim=-1)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` as ``index_select``: same values, and its backward is an in-order ``index_add_``
    (deterministic) instead of advanced indexing's sorting ``index_put_``, which is an order of magnitude
    slower here (benchmarks/README.md)."""
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[-1])


def axial_position_row(weights: Sequence[torch.Tensor], position: int) -> torch.Tensor:
    """The embedding ``[sum(d_a)]`` of one position given as a host integer (``0 <= position < prod(n)``, checked by
    the caller): ``axial_position_embedding_reference`` of ``[[position]]``, the digits computed on the host and
    each table's row selected (a decoding step's position in three calls instead of a dozen)."""
    shape = [w.shape[0] for w in weights]
    rows = [table[(position // stride) % size] for table, stride, size in zip(weights, axial_strides(shape), shape)]
    return torch.cat(rows, dim=-1)  # [hidden]
