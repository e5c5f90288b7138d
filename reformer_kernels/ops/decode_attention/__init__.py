"""Decode attention op: one new query per (row, head) over cached rows named by an index (see ``reference.py``)."""

from __future__ import annotations

import torch

from ...backend import use_triton
from ...validation import check_index_range
from .._dispatch import call
from . import torch_fast
from .reference import decode_attention_reference, window_index

__all__ = ["decode_attention", "decode_attention_reference"]

_INDEX_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------------------------------------
# registered operators (torch.library) of the PyTorch path
# ------------------------------------------------------------------------------------------------


def _decode_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor | None,
    shared_qk: bool,
    key_start: torch.Tensor | None,
    self_index: torch.Tensor | None,
) -> torch.Tensor:
    """``torch_fast.decode_attention_fast`` (inputs validated by ``decode_attention``)."""
    return torch_fast.decode_attention_fast(query, key, value, index, shared_qk, key_start, self_index)


_decode_op = torch.library.custom_op("reformer_kernels::decode_attention", _decode_impl, mutates_args=())


@_decode_op.register_fake
def _(query, key, value, index, shared_qk, key_start, self_index):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _decode_setup_context(ctx, inputs, output):
    pass


def _decode_backward(ctx, grad_out):
    raise RuntimeError(
        "decode_attention (the cached decoding step) has no gradient: it serves inference (generate, "
        "past_buckets_states); train with the full forward"
    )


_decode_op.register_autograd(_decode_backward, setup_context=_decode_setup_context)


def _check_rows(name: str, tensor, batch_size: int) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (batch_size,):
        raise ValueError(f"{name} must be a [batch] = ({batch_size},) tensor; got {getattr(tensor, 'shape', tensor)}")
    if tensor.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor; got {tensor.dtype}")


def _check_inputs(query, key, value, index, shared_qk, key_start, self_index) -> None:
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        raise ValueError(f"query must be a [batch, heads, head_dim] tensor; got {getattr(query, 'shape', type(query))}")
    if not query.is_floating_point():
        raise TypeError(f"query must be floating point; got {query.dtype}")
    batch_size, num_heads, head_dim = query.shape
    for name, tensor in (("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(
                f"{name} must be a [batch, heads, rows, head_dim] tensor; got {getattr(tensor, 'shape', type(tensor))}"
            )
        if (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (batch_size, num_heads, head_dim):
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} must be [batch, heads, rows, head_dim] with the query's "
                f"batch, heads and head_dim {(batch_size, num_heads, head_dim)}"
            )
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from query dtype {query.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if key.shape[2] == 0:
        raise ValueError("key and value hold no rows (shape[2] == 0)")
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dim() != 4 or tuple(index.shape[:2]) != (batch_size, num_heads):
            raise ValueError(
                f"index must be None or a [batch, heads, rounds, window] = ({batch_size}, {num_heads}, R, T) "
                f"tensor; got {getattr(index, 'shape', type(index))}"
            )
        if index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"index must be an int32 or int64 tensor; got {index.dtype}")
        if index.shape[2] == 0 or index.shape[3] == 0:
            raise ValueError(f"index needs at least one round and one window entry; got shape {tuple(index.shape)}")
    if not isinstance(shared_qk, bool):
        raise TypeError(f"shared_qk must be a bool; got {type(shared_qk).__name__}")
    _check_rows("key_start", key_start, batch_size)
    _check_rows("self_index", self_index, batch_size)
    for name, tensor in (("key", key), ("value", value), ("index", index), ("key_start", key_start)):
        if tensor is not None and tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}")
    if self_index is not None and self_index.device != query.device:
        raise ValueError(f"self_index is on {self_index.device} but query is on {query.device}")


def _triton_unsupported(query, key, value, index) -> str | None:
    from .triton import unsupported_reason

    return unsupported_reason(query, key, value, index)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor | None,
    shared_qk: bool,
    key_start: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention of ``query [B, H, D]`` to the rows ``index [B, H, R, T]`` of ``key``/``value [B, H, N, D]``.

    ``index=None``: ``key``/``value`` are the window themselves, every row in order (one round, ``T = N``; the
    fast path reads such a slice of the cache in place, the others index it with ``reference.window_index``).

    ``shared_qk``: LSH attention (keys are the unit-RMS rows of ``key``, the query-key projections) or local
    attention (keys scaled by ``1/sqrt(D)``). ``key_start [B]``: entries ``t < key_start[b]`` are masked;
    ``self_index [B]``: entries naming row ``self_index[b]`` get the self-mask value; rounds combine by their
    logsumexp. Returns ``[B, H, D]`` in the query's dtype; see ``reference.decode_attention_reference``. The
    ``torch`` backend runs ``torch_fast.decode_attention_fast`` (the same up to rounding, fewer launches).

    ``index`` may be an expanded view (stride 0). Its values must lie in ``[0, N)``. Every argument is validated
    (types, shapes, dtypes, devices; the index range: a ``ValueError`` for CPU tensors, a device-side assert on
    GPUs) unless ``validate=False``, for a caller that built every argument itself and checked what it was given
    (the decoding cache, six calls per step of the small preset); the Triton kernel never reads out of bounds
    either way.
    """
    if validate:
        _check_inputs(query, key, value, index, shared_qk, key_start, self_index)
        if index is not None:
            check_index_range(index, key.shape[2], "index (the rows of key/value)")
    if use_triton(query, key, value, unsupported=lambda: _triton_unsupported(query, key, value, index)):
        from .triton import decode_attention_triton

        if index is None:
            index = window_index(key)  # [B, H, 1, N]: the kernel reads rows through an index

        return decode_attention_triton(query, key, value, index, shared_qk, key_start, self_index)
    op = torch.ops.reformer_kernels.decode_attention
    return call(op, _decode_impl, query, key, value, index, shared_qk, key_start, self_index)
