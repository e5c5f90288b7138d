"""Chunked LSH / local attention op (see ``reference.py`` for the exact semantics)."""

from __future__ import annotations

import torch

from ...backend import use_triton
from .reference import chunked_attention_reference, look_adjacent, mask_values, normalize_keys

__all__ = [
    "chunked_attention",
    "chunked_attention_reference",
    "chunked_attention_with_grad",
    "look_adjacent",
    "mask_values",
    "normalize_keys",
]


def _check_inputs(
    query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, dropout_p
):
    for name, tensor in (("query", query), ("value", value), ("key", key)):
        if tensor is None and name == "key":
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(
                f"{name} must be a [batch, heads, length, head_dim] tensor; got "
                f"{getattr(tensor, 'shape', type(tensor))}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point; got {tensor.dtype}")
        if tensor.shape != query.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} differs from query shape {tuple(query.shape)}")
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from query dtype {query.dtype}")
    batch_size, num_heads, seq_len, _ = query.shape
    for name, number in (
        ("chunk_length", chunk_length),
        ("num_chunks_before", num_chunks_before),
        ("num_chunks_after", num_chunks_after),
    ):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"{name} must be a non-negative int; got {number!r}")
    if chunk_length < 1 or seq_len % chunk_length != 0:
        raise ValueError(f"chunk_length must be positive and divide the sequence length {seq_len}; got {chunk_length}")
    if sorted_idx is not None:
        if (
            sorted_idx.dim() != 3
            or sorted_idx.shape[:2] != (batch_size, num_heads)
            or sorted_idx.shape[2] % seq_len != 0
        ):
            raise ValueError(
                f"sorted_idx must have shape [batch, heads, rounds*length] with length {seq_len}; got "
                f"{tuple(sorted_idx.shape)}"
            )
        if sorted_idx.is_floating_point():
            raise TypeError(f"sorted_idx must be an integer tensor; got {sorted_idx.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, seq_len):
        raise ValueError(
            f"attention_mask must have shape [batch, length] = {(batch_size, seq_len)}; got "
            f"{tuple(attention_mask.shape)}"
        )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def _triton_supports(*args) -> bool:
    from .triton import is_supported

    return is_supported(*args)


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSH attention (``key=None``, shared QK) or local attention (``sorted_idx=None``).

    Returns ``(out [B, H, L, D], probs or None)``; see ``reference.chunked_attention_reference``.
    ``return_probs=True`` always runs the reference path (the kernels never build the score matrix);
    otherwise the ``torch`` backend runs ``torch_fast.chunked_attention_fast``.
    """
    _check_inputs(
        query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, dropout_p
    )
    if not return_probs and use_triton(
        query,
        key,
        value,
        supported=lambda: _triton_supports(
            query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, dropout_p
        ),
    ):
        from .triton import chunked_attention_triton

        return chunked_attention_triton(
            query,
            key,
            value,
            sorted_idx,
            chunk_length,
            num_chunks_before,
            num_chunks_after,
            causal,
            attention_mask,
            dropout_p,
        ), None
    if not return_probs:
        # the PyTorch path: same numerics as the reference, blocked and memory-lean (torch_fast.py)
        from .torch_fast import chunked_attention_fast

        return chunked_attention_fast(
            query,
            key,
            value,
            sorted_idx,
            chunk_length,
            num_chunks_before,
            num_chunks_after,
            causal,
            attention_mask,
            dropout_p,
        ), None
    return chunked_attention_reference(
        query,
        key,
        value,
        sorted_idx,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        attention_mask,
        dropout_p,
        return_probs,
    )


def chunked_attention_with_grad(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: torch.Tensor | None,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """``(out, (dq, dk, dv))``: the op's output (no dropout) and the gradients of its inputs for ``grad_out``
    (``dk`` None for shared QK), for a backward that recomputes the op (the reversible layers).

    On the ``torch`` backend with one hash round both come from one pass over the blocks
    (``torch_fast.chunked_attention_fast_with_grad``); otherwise forward, then autograd's backward.
    """
    _check_inputs(query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, 0.0)
    if not isinstance(grad_out, torch.Tensor) or grad_out.shape != query.shape:
        raise ValueError(
            f"grad_out must have the query's shape {tuple(query.shape)}; got "
            f"{getattr(grad_out, 'shape', type(grad_out))}"
        )
    one_round = sorted_idx is None or sorted_idx.shape[-1] == query.shape[2]
    on_triton = use_triton(
        query,
        key,
        value,
        supported=lambda: _triton_supports(
            query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, 0.0
        ),
    )
    if one_round and not on_triton:
        from .torch_fast import chunked_attention_fast_with_grad

        with torch.no_grad():
            return chunked_attention_fast_with_grad(
                query,
                key,
                value,
                sorted_idx,
                chunk_length,
                num_chunks_before,
                num_chunks_after,
                causal,
                attention_mask,
                grad_out,
            )
    inputs = [t.detach().requires_grad_() for t in (query, key, value) if t is not None]
    with torch.enable_grad():
        out = chunked_attention(
            inputs[0],
            None if key is None else inputs[1],
            inputs[-1],
            sorted_idx,
            chunk_length,
            num_chunks_before,
            num_chunks_after,
            causal,
            attention_mask,
        )[0]
        grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), (grads[0], None if key is None else grads[1], grads[-1])
