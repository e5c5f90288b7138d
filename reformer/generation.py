"""Cached autoregressive decoding for the Reformer: the bucket cache, the one-token attention steps, ``generate``.

The cache follows transformers' ``ReformerDynamicCache`` (fields ``buckets_cache`` / ``states_cache``, ``update``,
``get_start_idx``, ``reorder_cache``, ``len()`` = number of cached layers). Per layer it keeps the attention
*inputs* (the layer-normed hidden states, ``[B, L, hidden]``) from which keys and values are rebuilt for the few
positions a step needs, and for LSH layers the bucket ids of every cached position (``[B, H, R, L]``).

A decoding step (one new token per row) costs O(R * chunk * (1 + before + after)) attention work per layer:

- LSH (transformers' semantics): hash the new query, find its rank among the cached tokens of each round in
  bucket order (stable: earlier positions first), take the chunk(s) of that sorted order around it (wrapping
  circularly over the sorted tokens) and attend to those positions only; keys/values are projected for them alone.
  While a row is shorter than a chunk (and on the first step after a prompt of exactly one chunk, as in
  transformers) it attends to all its cached tokens, which are at most one chunk.
- local: the new query attends to the cached states from the start of the chunk ``num_chunks_before`` chunks
  before its own (transformers' ``_retrieve_relevant_hidden_states``), at most ``(before + 1) * chunk`` states.

Bookkeeping outside the attention is O(L) per step and layer, as in transformers: appending to the cache
(``torch.cat``) and, for LSH, a sort of the integer bucket ids to locate the window.

Beyond transformers, rows may be **left-padded** (``attention_mask`` zeros on the left, over the past and the new
token). Each row then behaves exactly as if it were decoded alone: its positions start at its first real token,
padded positions carry the extra pad bucket (so they sort after every real token and never enter an LSH
window, whose wrap-around runs over the row's real tokens only), local windows are counted in the row's own
real tokens, and padded states are zeroed and masked.

Bucket format: round ``r`` of a cached bucket id is offset by ``r * (prod(num_buckets) + 1)`` and padding has
the id ``prod(num_buckets)`` within its round (transformers' layout with the pad bucket reserved; transformers
itself uses the offset ``prod(num_buckets)`` when its prompt had no padding and re-derives the offset with a
heuristic, the ordering within a round is the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from reformer_kernels.ops.chunked_attention.reference import mask_values, normalize_keys
from reformer_kernels.ops.lsh_hash import num_buckets_product

__all__ = ["ReformerDynamicCache", "check_left_padded", "prefill_left_padded"]


# ==================================================================================================
# the cache
# ==================================================================================================
class ReformerDynamicCache:
    """Per-layer cached attention inputs and LSH buckets (transformers' ``ReformerDynamicCache`` fields).

    ``states_cache[i]``: ``[B, L, hidden]`` layer-normed inputs of layer ``i``'s attention (zeros at padding).
    ``buckets_cache[i]``: LSH layers ``[B, H, R, L]`` bucket ids (see the module docstring for the layout), or an
    empty tensor for local layers and for LSH layers that have not hashed yet (prompt and steps within a chunk).
    ``decode_steps`` counts the one-token steps taken since the prompt was cached.
    """

    def __init__(self, _distributed_cache_data: Iterable | None = None) -> None:
        self._seen_tokens = 0
        self.decode_steps = 0
        self.buckets_cache: list[torch.Tensor] = []
        self.states_cache: list[torch.Tensor] = []
        if _distributed_cache_data is not None:
            for buckets, states in _distributed_cache_data:
                self.buckets_cache.append(buckets)
                self.states_cache.append(states)

    def __len__(self) -> int:
        """The number of cached layers."""
        return len(self.states_cache)

    def update(
        self,
        buckets: torch.Tensor | None,
        states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``states [B, n, hidden]`` (and ``buckets [B, H, R, n]`` if any) to layer ``layer_idx``.

        Buckets given for a layer whose bucket cache is still empty replace it (they must then cover every
        cached position: an LSH layer hashes all its states at once when the sequence reaches a chunk).
        Returns the layer's ``(buckets, states)``.
        """
        if layer_idx == 0:
            self._seen_tokens += states.shape[-2]
        if len(self.states_cache) <= layer_idx:
            if layer_idx != len(self.states_cache):
                raise ValueError(
                    f"layers must be cached in order: got layer {layer_idx} with {len(self.states_cache)} cached"
                )
            self.states_cache.append(states)
            self.buckets_cache.append(buckets if buckets is not None else states.new_empty(0, dtype=torch.long))
        else:
            self.states_cache[layer_idx] = torch.cat([self.states_cache[layer_idx], states], dim=1)
            if buckets is not None:
                previous = self.buckets_cache[layer_idx]
                self.buckets_cache[layer_idx] = (
                    buckets if previous.numel() == 0 else torch.cat([previous, buckets.to(previous.dtype)], dim=-1)
                )
        if (
            self.buckets_cache[layer_idx].numel()
            and self.buckets_cache[layer_idx].shape[-1] != self.states_cache[layer_idx].shape[1]
        ):
            raise ValueError(
                f"layer {layer_idx}: {self.buckets_cache[layer_idx].shape[-1]} cached buckets for "
                f"{self.states_cache[layer_idx].shape[1]} cached states"
            )
        return self.buckets_cache[layer_idx], self.states_cache[layer_idx]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Cached positions (padding included)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        return self.states_cache[layer_idx].shape[1] if len(self) > layer_idx else 0

    def get_start_idx(self) -> int:
        """Position of the next token when no ``attention_mask``/``position_ids`` say otherwise."""
        return self.get_seq_length(0)

    @property
    def batch_size(self) -> int | None:
        return self.states_cache[0].shape[0] if len(self) else None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select/reorder the batch rows (beam search, ``num_return_sequences``)."""
        for layer_idx in range(len(self)):
            if self.buckets_cache[layer_idx].numel() > 0:
                self.buckets_cache[layer_idx] = self.buckets_cache[layer_idx].index_select(
                    0, beam_idx.to(self.buckets_cache[layer_idx].device)
                )
            if self.states_cache[layer_idx].numel() > 0:
                self.states_cache[layer_idx] = self.states_cache[layer_idx].index_select(
                    0, beam_idx.to(self.states_cache[layer_idx].device)
                )


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
def _real_positions(
    attention_mask: torch.Tensor | None, batch_size: int, length: int, device: torch.device
) -> torch.Tensor:
    """``[B, L + 1]`` bool: which cached positions (and the new token) are real."""
    if attention_mask is None:
        return torch.ones(batch_size, length + 1, dtype=torch.bool, device=device)
    return attention_mask.to(device=device, dtype=torch.bool)


def _heads_weight(linear: torch.nn.Linear, num_heads: int, head_size: int) -> torch.Tensor:
    return linear.weight.view(num_heads, head_size, -1)  # [H, D, hidden]


def _attend_one(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scores_fill: list[tuple[torch.Tensor, float]]
):
    """One query per (row, head[, round]) over ``T`` keys, in fp32: ``query [..., D]``, ``keys/values [..., T, D]``.

    ``scores_fill``: ``(where, value)`` replacements applied in order (masks as transformers orders them).
    Returns ``(out [..., D], logsumexp [...])``.
    """
    scores = torch.einsum("...d,...td->...t", query.float(), keys.float())  # [..., T]
    for where, value in scores_fill:
        scores = scores.masked_fill(where, value)
    lse = torch.logsumexp(scores, dim=-1)  # [...]
    probs = torch.exp(scores - lse.unsqueeze(-1))  # [..., T]
    out = torch.einsum("...t,...td->...d", probs, values.float())  # [..., D]
    return out, lse


def lsh_attention_step(
    attn, hidden_states: torch.Tensor, cache: ReformerDynamicCache, attention_mask: torch.Tensor | None, num_hashes: int
):
    """One new token through a cached LSH layer.

    ``hidden_states [B, 1, hidden]`` (layer-normed). Returns ``(out [B, 1, H * D], buckets)`` where ``buckets`` is
    what the cache must record for this step: the new token's ids ``[B, H, R, 1]``, or the ids of all ``L + 1``
    positions ``[B, H, R, L + 1]`` when the layer hashes for the first time, or None.
    """
    layer_idx = attn.layer_idx
    past_states = cache.states_cache[layer_idx]  # [B, L, hidden]
    past_buckets = cache.buckets_cache[layer_idx]  # [B, H, R, L] or empty
    batch_size, length, _ = past_states.shape
    num_heads, head_size, chunk = attn.num_attention_heads, attn.attention_head_size, attn.chunk_length
    if past_buckets.numel() and past_buckets.shape[2] != num_hashes:
        raise ValueError(
            f"num_hashes={num_hashes} differs from the {past_buckets.shape[2]} hash rounds of the cached buckets"
        )
    device = hidden_states.device
    real = _real_positions(attention_mask, batch_size, length, device)  # [B, L + 1]
    num_past = real[:, :length].sum(-1)  # [B] real cached tokens per row
    # a row alone would still attend to all its tokens while within a chunk (and on the first step after a
    # prompt of exactly one chunk: transformers hashes only once the cached sequence reaches a chunk)
    windowed = (num_past > chunk) | ((num_past == chunk) & (cache.decode_steps > 0))  # [B]

    all_states = torch.cat([past_states, hidden_states.to(past_states.dtype)], dim=1)  # [B, L + 1, hidden]
    query = attn._split_heads(attn.query_key(hidden_states))[:, :, 0]  # [B, H, D]

    new_buckets = None
    if past_buckets.numel():
        new_buckets = hash_for_cache(attn, query.unsqueeze(2), num_hashes, None)  # [B, H, R, 1]
        buckets = torch.cat([past_buckets, new_buckets.to(past_buckets.dtype)], dim=-1)  # [B, H, R, L + 1]
    elif bool((num_past + 1 >= chunk).any()):
        # the sequence reached a chunk: hash every cached state once (transformers' transition)
        query_keys = attn._split_heads(attn.query_key(all_states))  # [B, H, L + 1, D]
        buckets = new_buckets = hash_for_cache(attn, query_keys, num_hashes, real)  # [B, H, R, L + 1]
    else:
        buckets = None

    mask_value, self_mask_value = mask_values(torch.float32)
    w_qk = _heads_weight(attn.query_key, num_heads, head_size)  # [H, D, hidden]
    w_v = _heads_weight(attn.value, num_heads, head_size)  # [H, D, hidden]
    out = None
    if bool(windowed.any()):
        if buckets is None:
            raise RuntimeError("internal error: an LSH row needs its bucket window but the layer has not hashed")
        num_buckets = num_buckets_product(attn.num_buckets)
        raw = buckets.long() - _round_offsets(num_hashes, num_buckets + 1, device)  # [B, H, R, L + 1], padding = nb
        # stable: equal buckets keep position order; padding (the largest id) sorts after every real token
        sorted_pos = torch.sort(raw, dim=-1, stable=True).indices  # [B, H, R, L + 1]
        # rank of the new token: the real cached tokens with a bucket <= its bucket come before it
        rank = (raw[..., :length] <= raw[..., length:]).sum(-1)  # [B, H, R]
        window = chunk * (1 + attn.num_chunks_before + attn.num_chunks_after)
        start = (torch.div(rank, chunk, rounding_mode="floor") - attn.num_chunks_before) * chunk  # [B, H, R]
        num_real = (num_past + 1).view(batch_size, 1, 1, 1)
        # wrap around the row's real tokens only (its sorted positions 0 .. num_real - 1)
        ranks = torch.remainder(start.unsqueeze(-1) + torch.arange(window, device=device), num_real)  # [B, H, R, T]
        key_pos = sorted_pos.gather(-1, ranks)  # [B, H, R, T] cache positions
        gathered = all_states.gather(1, key_pos.reshape(batch_size, -1, 1).expand(-1, -1, all_states.shape[-1]))
        gathered = gathered.view(batch_size, num_heads, num_hashes, window, -1)  # [B, H, R, T, hidden]
        keys = normalize_keys(torch.einsum("bhrtk,hdk->bhrtd", gathered, w_qk).float())  # [B, H, R, T, D]
        values = torch.einsum("bhrtk,hdk->bhrtd", gathered, w_v)  # [B, H, R, T, D]
        query_r = query.unsqueeze(2).expand(-1, -1, num_hashes, -1)  # [B, H, R, D]
        out_r, lse = _attend_one(
            query_r, keys, values, [(key_pos == length, self_mask_value)]
        )  # [B, H, R, D], [B, H, R]
        # rounds weighted by their share of the total softmax mass
        weights = torch.exp(lse - torch.logsumexp(lse, dim=-1, keepdim=True))  # [B, H, R]
        out = (out_r * weights.unsqueeze(-1)).sum(2)  # [B, H, D]
    if not bool(windowed.all()):
        # rows within a chunk: every real cached token (at most one chunk, at the end of the cache) and itself
        span = min(length, chunk)
        states = all_states[:, length - span :]  # [B, S + 1, hidden]
        keys = normalize_keys(attn._split_heads(attn.query_key(states)).float())  # [B, H, S + 1, D]
        values = attn._split_heads(attn.value(states))  # [B, H, S + 1, D]
        padding = ~real[:, length - span :].view(batch_size, 1, span + 1)  # [B, 1, S + 1]
        is_self = torch.zeros(span + 1, dtype=torch.bool, device=device)
        is_self[-1] = True
        full, _ = _attend_one(query, keys, values, [(padding, mask_value), (is_self, self_mask_value)])  # [B, H, D]
        out = full if out is None else torch.where(windowed.view(batch_size, 1, 1), out, full)
    out = out.to(hidden_states.dtype).reshape(batch_size, 1, num_heads * head_size)
    return out, new_buckets


def local_attention_step(
    attn, hidden_states: torch.Tensor, cache: ReformerDynamicCache, attention_mask: torch.Tensor | None
):
    """One new token through a cached local layer: ``hidden_states [B, 1, hidden]`` → ``[B, 1, H * D]``."""
    past_states = cache.states_cache[attn.layer_idx]  # [B, L, hidden]
    batch_size, length, _ = past_states.shape
    chunk, before = attn.chunk_length, attn.num_chunks_before
    device = hidden_states.device
    real = _real_positions(attention_mask, batch_size, length, device)  # [B, L + 1]
    num_past = real[:, :length].sum(-1)  # [B]
    # transformers keeps past[start:] with start = (n // chunk - before) * chunk,
    # a Python slice (negative: from the end)
    start = (torch.div(num_past, chunk, rounding_mode="floor") - before) * chunk  # [B]
    start = torch.where(start >= 0, start, (num_past + start).clamp(min=0))
    span = min(length, (before + 1) * chunk)
    states = torch.cat(
        [past_states[:, length - span :], hidden_states.to(past_states.dtype)], dim=1
    )  # [B, S + 1, hidden]
    # real index of cache position i is i - (number of padded positions)
    real_index = torch.arange(length - span, length + 1, device=device) - (length - num_past).unsqueeze(
        -1
    )  # [B, S + 1]
    outside = (real_index < start.unsqueeze(-1)).view(batch_size, 1, span + 1)  # [B, 1, S + 1]
    query = attn._split_heads(attn.query(hidden_states))[:, :, 0]  # [B, H, D]
    keys = attn._split_heads(attn.key(states)) / math.sqrt(attn.attention_head_size)  # [B, H, S + 1, D]
    values = attn._split_heads(attn.value(states))  # [B, H, S + 1, D]
    out, _ = _attend_one(query, keys, values, [(outside, mask_values(torch.float32)[0])])  # [B, H, D]
    return out.to(hidden_states.dtype).reshape(batch_size, 1, -1)


def cache_attention_inputs(
    attn,
    cache: ReformerDynamicCache,
    layer_idx: int,
    hidden_states: torch.Tensor,
    buckets: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    orig_sequence_length: int | None,
    is_step: bool,
) -> None:
    """Record a layer's attention inputs after a prompt forward (``is_step=False``) or a one-token step."""
    states = hidden_states.detach()
    if not is_step:
        orig_len = states.shape[1] if orig_sequence_length is None else orig_sequence_length
        if attention_mask is not None:
            # padded states are never attended to; zero them so they are defined
            states = states * attention_mask[:, :, None].to(states.dtype)
        states = states[:, :orig_len]
        if buckets is not None:
            buckets = prefill_buckets(attn, buckets, attention_mask, orig_len)
    cache.update(buckets, states, layer_idx)


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
    return logits, _merge_caches(model, groups, batch_size, seq_len, num_hashes)


def _merge_caches(model, groups, batch_size: int, seq_len: int, num_hashes: int | None) -> ReformerDynamicCache:
    """Left-pad the caches of row groups into one batch cache (padding: zero states, pad bucket)."""
    layers = model.reformer.encoder.layers
    merged = ReformerDynamicCache()
    for layer_idx, layer in enumerate(layers):
        attn = layer.attention.self_attention
        first = groups[0][2].states_cache[layer_idx]
        states = first.new_zeros(batch_size, seq_len, first.shape[-1])  # [B, N, hidden]
        for rows, length, cache in groups:
            states[rows, seq_len - length :] = cache.states_cache[layer_idx]
        buckets = None
        if any(cache.buckets_cache[layer_idx].numel() for _, _, cache in groups):
            rounds = num_hashes if num_hashes is not None else attn.num_hashes
            num_buckets = num_buckets_product(attn.num_buckets)
            pad = _round_offsets(rounds, num_buckets + 1, states.device) + num_buckets  # [1, 1, R, 1]
            buckets = pad.expand(batch_size, attn.num_attention_heads, rounds, seq_len).clone()  # [B, H, R, N]
            for rows, length, cache in groups:
                group_buckets = cache.buckets_cache[layer_idx]
                if group_buckets.numel() == 0:
                    # this group's prompt fit in a chunk and was not hashed: hash its states now
                    query_keys = attn._split_heads(attn.query_key(cache.states_cache[layer_idx]))
                    group_buckets = hash_for_cache(attn, query_keys, rounds, None)
                buckets[rows, :, :, seq_len - length :] = group_buckets.to(buckets.dtype)
        merged.update(buckets, states, layer_idx)
    return merged
