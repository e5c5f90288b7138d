"""Fast PyTorch path of the decode op: the reference's arithmetic in fewer, cheaper launches.

A decoding step calls the op once or twice per layer on a tiny window (``R * T`` rows of ``D``), so on a CPU
its cost is the number of operator calls, not arithmetic (each call costs a few microseconds of dispatch). The
reference gathers keys and values with an index expanded to ``[B, H, R*T, D]`` (``gather``: ~7x slower than
``index_select`` of whole rows on this CPU) and normalises every key element before the product. Here:

- window rows are read with one ``index_select`` of whole head rows from a 2-D ``[rows, D]`` view of the
  buffer (any layout whose batch / head / row strides are multiples of ``D`` with unit stride along ``D``: the
  cache's ``[B, H, capacity, D]`` buffers and the model's ``[B, L, H, D]`` views), falling back to ``gather``
  otherwise; with ``index=None`` (the window passed itself, a slice of the cache) they are not copied at all;
- the shared-QK key norm is applied to the scores: ``q . (x * c / sqrt(D)) = ((q . x) / sqrt(D)) * c`` with
  ``c = rsqrt(mean(x^2) + 1e-6)`` (equal up to rounding), one product per row instead of a scaled copy of
  every key, and ``1/sqrt(D)`` applied by the score product itself (``baddbmm``'s ``alpha``, local attention
  too);
- products are batched matrix products, masks ``masked_fill_`` in place; one round takes ``softmax`` (rows whose
  entries are all masked set to transformers' probabilities of 1), several rounds ``exp(s - lse)`` and their
  logsumexp weights.

Same semantics as ``reference.decode_attention_reference`` (masks, fully masked rows, round combination), fp32
arithmetic; results equal it up to rounding.
"""

from __future__ import annotations

import math

import torch

from ..chunked_attention.reference import mask_values

NORM_EPS = 1e-6
# the fp32 replacement scores of masked entries and of the query's own row
MASK_VALUE, SELF_MASK_VALUE = mask_values(torch.float32)


# Small constant tensors a decoding step needs at every call, built once per key (shape, strides, device): a few
# hundred bytes each; a new cache capacity or batch size adds one, and past _MAX_MEMO entries a memo starts over.
_MAX_MEMO = 64
# per (batch, heads, row strides, device): the number of each (row, head) pair's first row in a [rows, D] view
_ROW_BASES: dict[tuple[int, int, int, int, torch.device], torch.Tensor] = {}
# per (window, device): the entry numbers 0 .. T-1 that the masks compare with
_ENTRIES: dict[tuple[int, torch.device], torch.Tensor] = {}
# per (dtype, device): a [1, 1, 1] tensor for baddbmm's ignored ``input`` (beta=0)
_NO_INPUT: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _memoized(memo: dict, key: tuple, build) -> torch.Tensor:
    """``memo[key]``, built by ``build()`` the first time (an ordinary tensor even under inference mode, usable
    outside it too)."""
    tensor = memo.get(key)
    if tensor is None:
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        with torch.inference_mode(False):
            tensor = memo[key] = build()
    return tensor


def _row_bases(batch_size: int, num_heads: int, batch_rows: int, head_rows: int, device) -> torch.Tensor:
    """``b * batch_rows + h * head_rows`` as ``[B, H, 1, 1]`` (int64), built once per shape, strides and device."""

    def build() -> torch.Tensor:
        batch = torch.arange(0, batch_size * batch_rows, batch_rows, device=device).view(-1, 1, 1, 1)
        heads = torch.arange(0, num_heads * head_rows, head_rows, device=device).view(1, -1, 1, 1)
        return batch + heads  # [B, H, 1, 1]

    return _memoized(_ROW_BASES, (batch_size, num_heads, batch_rows, head_rows, device), build)


def _row_numbers(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """Row numbers ``[B*H*R*T]`` of the window rows in a ``[rows, D]`` view of ``tensor [B, H, N, D]``'s memory,
    or None when its layout has no such view (see the module docstring)."""
    batch_size, num_heads, _, head_dim = tensor.shape
    stride_b, stride_h, stride_n, stride_d = tensor.stride()
    if stride_d != 1 or stride_b % head_dim or stride_h % head_dim or stride_n % head_dim:
        return None
    bases = _row_bases(batch_size, num_heads, stride_b // head_dim, stride_h // head_dim, index.device)
    rows = index if stride_n == head_dim else index * (stride_n // head_dim)  # [B, H, R, T]
    return (rows + bases).view(-1)  # [B*H*R*T]


def _shared_window(index: torch.Tensor) -> torch.Tensor | None:
    """The rows ``[R*T]`` of a window that every (row, head) shares (``index`` expanded over them, as a local step's
    is), else None."""
    if (index.shape[0] == 1 or index.stride(0) == 0) and (index.shape[1] == 1 or index.stride(1) == 0):
        return index[0, 0].reshape(-1)
    return None


def _window_rows(tensor: torch.Tensor, index: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index [B, H, R, T]`` of ``tensor [B, H, N, D]`` → ``[B*H, R*T, D]``."""
    batch_size, num_heads, num_rows, head_dim = tensor.shape
    if rows is None:
        gather_index = index.long().reshape(batch_size, num_heads, -1, 1).expand(-1, -1, -1, head_dim)
        return tensor.gather(2, gather_index).view(batch_size * num_heads, -1, head_dim)
    stride_b, stride_h, stride_n, _ = tensor.stride()
    extent = ((batch_size - 1) * stride_b + (num_heads - 1) * stride_h + (num_rows - 1) * stride_n) // head_dim + 1
    flat = tensor.as_strided((extent, head_dim), (head_dim, 1))  # [rows, D] view of the same memory
    return flat.index_select(0, rows).view(batch_size * num_heads, -1, head_dim)


def _entries(window: int, device) -> torch.Tensor:
    """``0 .. T-1`` (``[T]``, int64), built once per window and device."""
    return _memoized(_ENTRIES, (window, device), lambda: torch.arange(window, device=device))


def _scaled_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (query @ keys^T)``: ``[B*H, 1, D] x [B*H, R*T, D]`` → ``[B*H, 1, R*T]`` in one call (``baddbmm``
    with ``beta=0``: its ``input`` is ignored, NaN or not). One ``[1, D] x [D, R*T]`` product per (row, head): MKL's
    batched GEMM is ~3x slower the other way round (``[R*T, D] x [D, 1]``) at these sizes."""
    dtype, device = query.dtype, query.device
    no_input = _memoized(_NO_INPUT, (dtype, device), lambda: torch.zeros(1, 1, 1, dtype=dtype, device=device))
    return torch.baddbmm(no_input, query, keys.transpose(1, 2), beta=0.0, alpha=scale)


def decode_attention_fast(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor | None,
    shared_qk: bool,
    key_start: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract and result (up to rounding) as ``reference.decode_attention_reference``."""
    batch_size, num_heads, head_dim = query.shape
    num_rounds, window = (1, key.shape[2]) if index is None else index.shape[2:]
    dtype = query.dtype
    fp32 = dtype == torch.float32
    shared_rows = None if index is None else _shared_window(index)  # [R*T] or None
    if index is None:
        # the window itself ([B, H, T, D], e.g. a slice of the cache): read in place (a view when B and H merge)
        keys = key.reshape(batch_size * num_heads, window, head_dim)  # [B*H, T, D]
        values = value.reshape(batch_size * num_heads, window, head_dim)  # [B*H, T, D]
    elif shared_rows is not None:
        # one window for every (row, head): read it along the row dim of the buffers
        keys = key.index_select(2, shared_rows).view(batch_size * num_heads, -1, head_dim)  # [B*H, R*T, D]
        values = value.index_select(2, shared_rows).view(batch_size * num_heads, -1, head_dim)  # [B*H, R*T, D]
    else:
        key_rows = _row_numbers(key, index)  # [B*H*R*T] or None
        same_layout = key_rows is not None and value.stride() == key.stride()
        value_rows = key_rows if same_layout else _row_numbers(value, index)  # [B*H*R*T] or None
        keys = _window_rows(key, index, key_rows)  # [B*H, R*T, D]
        values = _window_rows(value, index, value_rows)  # [B*H, R*T, D]
    if not fp32:
        keys, values, query = keys.float(), values.float(), query.float()
    query = query.reshape(batch_size * num_heads, 1, head_dim)  # [B*H, 1, D]
    scores = _scaled_scores(query, keys, 1.0 / math.sqrt(head_dim))  # [B*H, 1, R*T]
    if shared_qk:
        # the key norm of each row, applied to its score
        scores.mul_(keys.square().mean(-1, keepdim=True).add_(NORM_EPS).rsqrt_().transpose(1, 2))
    scores = scores.view(batch_size, num_heads, num_rounds, window)  # [B, H, R, T]
    if key_start is not None:
        masked = _entries(window, query.device) < key_start.view(batch_size, 1, 1, 1)  # [B, 1, 1, T]
        scores.masked_fill_(masked, MASK_VALUE)
    if self_index is not None:
        entry_rows = _entries(window, query.device) if index is None else index  # [T] or [B, H, R, T]
        scores.masked_fill_(entry_rows == self_index.view(batch_size, 1, 1, 1), SELF_MASK_VALUE)
    rows = batch_size * num_heads * num_rounds
    if num_rounds == 1:
        # one round needs no logsumexp: softmax is exp(s - lse) up to rounding, except on a row whose entries are
        # all masked, where lse = logsumexp([-1e9] * T) rounds to -1e9 in fp32 and every probability is exp(0) = 1
        # (transformers' arithmetic, kept), not 1 / T
        probs = torch.softmax(scores, dim=-1)  # [B, H, 1, T]
        if key_start is not None:
            probs.masked_fill_(scores.amax(-1, keepdim=True) == MASK_VALUE, 1.0)
        out = torch.bmm(probs.view(rows, 1, window), values)  # [B*H, 1, D]
        out = out.view(batch_size, num_heads, head_dim)  # [B, H, D]
        return out if fp32 else out.to(dtype)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, R, 1]
    probs = scores.sub_(lse).exp_()  # [B, H, R, T]
    out = torch.bmm(probs.view(rows, 1, window), values.view(rows, window, head_dim))  # [B*H*R, 1, D]
    # rounds weighted by their share of the total softmax mass
    weights = torch.softmax(lse, dim=2)  # [B, H, R, 1]
    out = out.view(batch_size, num_heads, num_rounds, head_dim)  # [B, H, R, D]
    return (out * weights).sum(2).to(dtype)  # [B, H, D]
