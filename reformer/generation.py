"""Cached autoregressive decoding: what the model's layers hand the cache (``reformer.cache``), and the prefill of
left-padded prompts.

The cache (``ReformerDynamicCache``, transformers' name; passed as ``past_buckets_states``) keeps per layer the
projections the attention reads and, for LSH layers, the bucket ids of every cached position; a decoding step
(one new token per row) appends in place and attends only to the relevant chunk(s): ``reformer.cache`` holds the
buffers and the steps, ``reformer_kernels.ops.decode_attention`` the one-token attention. The semantics are
transformers' cached steps:

- LSH: hash the new query, find its rank among the cached tokens of each round in bucket order (stable: earlier
  positions first), take the chunk(s) of that sorted order around it (wrapping circularly over the sorted tokens)
  and attend to those positions only. While a row is shorter than a chunk (and on the first step after a prompt
  of exactly one chunk, as in transformers) it attends to all its cached tokens, which are at most one chunk.
- local: the new query attends to the cached positions from the start of the chunk ``num_chunks_before`` chunks
  before its own (transformers' ``_retrieve_relevant_hidden_states``).

Beyond transformers, rows may be **left-padded** (``attention_mask`` zeros on the left, over the past and the new
token). Each row then behaves exactly as if it were decoded alone: its positions start at its first real token,
padded positions carry the extra pad bucket (so they sort after every real token and never enter an LSH window,
whose wrap-around runs over the row's real tokens only), local windows are counted in the row's own real tokens,
and padded positions are zeroed and masked. A left-padded prompt longer than a chunk is prefilled one forward per
row length (``prefill_left_padded``), since LSH and local chunking depend on the row's own length.

Bucket format: round ``r`` of a cached bucket id is offset by ``r * (prod(num_buckets) + 1)`` and padding has the id
``prod(num_buckets)`` within its round (transformers' layout with the pad bucket reserved; transformers itself uses
the offset ``prod(num_buckets)`` when its prompt had no padding and re-derives the offset with a heuristic, the
ordering within a round is the same).
"""

from __future__ import annotations

import torch

from reformer_kernels.ops.lsh_hash import num_buckets_product

from .cache import ReformerDynamicCache, local_decode_step, lsh_decode_step

__all__ = [
    "ReformerDynamicCache",
    "check_left_padded",
    "hash_for_cache",
    "local_decode_step",
    "lsh_decode_step",
    "prefill_buckets",
    "prefill_left_padded",
]


# ==================================================================================================
# bucket ids
# ==================================================================================================
def _round_offsets(num_hashes: int, stride: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(num_hashes, device=device) * stride).view(1, 1, -1, 1)  # [1, 1, R, 1]


def canonical_buckets(buckets: torch.Tensor, num_buckets: int, stride: int) -> torch.Tensor:
    """``[B, H, R, L]`` ids offset per round by ``stride`` → offset by ``num_buckets + 1`` (the cache layout)."""
    if stride == num_buckets + 1:
        return buckets
    num_hashes = buckets.shape[2]
    raw = buckets.long() - _round_offsets(num_hashes, stride, buckets.device)
    return (raw + _round_offsets(num_hashes, num_buckets + 1, buckets.device)).to(buckets.dtype)


def hash_for_cache(attn, vectors: torch.Tensor, num_hashes: int, real: torch.Tensor | None) -> torch.Tensor:
    """Bucket ids ``[B, H, R, L]`` in the cache layout of ``vectors [B, H, L, D]`` (padding where ``real`` is False)."""
    batch_size, num_heads, seq_len, _ = vectors.shape
    if attn.num_buckets is None:
        # transformers would fail here (num_buckets unset and never hashed); use its rule for this length
        attn._set_num_buckets(seq_len)
    buckets = attn.hash_vectors(vectors, num_hashes, real, increase_num_buckets=True)  # [B, H, R*L], offset nb+1
    return buckets.view(batch_size, num_heads, num_hashes, seq_len)


def prefill_buckets(attn, buckets: torch.Tensor, attention_mask: torch.Tensor | None, orig_len: int) -> torch.Tensor:
    """Buckets ``[B, H, R, L_padded]`` of an uncached LSH forward → the cache layout, trimmed to ``orig_len``."""
    num_buckets = num_buckets_product(attn.num_buckets)
    # lsh_hash adds the pad bucket (offset nb + 1) iff the batch has any padding
    has_padding = attention_mask is not None and not bool(attention_mask.bool().all())
    stride = num_buckets + 1 if has_padding else num_buckets
    return canonical_buckets(buckets, num_buckets, stride)[..., :orig_len]


# ==================================================================================================
# one-token attention steps
# ==================================================================================================
# ==================================================================================================
# prefill of a left-padded batch
# ==================================================================================================
def check_left_padded(attention_mask: torch.Tensor, name: str = "attention_mask") -> None:
    """Zeros only on the left of each row and at least one real token per row (host check)."""
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError(f"{name} must be left-padded: the last position of every row must be a real token (1)")
    if mask.shape[1] > 1 and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError(f"{name} must be left-padded: zeros (padding) only before the first real token of a row")


def prefill_left_padded(model, input_ids: torch.Tensor, real: torch.Tensor, num_hashes: int | None):
    """The prompt of a left-padded batch (``real [B, N]`` bool, True = token) such that each row behaves as if alone.

    Within one chunk every layer attends fully over the batch, so masking the padding is exact: one forward for all
    rows. Longer prompts: LSH and local chunking depend on the row length, so rows of equal length share a forward and
    the caches are merged (left-padded: zero states, pad bucket). Returns ``(next-token logits [B, V], cache)``.
    """
    config = model.config
    batch_size, seq_len = input_ids.shape
    if seq_len <= config.min_chunk_length():
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, N]
        out = model(
            input_ids,
            attention_mask=real.long(),
            position_ids=positions,
            use_cache=True,
            num_hashes=num_hashes,
            logits_to_keep=1,
            return_dict=True,
        )
        return out.logits[:, -1], out.past_buckets_states
    lengths = real.sum(-1)
    logits = None
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero().flatten()
        out = model(
            input_ids[rows, seq_len - length :],
            use_cache=True,
            num_hashes=num_hashes,
            logits_to_keep=1,
            return_dict=True,
        )
        if logits is None:
            logits = out.logits.new_empty(batch_size, out.logits.shape[-1])
        logits[rows] = out.logits[:, -1]
        groups.append((rows, length, out.past_buckets_states))
    hash_fns = {}
    for layer_idx, layer in enumerate(model.reformer.encoder.layers):
        attn = layer.attention.self_attention
        if hasattr(attn, "hash_vectors"):
            rounds = num_hashes if num_hashes is not None else attn.num_hashes
            hash_fns[layer_idx] = lambda vectors, attn=attn, rounds=rounds: hash_for_cache(attn, vectors, rounds, None)
    group_caches = [(rows, cache) for rows, _, cache in groups]
    return logits, ReformerDynamicCache.merge_left_padded(group_caches, batch_size, hash_fns)
