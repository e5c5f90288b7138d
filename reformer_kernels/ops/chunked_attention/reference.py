"""Chunked LSH / local attention in PyTorch: the specification of the attention op.

Tokens are visited in ``sorted_idx`` order (LSH: by bucket, all hash rounds one after another;
local: the identity order). That sequence of ``R * L`` rows is cut into chunks of ``c`` rows;
each query chunk attends to its own chunk plus ``num_chunks_before`` chunks before and
``num_chunks_after`` after, wrapping circularly over all ``R * L / c`` chunks (so the first
chunk of round ``r`` looks back into round ``r - 1``, and round 0 into the last round).

Scores of a query ``i`` and a key ``j`` (original positions ``p_i``, ``p_j``):

    shared-QK (LSH):  s = q_i . k_j,  k_j = q_j / rms(q_j) / sqrt(D)   (rms with eps 1e-6; computed
                      without overflow where transformers' mean(q^2) overflows: ``key_scale``)
    separate (local): s = q_i . k_j / sqrt(D)

then, in this order, exactly as transformers' Reformer does:

    s = mask_value       where the key is padding or (causal and p_j > p_i)
    s = self_mask_value  where p_j == p_i                       (shared-QK only)

with ``mask_value = -1e9`` / ``self_mask_value = -1e5`` (``-1e4`` / ``-1e3`` when the scores are
fp16). These are finite replacement values, not -inf, and a token that can see only itself
attends to itself. Beware a fully masked row: in fp32 ``logsumexp([-1e9] * w)`` rounds to
exactly ``-1e9`` (the ulp at 1e9 is 64 > log w), so every probability is ``exp(0) = 1`` and the
row returns the *sum* of its values (transformers' arithmetic, kept). A kernel reproduces it by
normalising with ``exp(m - lse)`` where ``lse = m + log(l)`` is rounded to fp32, not by ``1/l``. The
fast paths compute scores in fp32 for fp16 / bf16 inputs too, so they use the fp32 values
(-1e9 / -1e5): a fully masked row returns the sum of its values for every input dtype, as transformers'
fp16 arithmetic does for windows of up to 54 keys (``fl16(-1e4 + log w) == -1e4``). Per
query the op keeps the logsumexp ``lse`` of its row; the output of round ``r`` is ``softmax(s) @ v``, and rounds are
combined with weights ``softmax_r(lse_r)``.
"""

from __future__ import annotations

import math

import torch


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """``(mask_value, self_mask_value)`` for scores of ``dtype``, as transformers uses them."""
    if dtype == torch.float16:
        return -1e4, -1e3
    return -1e9, -1e5


def key_scale(rows: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(f, s)`` per row of ``rows`` (last dim kept, size 1): ``(rows * f) * s`` are the unit-RMS rows,
    ``f * s = rsqrt(mean(x^2) + eps)``, computed without overflow. ``f`` None means 1 everywhere.

    transformers computes ``mean(x^2)`` directly; where that overflows (``|x| >~ 1e19`` in fp32, ``> 256``
    in fp16) its scale is 0 and the keys vanish. Those rows (only those: the others keep transformers'
    bits, ``f = 1``, ``s = rsqrt(mean(x^2) + eps)``) are rescaled by an exact power of two ``f = 2**-e``,
    ``e`` the exponent of ``max|x|``, first: ``s = rsqrt(mean((x f)^2) + eps f^2)``. Callers multiply the
    rows by ``f`` before anything else, so that no intermediate of the forward or backward overflows.
    """
    variance = torch.mean(rows**2, dim=-1, keepdim=True)
    scale = torch.rsqrt(variance + eps)
    overflow = torch.isinf(variance)
    if rows.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(overflow.any()):
        # the common case, decided on the host where that costs no synchronisation
        return None, scale
    # e where the row overflows, 0 (f = 1: finite, no NaN in either branch's gradient) elsewhere
    exponent = torch.where(overflow, torch.frexp(rows.detach().abs().amax(dim=-1, keepdim=True))[1], 0)
    # 2**-e, exact (fp32 holds 2**-128 as a subnormal; fp64 rows get fp64)
    factor = torch.exp2(-exponent.to(torch.promote_types(rows.dtype, torch.float32))).to(rows.dtype)
    rescaled = torch.rsqrt(torch.mean((rows * factor) ** 2, dim=-1, keepdim=True) + eps * factor * factor)
    return factor, torch.where(overflow, rescaled, scale)


def normalize_keys(query: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Shared-QK keys: unit-RMS rows scaled by ``1/sqrt(D)`` (transformers' ``_len_and_dim_norm``, without
    its overflow: see ``key_scale``)."""
    factor, scale = key_scale(query, eps)
    if factor is not None:
        query = query * factor
    return query * scale / math.sqrt(query.shape[-1])


def look_adjacent(chunks: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``[B, H, n, c, ...]`` → ``[B, H, n, c * (before + 1 + after), ...]`` with circular wrap."""
    if before == 0 and after == 0:
        return chunks
    shifted = [torch.roll(chunks, shifts=-offset, dims=2) for offset in range(-before, after + 1)]
    return torch.cat(shifted, dim=3)


def chunked_attention_reference(
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
    """Chunked attention; see the module docstring for the exact semantics.

    Args:
        query: ``[B, H, L, D]`` in original token order.
        key: ``[B, H, L, D]``, or ``None`` for shared-QK LSH attention (keys are the normalised
            queries and a token may not attend to itself unless nothing else is visible).
        value: ``[B, H, L, D]``.
        sorted_idx: ``[B, H, R * L]`` int32/int64 visiting order from the bucket sort, or ``None`` for
            the identity order (R = 1). Every (batch, head) row must be a permutation of ``[0, R * L)``
            (the op checks it): visit ``t`` reads token ``sorted_idx[t] % L`` and its output goes to
            slot ``sorted_idx[t]``, i.e. round ``sorted_idx[t] // L``.
        chunk_length: rows per chunk; ``L`` must be a multiple of it.
        num_chunks_before, num_chunks_after: neighbouring chunks each query chunk also sees.
        causal: mask keys at later original positions.
        attention_mask: optional ``[B, L]``, zeros mark padding keys.
        dropout_p: dropout on the attention probabilities (0 in eval).
        return_probs: also return the probabilities ``[B, H, R * L / c, c, c * (before+1+after)]``
            in visiting order (transformers' ``attentions`` layout).

    Returns:
        ``(out [B, H, L, D], probs or None)``.
    """
    batch_size, num_heads, seq_len, head_dim = query.shape
    shared_qk = key is None
    if sorted_idx is None:
        positions = torch.arange(seq_len, device=query.device).expand(batch_size, num_heads, seq_len)
    else:
        sorted_idx = sorted_idx.long()  # int32 is accepted too; gather and scatter index in int64
        positions = sorted_idx % seq_len  # [B, H, R*L]
    num_rows = positions.shape[-1]
    num_rounds = num_rows // seq_len
    num_chunks = num_rows // chunk_length

    keys = normalize_keys(query) if shared_qk else key / math.sqrt(head_dim)

    def visit(rows: torch.Tensor) -> torch.Tensor:
        # [B, H, L, D] → rows in visiting order, chunked: [B, H, n, c, D]
        if sorted_idx is not None:
            rows = rows.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        return rows.reshape(batch_size, num_heads, num_chunks, chunk_length, head_dim)

    q_chunks = visit(query)  # [B, H, n, c, D]
    k_window = look_adjacent(visit(keys), num_chunks_before, num_chunks_after)  # [B, H, n, w, D]
    v_window = look_adjacent(visit(value), num_chunks_before, num_chunks_after)  # [B, H, n, w, D]
    q_pos = positions.reshape(batch_size, num_heads, num_chunks, chunk_length)  # [B, H, n, c]
    k_pos = look_adjacent(q_pos, num_chunks_before, num_chunks_after)  # [B, H, n, w]

    scores = torch.matmul(q_chunks, k_window.transpose(-1, -2))  # [B, H, n, c, w]
    mask_value, self_mask_value = mask_values(scores.dtype)

    visible = None
    if attention_mask is not None:
        key_kept = attention_mask.to(torch.bool)[:, None, :].expand(-1, num_heads, -1)  # [B, H, L]
        key_kept = key_kept.gather(2, k_pos.flatten(2)).view_as(k_pos)  # [B, H, n, w]
        visible = key_kept.unsqueeze(-2)  # [B, H, n, 1, w]
    if causal:
        not_future = q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)  # [B, H, n, c, w]
        visible = not_future if visible is None else not_future & visible
    if visible is not None:
        scores = torch.where(visible, scores, torch.tensor(mask_value, dtype=scores.dtype, device=scores.device))
    if shared_qk:
        not_self = q_pos.unsqueeze(-1) != k_pos.unsqueeze(-2)  # [B, H, n, c, w]
        scores = torch.where(not_self, scores, torch.tensor(self_mask_value, dtype=scores.dtype, device=scores.device))

    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, n, c, 1]
    probs = torch.exp(scores - lse)  # [B, H, n, c, w]
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v_window).reshape(batch_size, num_heads, num_rows, head_dim)  # [B, H, R*L, D]
    lse = lse.reshape(batch_size, num_heads, num_rows)  # [B, H, R*L]

    if sorted_idx is not None:
        # back to original order: row sorted_idx[t] of the (round-major) output is visit t
        undo = torch.empty_like(sorted_idx).scatter_(
            -1, sorted_idx, torch.arange(num_rows, device=query.device).expand_as(sorted_idx)
        )
        out = out.gather(2, undo.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        lse = lse.gather(2, undo)

    if num_rounds > 1:
        out = out.view(batch_size, num_heads, num_rounds, seq_len, head_dim)
        lse = lse.view(batch_size, num_heads, num_rounds, seq_len, 1)
        weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))  # [B, H, R, L, 1]
        out = torch.sum(out * weights, dim=2)  # [B, H, L, D]

    return out, (probs if return_probs else None)
