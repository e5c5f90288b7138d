"""Word embedding + axial position embedding (+ training dropout) in PyTorch: the specification of
the fused op, and the dropout-mask helper shared by both backends.

transformers' ``ReformerEmbeddings`` computes, with ``p = config.hidden_dropout_prob`` in training::

    embeddings = dropout(word_embeddings(input_ids), p) + axial(position_ids)

where the axial term in training is the full axial grid (``L == prod(axial_pos_shape)``, the
position ids are ignored) passed through ``dropout2d`` as follows: the broadcast table
``[B, n_0, n_1, ..., sum(d)]`` is transposed to ``[B, n_1, n_0, n_2, ..., sum(d)]`` and
``dropout2d`` (``torch.nn.functional.feature_dropout``) draws ONE multiplier per
``(batch row, dim-1 index)``, i.e. per ``(b, i_1)`` where ``i_1`` is the index along axis 1 of
the axial shape, and multiplies every position with that axis-1 index (all ``i_0, i_2, ...``) and
every hidden channel by it. The multipliers are ``0`` (probability ``p``) or ``1 / (1 - p)``.
With a one-axis shape the transposed tensor is ``[B, sum(d), n_0]`` and the multiplier is per
``(b, hidden channel)`` instead. ``axial_dropout_mask`` draws exactly that ``[B, C]`` tensor with
the same random-number consumption as ``feature_dropout`` (same shape, dtype, ``bernoulli_``
call), so on the PyTorch path the masks are bit-identical to transformers' under the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...validation import check_index_dtype, check_index_range, check_probability, check_tensor
from .._dispatch import call
from .reference import axial_position_embedding_reference, axial_strides, gather_rows

# positions are decomposed in int32 inside the kernels
MAX_AXIAL_POSITIONS = 2**31 - 1


def _check_ids(name: str, ids, upper: int, what: str) -> None:
    """An int32/int64 ``[batch, length]`` tensor with ``0 <= ids < upper`` (``validation.check_index_range``:
    a ``ValueError`` on CPU, an asynchronous device assert on CUDA, no host sync)."""
    check_tensor(ids, name, dim=2, shape_doc="[batch, length]")
    check_index_dtype(ids, name)
    check_index_range(ids, upper, f"{name} ({what})")


def check_axial_inputs(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None,
    dropout_p: float = 0.0,
) -> tuple[int, int]:
    """Validate the fused op's arguments (both backends); returns ``(batch, length)``.

    The op's one validation, run for every backend: raises ``TypeError``/``ValueError`` naming the
    argument. Ids are int32 or int64; their ranges are checked by ``validation.check_index_range`` (on
    the host for CPU tensors, with an asynchronous device assert, no synchronisation, for CUDA tensors).
    """
    if isinstance(axial_weights, torch.Tensor) or not hasattr(axial_weights, "__len__") or len(axial_weights) == 0:
        raise ValueError("axial_weights must be a non-empty list of 2-D [axis_size, axis_dim] tables")
    axial_weights = list(axial_weights)
    first = axial_weights[0]
    for a, w in enumerate(axial_weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"axial_weights[{a}] must be a torch.Tensor; got {type(w).__name__}")
        if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(
                f"axial_weights[{a}] must be a non-empty 2-D [axis_size, axis_dim] table; got {tuple(w.shape)}"
            )
        if not w.is_floating_point():
            raise TypeError(f"axial_weights[{a}] must be a floating-point tensor; got {w.dtype}")
        if w.dtype != first.dtype or w.device != first.device:
            raise TypeError(
                f"axial_weights[{a}] is {w.dtype} on {w.device} but axial_weights[0] is {first.dtype} on {first.device}"
            )
    shape = [int(w.shape[0]) for w in axial_weights]
    hidden = sum(int(w.shape[1]) for w in axial_weights)
    total = 1
    for size in shape:
        total *= size
    if total > MAX_AXIAL_POSITIONS:
        raise ValueError(f"axial_weights: prod(axial_pos_shape) = {total} exceeds {MAX_AXIAL_POSITIONS}")
    check_probability(dropout_p, "dropout_p", allow_one=True)
    if (input_ids is None) != (word_weight is None):
        raise ValueError("input_ids and word_weight must be given together (or both None for position embeddings only)")
    if input_ids is None and position_ids is None:
        raise ValueError("position_ids is required when input_ids is None")
    if word_weight is not None:
        if not isinstance(word_weight, torch.Tensor):
            raise TypeError(f"word_weight must be a torch.Tensor; got {type(word_weight).__name__}")
        if word_weight.dim() != 2 or word_weight.shape[1] != hidden or word_weight.shape[0] < 1:
            raise ValueError(
                f"word_weight must be [vocab_size, {hidden}] (hidden = sum of axial dims); got "
                f"{tuple(word_weight.shape)}"
            )
        if word_weight.dtype != first.dtype or word_weight.device != first.device:
            raise TypeError(
                f"word_weight is {word_weight.dtype} on {word_weight.device} but axial_weights are "
                f"{first.dtype} on {first.device}"
            )
    for name, ids in (("input_ids", input_ids), ("position_ids", position_ids)):
        if ids is not None and isinstance(ids, torch.Tensor) and ids.device != first.device:
            raise ValueError(f"{name} is on {ids.device} but the tables are on {first.device}")
    if position_ids is not None:
        _check_ids("position_ids", position_ids, total, f"prod(axial_pos_shape) = {total}")
    if input_ids is not None:
        _check_ids("input_ids", input_ids, int(word_weight.shape[0]), "vocab_size")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
    batch, length = (input_ids if input_ids is not None else position_ids).shape
    if position_ids is None and length > total:
        raise ValueError(
            f"input_ids length {length} exceeds prod(axial_pos_shape) = {total}; pass position_ids or pad the axial "
            "shape"
        )
    return int(batch), int(length)


def axial_dropout_channels(axial_pos_shape: Sequence[int], hidden_size: int) -> int:
    """Number of dropout2d channels per batch row: ``n_1`` (two or more axes) or ``hidden_size`` (one axis)."""
    return int(axial_pos_shape[1]) if len(axial_pos_shape) >= 2 else int(hidden_size)


def axial_dropout_mask(
    batch_size: int,
    axial_pos_shape: Sequence[int],
    hidden_size: int,
    p: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The transformers dropout2d multipliers for axial position embeddings, ``[B, C]`` or ``None`` if ``p == 0``.

    ``C = axial_pos_shape[1]`` for two or more axes (one multiplier per batch row and axis-1
    index), ``C = hidden_size`` for a single axis (one per batch row and hidden channel). Values
    are ``0`` or ``1 / (1 - p)`` in ``dtype`` (the table dtype, as ``feature_dropout`` uses).
    """
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout p must be a float in [0, 1]; got {p!r}")
    if p == 0:
        return None
    channels = axial_dropout_channels(axial_pos_shape, hidden_size)
    if p == 1:
        return torch.zeros((batch_size, channels), dtype=dtype, device=device)
    # Same call sequence as ATen's feature dropout: empty [B, C] noise, bernoulli_(1 - p), div_(1 - p).
    noise = torch.empty((batch_size, channels), dtype=dtype, device=device)
    noise.bernoulli_(1 - p, generator=generator)
    return noise.div_(1 - p)


def expand_axial_dropout_mask(
    mask: torch.Tensor, position_ids: torch.Tensor, axial_pos_shape: Sequence[int], hidden_size: int
) -> torch.Tensor:
    """The ``[B, C]`` mask as per-token, per-channel multipliers broadcastable to ``[B, L, hidden]``."""
    if len(axial_pos_shape) >= 2:
        stride_1 = axial_strides(axial_pos_shape)[1]
        i_1 = (position_ids // stride_1) % axial_pos_shape[1]  # [B, L]
        return torch.gather(mask, 1, i_1).unsqueeze(-1)  # [B, L, 1]
    return mask.unsqueeze(1).expand(-1, position_ids.shape[1], hidden_size)  # [B, L, hidden]


def axial_word_embedding_reference(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None = None,
    *,
    axial_mask: torch.Tensor | None = None,
    word_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``word_weight[input_ids] * word_mask + axial(position_ids) * axial_mask``, ``[B, L, hidden]``.

    Args:
        input_ids: ``[B, L]`` token ids, or ``None`` (position embeddings only; then
            ``word_weight`` must be ``None`` and ``position_ids`` given).
        word_weight: ``[V, hidden]`` word-embedding table or ``None``.
        axial_weights: factor tables ``[n_a, d_a]``, ``sum(d_a) = hidden``.
        position_ids: ``[B, L]`` positions; ``None`` means ``arange(L)`` in every row.
        axial_mask: ``[B, C]`` dropout2d multipliers from :func:`axial_dropout_mask`, or ``None``.
        word_mask: multipliers broadcastable to ``[B, L, hidden]`` (elementwise dropout), or ``None``.
    """
    shape = [w.shape[0] for w in axial_weights]
    hidden = sum(w.shape[1] for w in axial_weights)
    if position_ids is None:
        batch, length = input_ids.shape
        device = input_ids.device
        position_ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    pos = axial_position_embedding_reference(position_ids, axial_weights)  # [B, L, hidden]
    if axial_mask is not None:
        pos = pos * expand_axial_dropout_mask(axial_mask, position_ids, shape, hidden)
    if input_ids is None:
        return pos
    word = word_weight[input_ids]  # [B, L, hidden]
    if word_mask is not None:
        word = word * word_mask
    return word + pos


def axial_word_embedding_torch(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The PyTorch path of the fused op, drawing dropout from torch's RNG in transformers' order.

    transformers draws the word dropout first (``nn.functional.dropout`` on the word rows), then
    the axial dropout2d noise. The same draws happen here, as explicit masks: the word multipliers are
    ``dropout(ones)`` (the same ``bernoulli_`` call on the same shape, so the same bits, and
    ``x * (1 * noise) == x * noise``), then ``axial_dropout_mask``; the registered op
    ``reformer_kernels::axial_word_embedding_fwd`` applies them. Bit-identical to ``ReformerEmbeddings`` in
    training under the same seed (CPU).
    """
    tables = list(axial_weights)
    word_mask = axial_mask = None
    if dropout_p > 0:
        ref = input_ids if input_ids is not None else position_ids
        hidden = sum(w.shape[1] for w in tables)
        if input_ids is not None:
            ones = word_weight.new_ones((*input_ids.shape, hidden))
            word_mask = torch.nn.functional.dropout(ones, dropout_p, training=True)  # [B, L, hidden]
        shape = [w.shape[0] for w in tables]
        axial_mask = axial_dropout_mask(
            ref.shape[0], shape, hidden, dropout_p, dtype=tables[0].dtype, device=ref.device
        )  # [B, C]
    from . import _fwd_impl  # the package registers the operator

    return call(
        torch.ops.reformer_kernels.axial_word_embedding_fwd,
        _fwd_impl,
        input_ids,
        word_weight,
        tables,
        position_ids,
        word_mask,
        axial_mask,
    )


def axial_forward(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None,
    word_mask: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``word_weight[input_ids] * word_mask + axial(position_ids) * axial_mask`` ``[B, L, hidden]`` (no autograd:
    ``axial_backward`` is its backward). ``position_ids`` None: ``0..L-1`` in every row."""
    shape = [w.shape[0] for w in tables]
    hidden = sum(w.shape[1] for w in tables)
    ref = input_ids if input_ids is not None else position_ids
    whole_grid = position_ids is None and ref.shape[1] == math.prod(shape)
    if whole_grid and input_ids is not None and word_mask is None and axial_mask is None:
        return _word_rows_plus_grid(input_ids, word_weight, tables)
    if position_ids is None:
        position_ids = torch.arange(ref.shape[1], device=ref.device).unsqueeze(0).expand(ref.shape)
    pos = axial_position_embedding_reference(position_ids, tables)  # [B, L, hidden]
    if axial_mask is not None:
        pos = pos * expand_axial_dropout_mask(axial_mask, position_ids, shape, hidden)
    if input_ids is None:
        return pos
    word = gather_rows(word_weight, input_ids)  # [B, L, hidden]
    if word_mask is not None:
        word = word * word_mask
    return word + pos


def axial_backward(
    grad: torch.Tensor,
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None,
    word_mask: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``(d word_weight or None, [d table])`` of ``axial_forward`` for ``grad [B, L, hidden]``: the operations
    autograd runs for it (in-order ``index_add_`` into zeros, deterministic; sums over the grid's broadcast axes)."""
    shape = [w.shape[0] for w in tables]
    hidden = grad.shape[-1]
    ref = input_ids if input_ids is not None else position_ids
    grad_word = None
    if input_ids is not None:
        grad_rows = grad if word_mask is None else grad * word_mask  # [B, L, hidden]
        grad_word = torch.zeros_like(word_weight).index_add_(0, input_ids.reshape(-1), grad_rows.reshape(-1, hidden))
    whole_grid = position_ids is None and ref.shape[1] == math.prod(shape)
    grad_tables = []
    if whole_grid and input_ids is not None and word_mask is None and axial_mask is None:
        # the broadcast adds of _word_rows_plus_grid: each table's gradient sums the grid over the other axes
        grid = grad.view(grad.shape[0], *shape, hidden)  # [B, n_0, ..., n_{k-1}, hidden]
        offset = 0
        for axis, table in enumerate(tables):
            dims = [0] + [1 + a for a in range(len(shape)) if a != axis]
            # a contiguous copy first, as autograd's CopySlices hands it over (the same summation order)
            part = grid[..., offset : offset + table.shape[1]].contiguous()  # [B, n_0, ..., d_a]
            part = part.sum(dims, keepdim=True)  # [1, .., n_a, .., 1, d_a]
            grad_tables.append(part.view(table.shape))
            offset += table.shape[1]
        return grad_word, grad_tables
    if position_ids is None:
        position_ids = torch.arange(ref.shape[1], device=ref.device).unsqueeze(0).expand(ref.shape)
    if axial_mask is not None:
        grad = grad * expand_axial_dropout_mask(axial_mask, position_ids, shape, hidden)
    offset = 0
    for table, stride, size in zip(tables, axial_strides(shape), shape):
        ids = ((position_ids // stride) % size).reshape(-1)  # [B*L]
        part = grad[..., offset : offset + table.shape[1]].reshape(-1, table.shape[1])  # [B*L, d_a]
        grad_tables.append(torch.zeros_like(table).index_add_(0, ids, part))
        offset += table.shape[1]
    return grad_word, grad_tables


def _word_rows_plus_grid(
    input_ids: torch.Tensor, word_weight: torch.Tensor, axial_weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """No dropout, the whole grid (``L == prod(n)``, positions ``0..L-1``): the word rows with each axis' table
    added in place by broadcasting over the grid view ``[B, n_0, .., n_{k-1}, hidden]``. The same fp32 additions
    as ``word + cat(...)``, without the gathered and concatenated ``[B, L, hidden]`` position tensors (three
    fresh ``[B, L, hidden]`` tensors become one: at L=65536 each is a 64 MB mmap, page-faulted in on every call)."""
    shape = [w.shape[0] for w in axial_weights]
    out = gather_rows(word_weight, input_ids)  # [B, L, hidden]
    grid = out.view(out.shape[0], *shape, out.shape[-1])  # [B, n_0, ..., n_{k-1}, hidden]
    offset = 0
    for axis, table in enumerate(axial_weights):
        broadcast = [1] * len(shape) + [table.shape[1]]
        broadcast[axis] = shape[axis]
        grid[..., offset : offset + table.shape[1]] += table.view(broadcast)  # [n_0 or 1, ..., d_a]
        offset += table.shape[1]
    return out
