"""Chunked LSH / local attention op (see ``reference.py`` for the exact semantics)."""

from __future__ import annotations

import torch

from ...backend import use_triton
from ...validation import (
    check_bool,
    check_float_tensor,
    check_index_dtype,
    check_int,
    check_mask,
    check_permutation,
    check_probability,
    check_same_device,
    check_tensor,
)
from . import torch_fast
from .reference import chunked_attention_reference, look_adjacent, mask_values, normalize_keys

__all__ = [
    "check_chunked_attention_inputs",
    "chunked_attention",
    "chunked_attention_reference",
    "chunked_attention_with_grad",
    "look_adjacent",
    "mask_values",
    "normalize_keys",
]


# ------------------------------------------------------------------------------------------------
# registered operators (torch.library) of the PyTorch path: torch.compile traces each as one node (its
# blocked internals, as_strided windows and workspace buffers stay inside), autograd runs the backward op
# ------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch_fast computes in fp32, fp64 stays fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory layout ``torch_fast`` gives its results: the input itself when it is contiguous
    or a ``[B, L, H, D]`` buffer seen as ``[B, H, L, D]``, else its contiguous copy (``torch_fast._Rows``)."""
    if tensor.is_contiguous() or tensor.transpose(1, 2).is_contiguous():
        return tensor
    return tensor.contiguous()


def _grads_like(query, key, value):
    dq = torch.empty_like(_layout_of(query))
    dk = query.new_empty(0) if key is None else torch.empty_like(_layout_of(key))
    return dq, dk, torch.empty_like(_layout_of(value))


def _fwd_impl(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, scale)``: the output in the compute dtype and the query's layout, and the backward's per-row scale
    ``[B*H, R*L]`` (``torch_fast.attention_forward``). ``seed``: the dropout seed, an int64 ``[1]`` CPU tensor
    (None without dropout). Inputs are validated by ``chunked_attention``."""
    pb = torch_fast.problem(
        query,
        key,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        dropout_p,
        seed,
    )
    return torch_fast.attention_forward(query, key, value, pb)


_fwd_op = torch.library.custom_op("reformer_kernels::chunked_attention_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(query, key, value, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed):
    batch_size, num_heads, seq_len, _ = query.shape
    dtype = _compute_dtype(query.dtype)
    num_rows = seq_len if sorted_idx is None else sorted_idx.shape[-1]
    out = torch.empty_like(_layout_of(query), dtype=dtype)
    return out, query.new_empty((batch_size * num_heads, num_rows), dtype=dtype)


@torch.library.custom_op("reformer_kernels::chunked_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    out: torch.Tensor,
    scale: torch.Tensor,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``chunked_attention_fwd`` (``dk`` empty for shared QK: folded into ``dq``); the
    probabilities are recomputed, the dropout replayed from ``seed``."""
    pb = torch_fast.problem(
        query,
        key,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        dropout_p,
        seed,
    )
    dq, dk, dv = torch_fast.attention_backward(grad_out, query, key, value, out, scale, pb)
    return dq, (query.new_empty(0) if dk is None else dk), dv


@_bwd_op.register_fake
def _(grad_out, query, key, value, sorted_idx, attention_mask, out, scale, *args):
    return _grads_like(query, key, value)


def _fwd_setup_context(ctx, inputs, output):
    query, key, value, sorted_idx, attention_mask = inputs[:5]
    ctx.args = inputs[5:10]  # chunk_length, num_chunks_before, num_chunks_after, causal, dropout_p
    out, scale = output
    ctx.mark_non_differentiable(scale)
    # no zero tensors for the gradients of the non-differentiable outputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, value, sorted_idx, attention_mask, out, scale, inputs[10])


def _fwd_backward(ctx, grad_out, grad_scale):
    if grad_out is None:  # the output's gradient is undefined (grads are not materialised): so are the inputs'
        return (None,) * 11
    query, key, value, sorted_idx, attention_mask, out, scale, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.reformer_kernels.chunked_attention_bwd(
        grad_out, query, key, value, sorted_idx, attention_mask, out, scale, *ctx.args, seed
    )
    return dq, (None if key is None else dk), dv, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("reformer_kernels::chunked_attention_with_grad", mutates_args=())
def _with_grad_op(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    grad_out: torch.Tensor,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, dq, dk, dv)`` for one hash round without dropout in one pass over the blocks
    (``torch_fast.chunked_attention_fast_with_grad``; ``dk`` empty for shared QK). It computes gradients: it has
    no autograd formula of its own."""
    with torch.no_grad():
        out, (dq, dk, dv) = torch_fast.chunked_attention_fast_with_grad(
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
    return out, dq, (query.new_empty(0) if dk is None else dk), dv


@_with_grad_op.register_fake
def _(query, key, value, sorted_idx, attention_mask, grad_out, *args):
    return (torch.empty_like(_layout_of(query)), *_grads_like(query, key, value))


def check_chunked_attention_inputs(
    query,
    key,
    value,
    sorted_idx,
    chunk_length,
    num_chunks_before,
    num_chunks_after,
    causal,
    attention_mask=None,
    dropout_p=0.0,
    return_probs=False,
) -> None:
    """The op's validation, the same for every backend (so a bad call gets the same error everywhere).

    ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, size, device or value,
    each naming the argument. ``sorted_idx`` must be an int32/int64 ``[B, H, R * L]`` tensor (``R >= 1``)
    whose every (batch, head) row is a permutation of ``[0, R * L)``, as ``bucket_sort`` returns it:
    checked by ``validation.check_permutation`` (a ``ValueError`` on CPU; an asynchronous device assert
    on CUDA, no host sync). The kernels read rows through it and would otherwise read out of bounds
    or leave output rows unwritten.
    """
    check_tensor(query, "query", dim=4, shape_doc="[batch, heads, length, head_dim]")
    check_float_tensor(query, "query")
    for name, tensor in (("key", key), ("value", value)):
        if tensor is None and name == "key":
            continue
        check_tensor(tensor, name, dim=4, shape_doc="[batch, heads, length, head_dim]")
        check_float_tensor(tensor, name)
        if tensor.shape != query.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} differs from query shape {tuple(query.shape)}")
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from query dtype {query.dtype}")
        check_same_device(tensor, name, query.device)
    batch_size, num_heads, seq_len, head_dim = query.shape
    if head_dim < 1:
        raise ValueError(f"query head_dim (query.shape[-1]) must be >= 1; got {head_dim}")
    chunk_length = check_int(chunk_length, "chunk_length", minimum=1)
    check_int(num_chunks_before, "num_chunks_before", minimum=0)
    check_int(num_chunks_after, "num_chunks_after", minimum=0)
    if seq_len % chunk_length != 0:
        raise ValueError(f"chunk_length must divide the sequence length {seq_len}; got {chunk_length}")
    if sorted_idx is not None:
        check_tensor(sorted_idx, "sorted_idx", dim=3, shape_doc="[batch, heads, rounds*length]")
        check_index_dtype(sorted_idx, "sorted_idx")
        num_rows = sorted_idx.shape[2]
        rounds_ok = num_rows == 0 if seq_len == 0 else num_rows >= seq_len and num_rows % seq_len == 0
        if tuple(sorted_idx.shape[:2]) != (batch_size, num_heads) or not rounds_ok:
            raise ValueError(
                "sorted_idx must have shape [batch, heads, rounds*length] = "
                f"[{batch_size}, {num_heads}, R * {seq_len}] with R >= 1; got {tuple(sorted_idx.shape)}"
            )
        check_same_device(sorted_idx, "sorted_idx", query.device)
    check_bool(causal, "causal")
    check_mask(attention_mask, "attention_mask", (batch_size, seq_len), query.device)
    check_probability(dropout_p, "dropout_p")
    check_bool(return_probs, "return_probs")
    if sorted_idx is not None:
        # reads values: last, after every cheap check
        check_permutation(sorted_idx, "sorted_idx", " (as bucket_sort returns it)")


def _triton_unsupported(query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p):
    from .triton import unsupported_reason

    return unsupported_reason(query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p)


def _empty_result(query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, return_probs):
    """B, H or L is 0: an empty ``[B, H, L, D]`` output (on the autograd graph of every input, so that
    gradients are zeros of the right shapes) and, if asked for, empty probabilities."""
    batch_size, num_heads, seq_len, _ = query.shape
    # every input is empty, so these sums are 0 and the output is an empty tensor of value's shape
    out = value + 0 * query.sum() + (0 if key is None else 0 * key.sum())
    probs = None
    if return_probs:
        num_rows = seq_len if sorted_idx is None else sorted_idx.shape[-1]
        window = chunk_length * (num_chunks_before + 1 + num_chunks_after)
        probs = query.new_zeros((batch_size, num_heads, num_rows // chunk_length, chunk_length, window))
    return out, probs


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
    check_chunked_attention_inputs(
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
    if query.numel() == 0:
        return _empty_result(
            query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, return_probs
        )
    dropout_p = float(dropout_p)
    if not return_probs and use_triton(
        query,
        key,
        value,
        unsupported=lambda: _triton_unsupported(
            query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p
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
            check=False,
        ), None
    if not return_probs:
        # the PyTorch path: same numerics as the reference, blocked and memory-lean (torch_fast.py), a
        # registered op (reformer_kernels::chunked_attention_fwd / _bwd)
        return torch_fast.chunked_attention_fast(
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
    check_chunked_attention_inputs(
        query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, causal, attention_mask
    )
    if not isinstance(grad_out, torch.Tensor) or grad_out.shape != query.shape:
        raise ValueError(
            f"grad_out must have the query's shape {tuple(query.shape)}; got "
            f"{getattr(grad_out, 'shape', type(grad_out))}"
        )
    if query.numel() == 0:
        zeros = [None if t is None else torch.zeros_like(t) for t in (query, key, value)]
        return torch.zeros_like(value), (zeros[0], zeros[1], zeros[2])
    one_round = sorted_idx is None or sorted_idx.shape[-1] == query.shape[2]
    on_triton = use_triton(
        query,
        key,
        value,
        unsupported=lambda: _triton_unsupported(
            query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, 0.0
        ),
    )
    if one_round and not on_triton:
        # gradients, not a differentiable function of the inputs
        with torch.no_grad():
            out, dq, dk, dv = torch.ops.reformer_kernels.chunked_attention_with_grad(
                query,
                key,
                value,
                sorted_idx,
                attention_mask,
                grad_out,
                chunk_length,
                num_chunks_before,
                num_chunks_after,
                causal,
            )
        return out, (dq, None if key is None else dk, dv)
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
