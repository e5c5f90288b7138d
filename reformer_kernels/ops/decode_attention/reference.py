"""One-query attention over rows gathered through an index, in PyTorch: the specification of the decode op.

A cached decoding step attends with one new query per (batch row, head) to a short window of cached rows:
``T`` rows per hash round ``r``, named by ``index[b, h, r, t]`` (row numbers into the cached ``key``/``value``
``[B, H, N, D]``). Per entry ``t`` of round ``r``, in this order (transformers' Reformer order):

    k_t = x_t * rsqrt(mean(x_t^2) + 1e-6) / sqrt(D)     shared query-key (LSH), x_t = key[index_t]
    k_t = key[index_t] / sqrt(D)                          separate keys (local attention)
    s_t = q . k_t                                         in fp32
    s_t = -1e9   where t < key_start[b]                   (masked entries, e.g. padding or out of the window)
    s_t = -1e5   where index_t == self_index[b]           (the query's own row, shared QK)
    lse_r = logsumexp_t(s_t),   o_r = sum_t exp(s_t - lse_r) * value[index_t]

and the rounds are combined with weights ``softmax_r(lse_r)``: ``out = sum_r exp(lse_r - logsumexp(lse)) o_r``
(one round: ``out = o_0``). The replacement values are the fp32 ones for every input dtype (the scores are
fp32), as the cached step has always used them. A row whose entries are all masked keeps transformers'
arithmetic (every probability ``exp(0)``: the sum of its values), as ``chunked_attention`` documents.

The same row may appear several times in a window (the LSH window wraps around a row's tokens when it has
fewer than ``T``); each appearance is one entry, as in transformers. ``index=None`` names every row of
``key``/``value`` in order, one round (``T = N``): the window itself is passed (a local step's contiguous slice
of the cache, read in place on CPU).
"""

from __future__ import annotations

import torch

from ..chunked_attention.reference import mask_values, normalize_keys


def window_index(key: torch.Tensor) -> torch.Tensor:
    """The index ``[B, H, 1, N]`` that ``index=None`` stands for: every row of ``key [B, H, N, D]``, in order."""
    batch_size, num_heads, num_rows = key.shape[:3]
    return torch.arange(num_rows, device=key.device).view(1, 1, 1, -1).expand(batch_size, num_heads, 1, -1)


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor | None,
    shared_qk: bool,
    key_start: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, H, D]`` to the rows ``index [B, H, R, T]`` of ``key``/``value [B, H, N, D]``.

    ``key_start [B]`` masks the entries ``t < key_start[b]``; ``self_index [B]`` gives entries whose row is the
    query's own the self-mask value. Returns ``[B, H, D]`` in the query's dtype (see the module docstring).
    ``index=None``: every row of ``key``/``value``, in order (``window_index``).
    """
    if index is None:
        index = window_index(key)  # [B, H, 1, N]
    batch_size, num_heads, head_dim = query.shape
    num_rounds, window = index.shape[2:]
    rows = index.long().reshape(batch_size, num_heads, num_rounds * window, 1).expand(-1, -1, -1, head_dim)
    keys = key.gather(2, rows).float().view(batch_size, num_heads, num_rounds, window, head_dim)  # [B, H, R, T, D]
    values = value.gather(2, rows).float().view(batch_size, num_heads, num_rounds, window, head_dim)  # [B, H, R, T, D]
    keys = normalize_keys(keys) if shared_qk else keys / head_dim**0.5  # [B, H, R, T, D]
    scores = torch.einsum("bhd,bhrtd->bhrt", query.float(), keys)  # [B, H, R, T]
    mask_value, self_mask_value = mask_values(torch.float32)
    if key_start is not None:
        masked = torch.arange(window, device=query.device) < key_start.view(batch_size, 1, 1, 1)  # [B, 1, 1, T]
        scores = scores.masked_fill(masked, mask_value)
    if self_index is not None:
        scores = scores.masked_fill(index == self_index.view(batch_size, 1, 1, 1), self_mask_value)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, R]
    probs = torch.exp(scores - lse.unsqueeze(-1))  # [B, H, R, T]
    out = torch.einsum("bhrt,bhrtd->bhrd", probs, values)  # [B, H, R, D]
    if num_rounds == 1:
        return out[:, :, 0].to(query.dtype)
    # rounds weighted by their share of the total softmax mass
    weights = torch.exp(lse - torch.logsumexp(lse, dim=-1, keepdim=True))  # [B, H, R]
    return (out * weights.unsqueeze(-1)).sum(2).to(query.dtype)  # [B, H, D]
