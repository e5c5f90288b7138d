"""The decoding cache: per-layer buffers written in place, and one-token LSH / local attention steps whose cost
does not grow with the cached length.

Semantics: exactly those of ``reformer.generation``'s ``lsh_attention_step`` / ``local_attention_step`` (equal to
transformers' cached steps for unpadded batches; each left-padded row decodes as if alone), see that module's
docstring. What changes is how the same window positions are found and what is cached.

What a layer caches (``ReformerDynamicCache.prefill``, then one slot per step):

- the *projections* the attention reads, ``[B, H, capacity, D]`` buffers: for LSH layers the shared query-key
  projection and the value, for local layers the key and the value. A step attends to them directly, so it
  never re-projects its window (and never reads a projection's weight: the model computes the new token's
  projections by calling its modules, which keeps hooks and PEFT wrappers in the loop). Keys are normalised
  (LSH) or scaled (local) on the fly by the attention op.
- LSH layers: the bucket ids ``[B, H, R, capacity]`` (int32, round ``r`` offset by ``r * (nb + 1)``, padding
  ``nb`` within its round: the layout ``reformer.generation`` documents), once the layer has hashed;
- per row, the number of real (non-padding) cached tokens ``[B]``; padding is a left prefix of each row.

The buffers have a capacity: ``max_cache_len`` when given (a static cache: never reallocated, a step beyond it
is a ``ValueError``), otherwise the prompt length rounded up to a multiple of ``capacity_quantum``, doubled
whenever a step needs more. A step writes its token at slot ``L`` with ``index_copy_`` (no copy of the cache). A step
given ``append=False`` (transformers' ``use_cache=False`` with a cache) reads the cache and leaves it as it was.

The LSH window without a sort. A step needs the new token's rank ``rank`` among the row's real tokens in bucket
order (stable: positions ascending within a bucket), and the tokens at the ranks ``start .. start + T - 1``
(modulo the number of real tokens ``n``), ``start = (rank // chunk - before) * chunk``,
``T = chunk * (1 + before + after)``. Per (row, head, round) the cache keeps

- ``counts [nb]``: real tokens per bucket, so that a rank is a bucket (``searchsorted`` on their cumulative sum)
  and an index within that bucket;
- for every bucket its first ``T`` positions (``head``) and its last ``T`` positions (``tail``, a ring indexed
  by ``i mod T``), in ``slots [(nb + 1) * (2T + 1)]`` (int32; the extra bucket and the extra slot per bucket
  absorb the writes that must not land, so every update is one branch-free scatter).

That suffices: the window is at most two runs of consecutive ranks (one if it does not wrap) and always contains
``rank``, the new token, which is the *last* token of its bucket. So within a bucket ``k`` the window holds
either a suffix (``k`` at or before the new token's bucket, or a run reaching the end ``n``), or a prefix (``k``
after it, or a run starting at rank 0), or the whole bucket inside a run shorter than ``T``: never more than
``T`` tokens from either end of a bucket, so index ``i`` of bucket ``k`` is read only when ``i < T`` (in the
head) or ``i >= count_k - T`` (in the tail ring, whose slot ``i mod T`` then still holds it). A step appends
its token to its bucket (one count increment, one scatter of its position to its head and tail slots), then
reads ``O(nb)`` cumulative counts and ``O(T log nb)`` lookups: no sort, nothing proportional to ``L``.

The structure is built once per layer from the cached buckets (one stable sort), at the layer's first step
(it needs the window size, which only the step knows), or when the layer first hashes: the "transition" of
transformers, which hashes every cached token once the sequence reaches a chunk; here it hashes the cached
query-key projections (``hash_fn``, the layer's own hashing, rotations included).

Memory of the index: ``(nb + 1) * (2T + 1)`` int32 per (row, head, round); with transformers' ``nb`` of about
``2 L / chunk`` that is about ``4 (1 + before + after)`` ints per cached token, against ``2 D`` numbers of cached
projections per token and head.

No host synchronisation in a step: the values that vary per step (slot ``L``, counts, ranks, which rows are
still within a chunk) live in device tensors updated in place. Host integers (length, capacity, bounds on the
rows' real lengths, steps taken) only pick shapes and which of the two LSH paths run, and those choices stop
changing once every row is past its first ``(before + 1) * chunk`` tokens, so a CUDA user with a static
capacity can capture later steps in a CUDA graph. The bounds come from one host read of the padding, at the
first prefill given a padding mask; ``reorder_cache`` keeps them (a selection of rows stays within them). On CPU
(no graphs, and each operator call costs more than its arithmetic) a step uses host integers where they save
calls: a local step reads its window as a slice of the buffers (without its masked entries when every row holds
the same number of real tokens), and an LSH index of at most ``HOST_INDEX_ROWS`` rows takes the new token with
host integers, through NumPy views of its counts and slots (larger ones write the slot ``L`` as a scalar).

Under ``torch.compile`` the two steps (``lsh_decode_step``, ``local_decode_step``) run eagerly
(``torch.compiler.disable``); the model's code around them (projections, feed-forward, head) compiles. Traced,
their host integers would specialise the graph on the cache length (a recompile at every step), and once Dynamo
makes that length dynamic, inductor's code for the traced bookkeeping fails (a ``NameError``, torch 2.13).

Where the results can differ from ``reformer.generation``'s (not in its tests): the cached projections are the
prompt forward's, so they may differ from re-projected states in the last bit, and a hash at the transition
could then round the other way on a near tie; and the transition happens when the longest row (by the bounds)
reaches a chunk, which after a ``reorder_cache`` that dropped the longest rows can be earlier than today's
(the same buckets whenever the layer's ``num_buckets`` is already set and its hashing is seeded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from reformer_kernels.ops.decode_attention import decode_attention

__all__ = ["ReformerDynamicCache", "lsh_decode_step", "local_decode_step"]


class _LayerCache:
    """One layer's buffers and bookkeeping (see the module docstring)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, num_real: torch.Tensor, bounds):
        self.keys = keys  # [B, H, capacity, D]: LSH query-key projections, or local keys
        self.values = values  # [B, H, capacity, D]
        self.length = length  # cached positions L (padding included), host
        self.position = torch.full((1,), length, dtype=torch.int64, device=keys.device)  # [1] == L, on the device
        self.num_real = num_real  # [B] int64 real cached tokens per row
        self.real_min, self.real_max = bounds  # host bounds on num_real (exact after prefill, kept by reorders)
        self.steps = 0
        self.buckets: torch.Tensor | None = None  # [B, H, R, capacity] int32 once hashed
        self.num_hashes: int | None = None
        self.num_buckets: int | None = None
        self.window: int | None = None
        self.counts: torch.Tensor | None = None  # [B, H, R, nb] int64
        self.slots: torch.Tensor | None = None  # [B, H, R, (nb + 1) * (2T + 1)] int32
        self.window_offsets: torch.Tensor | None = None  # [T] 0 .. T - 1
        self.shifted_offsets: tuple[int, torch.Tensor] | None = None  # (s, [T] -s .. T - 1 - s): _window_offsets
        self.round_offsets: torch.Tensor | None = None  # [1, 1, R, 1] r * (nb + 1), once nb is known
        self.span_offsets: torch.Tensor | None = None  # [S + 1] -S .. 0: a GPU local step's window around slot L
        self.last_index: torch.Tensor | None = None  # the last step's LSH window positions [B, H, R, T]
        # a CPU index's host views (_insert_on_host): (counts' and slots' addresses, their [B*H*R, -1] NumPy views)
        self.host_index: tuple[int, int, Any, Any] | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "values", "num_real", "buckets", "counts", "slots")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _written(name: str, tensor: torch.Tensor, length: int) -> torch.Tensor:
    """The part of a layer's tensor that holds cached data: the first ``length`` slots of the growing buffers."""
    if name in ("keys", "values"):
        return tensor[:, :, :length]
    if name == "buckets":
        return tensor[..., :length]
    return tensor


def _as_cached(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.detach().to(dtype)``, calling neither where it would return ``tensor`` itself (a decoding step writes
    a few of these per layer: each call skipped is one dispatch less)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _check_projection(name: str, tensor, batch_size: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise ValueError(
            f"{name} must be a [batch, heads, length, head_dim] tensor; got {getattr(tensor, 'shape', tensor)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {tensor.dtype}")
    if batch_size is not None and tensor.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {tensor.shape[0]} but the cache holds {batch_size} rows")


class ReformerDynamicCache:
    """Per-layer cached projections and LSH buckets in preallocated buffers (see the module docstring).

    Args:
        max_cache_len: capacity (cached positions, padding included) of every layer's buffers, allocated at the
            prefill and never reallocated (a static cache, for CUDA graphs); a step past it raises. ``None``:
            the capacity grows by doubling.

    Wiring: after the prompt forward each attention layer calls ``prefill`` with its projections (and, for LSH
    layers that hashed, the buckets); each one-token step calls ``lsh_decode_step`` / ``local_decode_step``
    with the new token's projections, which append it in place and return the attention output.
    ``decode_steps`` counts the steps every layer took (read-only: the steps count themselves).
    """

    # dynamic capacity: the prompt length rounded up to a multiple of this, then doubling
    capacity_quantum = 256

    def __init__(self, max_cache_len: int | None = None) -> None:
        if max_cache_len is not None and (
            not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1
        ):
            raise ValueError(f"max_cache_len must be None or a positive int; got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.layers: list[_LayerCache] = []
        self._bounds: tuple[int, int] | None = None

    # ---------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        """The number of cached layers."""
        return len(self.layers)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Cached positions of a layer (padding included)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        return self.layers[layer_idx].length if len(self) > layer_idx else 0

    def get_start_idx(self) -> int:
        """Position of the next token when no ``attention_mask``/``position_ids`` say otherwise."""
        return self.get_seq_length(0)

    @property
    def _seen_tokens(self) -> int:
        return self.get_seq_length(0)

    @property
    def batch_size(self) -> int | None:
        return self.layers[0].keys.shape[0] if len(self) else None

    @property
    def decode_steps(self) -> int:
        """One-token steps taken by every cached layer since the prefill."""
        return min((layer.steps for layer in self.layers), default=0)

    @property
    def buckets_cache(self) -> list[torch.Tensor]:
        """Per layer the cached bucket ids ``[B, H, R, L]`` (views), or an empty tensor (local / not hashed)."""
        return [
            layer.buckets[..., : layer.length]
            if layer.buckets is not None
            else layer.keys.new_empty(0, dtype=torch.int32)
            for layer in self.layers
        ]

    def cached_projections(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of a layer, ``[B, H, L, D]`` views (LSH: query-key projections and values)."""
        layer = self.layers[layer_idx]
        return layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]

    def capacity(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].capacity

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(
        self,
        layer_idx: int,
        key: torch.Tensor,
        value: torch.Tensor,
        buckets: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Cache a layer's prompt: ``key [B, H, L, D]`` (LSH: the query-key projection; local: the key projection),
        ``value [B, H, L, D]``, for LSH layers that hashed the prompt ``buckets [B, H, R, L]`` (cache layout,
        already offset; the ids at padding are ignored and become the pad bucket at the first step), and
        ``real [B, L]`` (True / 1 at tokens, False / 0 at padding; left-padded, the same for every layer) or None.
        Layers are cached in order, once each.
        """
        if layer_idx != len(self):
            raise ValueError(
                f"layers must be prefilled in order, once each: got layer {layer_idx} with {len(self)} cached"
            )
        _check_projection("key", key, self.batch_size)
        _check_projection("value", value, self.batch_size)
        if value.shape != key.shape or value.dtype != key.dtype or value.device != key.device:
            raise ValueError(
                f"value ({tuple(value.shape)}, {value.dtype}) must match key ({tuple(key.shape)}, {key.dtype})"
            )
        batch_size, num_heads, length, head_dim = key.shape
        if length == 0:
            raise ValueError("key must hold at least one position")
        if len(self) and length != self.layers[0].length:
            raise ValueError(f"layer {layer_idx} caches {length} positions but layer 0 caches {self.layers[0].length}")
        if buckets is not None:
            if (
                not isinstance(buckets, torch.Tensor)
                or buckets.dim() != 4
                or (buckets.shape[0], buckets.shape[1], buckets.shape[3]) != (batch_size, num_heads, length)
                or buckets.shape[2] < 1
            ):
                raise ValueError(
                    f"buckets must be a [batch, heads, rounds, length] = ({batch_size}, {num_heads}, R, {length}) "
                    f"tensor; got {getattr(buckets, 'shape', buckets)}"
                )
            if buckets.is_floating_point() or buckets.dtype == torch.bool:
                raise TypeError(f"buckets must be an integer tensor; got {buckets.dtype}")
        if real is not None and (not isinstance(real, torch.Tensor) or tuple(real.shape) != (batch_size, length)):
            raise ValueError(
                f"real must be a [batch, length] = ({batch_size}, {length}) tensor; got {getattr(real, 'shape', real)}"
            )

        capacity = self._initial_capacity(length)
        device = key.device
        keys = key.new_empty(batch_size, num_heads, capacity, head_dim)  # [B, H, capacity, D]
        values = key.new_empty(batch_size, num_heads, capacity, head_dim)  # [B, H, capacity, D]
        if real is None:
            keys[:, :, :length] = key.detach()
            values[:, :, :length] = value.detach()
            num_real = torch.full((batch_size,), length, dtype=torch.int64, device=device)
            bounds = (length, length)
        else:
            real = real.to(device=device).bool()
            # padded rows are never attended to; zeros keep them finite
            keep = real[:, None, :, None]  # [B, 1, L, 1]
            keys[:, :, :length] = torch.where(keep, key.detach(), 0)
            values[:, :, :length] = torch.where(keep, value.detach(), 0)
            num_real = real.sum(-1)  # [B]
            # one host read per prompt: the layers share the padding
            bounds = self._bounds if layer_idx > 0 and self._bounds is not None else self._real_bounds(real, num_real)
        layer = _LayerCache(keys, values, length, num_real, bounds)
        if buckets is not None:
            layer.num_hashes = buckets.shape[2]
            layer.buckets = torch.empty(
                batch_size, num_heads, layer.num_hashes, capacity, dtype=torch.int32, device=device
            )  # [B, H, R, capacity]
            layer.buckets[..., :length] = buckets
        self.layers.append(layer)

    @classmethod
    def merge_left_padded(
        cls,
        groups: Sequence[tuple[torch.Tensor, ReformerDynamicCache]],
        batch_size: int,
        hash_fns: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        max_cache_len: int | None = None,
    ) -> ReformerDynamicCache:
        """One left-padded batch cache from the prompt caches of row groups (``reformer.generation``'s prefill of
        left-padded prompts longer than a chunk runs one forward per prompt length).

        ``groups``: ``(rows [n], cache)`` pairs, each cache prefilled (no steps) with ``n`` unpadded prompts of one
        length, the rows they take in the batch; together the rows cover ``0 .. batch_size - 1`` once. A layer
        that some groups hashed and others did not (prompts within a chunk) gets the others' buckets from
        ``hash_fns[layer_idx]`` (the layer's ``hash_fn`` of ``lsh_decode_step``) on their cached query-key
        projections.
        """
        if not groups:
            raise ValueError("groups must hold at least one (rows, cache) pair")
        rows_seen = torch.cat([torch.as_tensor(rows).reshape(-1) for rows, _ in groups])
        if sorted(rows_seen.tolist()) != list(range(batch_size)):
            raise ValueError(f"the groups' rows must cover 0 .. {batch_size - 1} once each; got {rows_seen.tolist()}")
        num_layers = len(groups[0][1])
        for _, cache in groups:
            if len(cache) != num_layers or any(layer.steps for layer in cache.layers):
                raise ValueError("every group's cache must hold the prompt of every layer, before any step")
        width = max(cache.get_seq_length() for _, cache in groups)
        first = groups[0][1].layers[0].keys
        real = torch.zeros(batch_size, width, dtype=torch.bool, device=first.device)  # [B, W]
        for rows, cache in groups:
            real[torch.as_tensor(rows, device=first.device), width - cache.get_seq_length() :] = True
        merged = cls(max_cache_len)
        for layer_idx in range(num_layers):
            parts = [(torch.as_tensor(rows, device=first.device), cache.layers[layer_idx]) for rows, cache in groups]
            keys = parts[0][1].keys
            shape = (batch_size, keys.shape[1], width, keys.shape[3])
            key, value = keys.new_zeros(shape), keys.new_zeros(shape)  # [B, H, W, D]
            hashed = [layer.buckets is not None for _, layer in parts]
            buckets = None
            if any(hashed):
                num_hashes = next(layer.num_hashes for _, layer in parts if layer.buckets is not None)
                buckets = torch.zeros(
                    batch_size, keys.shape[1], num_hashes, width, dtype=torch.int32, device=keys.device
                )  # [B, H, R, W]
            for rows, layer in parts:
                start = width - layer.length
                key[rows, :, start:] = layer.keys[:, :, : layer.length]
                value[rows, :, start:] = layer.values[:, :, : layer.length]
                if buckets is None:
                    continue
                if layer.buckets is None:
                    if hash_fns is None or layer_idx not in hash_fns:
                        raise ValueError(
                            f"layer {layer_idx}: a group was not hashed while others were; pass its hash_fn in hash_fns"
                        )
                    group_buckets = _hash(
                        hash_fns[layer_idx], layer.keys[:, :, : layer.length], buckets.shape[2], "merge_left_padded"
                    )
                else:
                    if layer.num_hashes != buckets.shape[2]:
                        raise ValueError(f"layer {layer_idx}: the groups were hashed with different num_hashes")
                    group_buckets = layer.buckets[..., : layer.length]
                buckets[rows, :, :, start:] = group_buckets.to(torch.int32)
            merged.prefill(layer_idx, key, value, buckets, real)
        return merged

    def _initial_capacity(self, length: int) -> int:
        if self.max_cache_len is not None:
            if length > self.max_cache_len:
                raise ValueError(f"the prompt has {length} positions, more than max_cache_len={self.max_cache_len}")
            return self.max_cache_len
        return _round_up(length + 1, self.capacity_quantum)

    def _real_bounds(self, real: torch.Tensor, num_real: torch.Tensor) -> tuple[int, int]:
        """Host bounds of the rows' real lengths, and the left-padding check: one host read, at layer 0's prefill."""
        left_padded = (real[:, 1:] >= real[:, :-1]).all() if real.shape[1] > 1 else real.new_ones((), dtype=torch.bool)
        low, high, ok = torch.stack([num_real.min(), num_real.max(), left_padded.long()]).tolist()
        if not ok:
            raise ValueError("real must be left-padded: padding (False / 0) only before the first real token of a row")
        self._bounds = (low, high)
        return self._bounds

    # ---------------------------------------------------------------------------------------------- updates
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select / reorder the batch rows (beam search, ``num_return_sequences``): ``beam_idx [B']`` row numbers.

        With ``B' == B`` the buffers are rewritten in place (their addresses stay), else replaced.
        """
        if not isinstance(beam_idx, torch.Tensor) or beam_idx.dim() != 1 or beam_idx.is_floating_point():
            raise ValueError(f"beam_idx must be a 1-D integer tensor; got {getattr(beam_idx, 'shape', beam_idx)}")
        for layer in self.layers:
            index = beam_idx.to(device=layer.keys.device, dtype=torch.int64)
            same_size = index.numel() == layer.keys.shape[0]
            for name, tensor in layer.tensors().items():
                selected = _written(name, tensor, layer.length).index_select(0, index)
                if not same_size:
                    setattr(layer, name, tensor.new_empty((index.numel(), *tensor.shape[1:])))
                _written(name, getattr(layer, name), layer.length).copy_(selected)
            # a selection of rows keeps the bounds valid (each selected row is one of the old rows)

    def _append(self, layer: _LayerCache, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write the new token's projections ``[B, H, 1, D]`` at slot ``L`` (growing the buffers if full)."""
        if layer.length + 1 > layer.capacity:
            self._grow(layer, layer.length + 1)
        layer.keys.index_copy_(2, layer.position, _as_cached(key, layer.keys.dtype))
        layer.values.index_copy_(2, layer.position, _as_cached(value, layer.values.dtype))

    def _grow(self, layer: _LayerCache, needed: int) -> None:
        if self.max_cache_len is not None:
            raise ValueError(
                f"a step needs {needed} cached positions, more than max_cache_len={self.max_cache_len}: build the "
                "cache with a larger max_cache_len (or None to grow it)"
            )
        capacity = max(needed, 2 * layer.capacity)
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[3])  # [B, H, capacity, D]
            new[:, :, : layer.length] = old[:, :, : layer.length]
            setattr(layer, name, new)
        if layer.buckets is not None:
            new = layer.buckets.new_empty(*layer.buckets.shape[:3], capacity)  # [B, H, R, capacity]
            new[..., : layer.length] = layer.buckets[..., : layer.length]
            layer.buckets = new

    def _finish_step(self, layer: _LayerCache) -> None:
        """The new token (always real) is now cached."""
        layer.length += 1
        layer.position += 1
        layer.num_real += 1
        layer.real_min += 1
        layer.real_max += 1
        layer.steps += 1

    def _layer(self, layer_idx: int, name: str, *tensors: tuple[str, Any]) -> _LayerCache:
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self):
            raise ValueError(f"layer_idx={layer_idx!r} is not a cached layer (the cache holds {len(self)})")
        layer = self.layers[layer_idx]
        batch_size, num_heads, _, head_dim = layer.keys.shape
        for arg, tensor in tensors:
            _check_projection(arg, tensor)
            if tuple(tensor.shape) != (batch_size, num_heads, 1, head_dim):
                raise ValueError(
                    f"{name}: {arg} must be the new token's [batch, heads, 1, head_dim] = "
                    f"({batch_size}, {num_heads}, 1, {head_dim}) tensor; got {tuple(tensor.shape)}"
                )
        return layer


# ==================================================================================================
# the LSH bucket index
# ==================================================================================================
def _round_offsets(num_hashes: int, num_buckets: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(num_hashes, device=device) * (num_buckets + 1)).view(1, 1, -1, 1)  # [1, 1, R, 1]


def _layer_round_offsets(layer: _LayerCache) -> torch.Tensor:
    """``_round_offsets`` of the layer's cached buckets, built once (the same for every step)."""
    if layer.round_offsets is None:
        layer.round_offsets = _round_offsets(layer.num_hashes, layer.num_buckets, layer.keys.device)
    return layer.round_offsets


def _build_index(layer: _LayerCache, length: int, num_real: torch.Tensor) -> None:
    """Counts and head / tail slots of the real tokens among the first ``length`` cached positions (one sort);
    ``num_real [B]``: how many of them are real (the last ones of each row)."""
    num_buckets, window = layer.num_buckets, layer.window
    stride = 2 * window + 1
    device = layer.keys.device
    raw = layer.buckets[..., :length].long() - _round_offsets(layer.num_hashes, num_buckets, device)  # [B, H, R, n]
    positions = torch.arange(length, device=device)  # [n]
    # padding (a left prefix of each row) goes to the extra bucket nb, whatever its id says
    first_real = length - num_real.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    raw = torch.where(positions < first_real, num_buckets, raw)  # [B, H, R, n]
    order = torch.sort(raw, dim=-1, stable=True).indices  # [B, H, R, n] positions in bucket order
    sorted_buckets = raw.gather(-1, order)  # [B, H, R, n]
    counts = torch.zeros(*raw.shape[:3], num_buckets + 1, dtype=torch.int64, device=device)  # [B, H, R, nb + 1]
    counts.scatter_add_(-1, raw, torch.ones_like(raw))
    first = counts.cumsum(-1) - counts  # [B, H, R, nb + 1] first rank of each bucket
    within = positions - first.gather(-1, sorted_buckets)  # [B, H, R, n] index within the bucket
    count = counts.gather(-1, sorted_buckets)  # [B, H, R, n]
    base = sorted_buckets * stride  # [B, H, R, n]
    head_slot = torch.where(within < window, within, 2 * window)  # [B, H, R, n]
    tail_slot = torch.where(within >= count - window, window + within % window, 2 * window)  # [B, H, R, n]
    slots = torch.zeros(*raw.shape[:3], (num_buckets + 1) * stride, dtype=torch.int32, device=device)
    values = order.to(torch.int32)  # [B, H, R, n]
    # the slots 2T (and bucket nb) absorb the writes that must not land; nothing reads them
    slots.scatter_(-1, base + head_slot, values)
    slots.scatter_(-1, base + tail_slot, values)
    layer.counts = counts[..., :num_buckets].contiguous()  # [B, H, R, nb]
    layer.slots = slots
    layer.window_offsets = torch.arange(window, device=device)  # [T]


# Up to this many index rows (B * H * R), a CPU step updates the index with host integers (``_insert_on_host``)
HOST_INDEX_ROWS = 16


def _insert(layer: _LayerCache, bucket: torch.Tensor) -> None:
    """Append the token at slot ``L`` to its bucket ``bucket [B, H, R, 1]`` (raw ids, in ``[0, nb)``)."""
    if (
        layer.slots.device.type == "cpu"
        and bucket.numel() <= HOST_INDEX_ROWS
        and layer.counts.is_contiguous()
        and layer.slots.is_contiguous()  # (a NumPy reshape of anything else would write into a copy)
    ):
        _insert_on_host(layer, bucket)
        return
    window = layer.window
    stride = 2 * window + 1
    within = layer.counts.gather(-1, bucket)  # [B, H, R, 1]
    layer.counts.scatter_(-1, bucket, within + 1)
    # head slot `within` if < T; within [T, 2T) that is the tail slot T + within % T (written anyway); beyond,
    # the spare slot 2T
    head_slot = within.clamp(max=2 * window)  # [B, H, R, 1]
    tail_slot = torch.remainder(within, window).add_(window)  # [B, H, R, 1]
    targets = torch.cat([head_slot, tail_slot], dim=-1).add_(bucket * stride)  # [B, H, R, 2]
    if layer.slots.device.type == "cpu":
        layer.slots.scatter_(-1, targets, layer.length)  # the slot L, known on the host
    else:
        # from the device (no host-side number in a GPU step: CUDA graphs)
        position = layer.position.to(torch.int32).view(1, 1, 1, 1).expand_as(targets)  # [B, H, R, 2]
        layer.slots.scatter_(-1, targets, position)


def _insert_on_host(layer: _LayerCache, bucket: torch.Tensor) -> None:
    """``_insert``'s writes as host integers, through NumPy views of the CPU index (the same memory): for a few index
    rows, a few scalar writes each instead of ten operator calls."""
    window, position = layer.window, layer.length
    stride = 2 * window + 1
    addresses = (layer.counts.data_ptr(), layer.slots.data_ptr())
    # made again for other memory: new index tensors, or a copy of the cache (whose views deepcopy copied as arrays)
    if layer.host_index is None or layer.host_index[:2] != addresses:
        counts = layer.counts.numpy().reshape(-1, layer.counts.shape[-1])  # [B*H*R, nb] view
        slots = layer.slots.numpy().reshape(-1, layer.slots.shape[-1])  # [B*H*R, (nb + 1) * (2T + 1)] view
        layer.host_index = (*addresses, counts, slots)
    _, _, counts, slots = layer.host_index
    bucket_ids = [bucket_id for row in bucket.tolist() for head in row for ids in head for bucket_id in ids]
    for row, bucket_id in enumerate(bucket_ids):
        within = int(counts[row, bucket_id])
        counts[row, bucket_id] = within + 1
        base = bucket_id * stride
        slots[row, base + min(within, 2 * window)] = position  # head slot, or the spare slot 2T
        slots[row, base + window + within % window] = position  # tail slot


def _window_offsets(layer: _LayerCache, shift: int) -> torch.Tensor:
    """``layer.window_offsets - shift`` (``[T]``: ``-shift .. T - 1 - shift``), built once per shift."""
    if layer.shifted_offsets is None or layer.shifted_offsets[0] != shift:
        layer.shifted_offsets = (shift, layer.window_offsets - shift)
    return layer.shifted_offsets[1]


def _window_positions(layer: _LayerCache, bucket: torch.Tensor, chunk_length: int, num_chunks_before: int):
    """Cache positions ``[B, H, R, T]`` (int32) of the new token's window, the new token being indexed."""
    window = layer.window
    stride = 2 * window + 1
    counts = layer.counts  # [B, H, R, nb]
    through = counts.cumsum(-1)  # [B, H, R, nb] tokens in buckets <= k
    first = through - counts  # [B, H, R, nb] first rank of bucket k
    num_real = through[..., -1:]  # [B, H, R, 1] real tokens, the new one included
    # the new token is the last of its bucket: its rank is the number of tokens in buckets <= its own, minus one
    rank = through.gather(-1, bucket) - 1  # [B, H, R, 1]
    # the window starts at (rank // chunk - before) * chunk: ranks rank - rank % chunk + (t - before * chunk)
    chunk_start = rank - torch.remainder(rank, chunk_length)  # [B, H, R, 1]
    # wrap around the row's real tokens only
    offsets = _window_offsets(layer, num_chunks_before * chunk_length)  # [T]
    ranks = torch.remainder(chunk_start + offsets, num_real)  # [B, H, R, T]
    owner = torch.searchsorted(through, ranks, right=True)  # [B, H, R, T] bucket of each rank
    within = ranks - first.gather(-1, owner)  # [B, H, R, T]
    # head slot `within` if < T, else tail slot T + within % T (for within in [T, 2T) the two are equal)
    slot = torch.minimum(within, torch.remainder(within, window).add_(window))  # [B, H, R, T]
    return layer.slots.gather(-1, slot.add_(owner * stride))  # [B, H, R, T]


# ==================================================================================================
# one-token steps
# ==================================================================================================
def _check_window(name: str, **numbers: int) -> None:
    for arg, number in numbers.items():
        low = 1 if arg in ("chunk_length", "num_hashes") else 0
        if not isinstance(number, int) or isinstance(number, bool) or number < low:
            raise ValueError(f"{name}: {arg} must be an int >= {low}; got {number!r}")


@torch.compiler.disable
def lsh_decode_step(
    cache: ReformerDynamicCache,
    layer_idx: int,
    query_key: torch.Tensor,
    value: torch.Tensor,
    hash_fn: Callable[[torch.Tensor], torch.Tensor],
    num_buckets: int | Callable[[], int],
    num_hashes: int,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    append: bool = True,
) -> torch.Tensor:
    """One new token per row through a cached LSH layer; appends it to the cache in place.

    Args:
        query_key, value: the new token's projections ``[B, H, 1, D]`` (the layer's shared query-key and value).
        hash_fn: the layer's hashing, ``vectors [B, H, n, D] -> buckets [B, H, R, n]`` in the cache layout (round
            ``r`` offset by ``r * (nb + 1)``); called on the new token, or once on every cached query-key
            projection when the layer first hashes (padding is given the pad bucket here).
        num_buckets: the product of the layer's bucket factors ``nb``, or a callable returning it after
            ``hash_fn`` ran (a layer whose ``num_buckets`` its first hashing sets).
        num_hashes, chunk_length, num_chunks_before, num_chunks_after: the layer's.
        append: False for a step that reads the cache and leaves it as it was (transformers' ``use_cache=False``
            with a cache): see ``_keep_or_undo``.

    Returns:
        ``[B, H, 1, D]``: the attention output of the new token (``reformer.generation.lsh_attention_step``'s).
    """
    name = "lsh_decode_step"
    layer = cache._layer(layer_idx, name, ("query_key", query_key), ("value", value))
    _check_window(
        name,
        num_hashes=num_hashes,
        chunk_length=chunk_length,
        num_chunks_before=num_chunks_before,
        num_chunks_after=num_chunks_after,
    )
    if layer.num_hashes is not None and layer.num_hashes != num_hashes:
        raise ValueError(
            f"num_hashes={num_hashes} differs from the {layer.num_hashes} hash rounds of the cached buckets"
        )
    window = chunk_length * (1 + num_chunks_before + num_chunks_after)
    if layer.window is not None and layer.window != window:
        raise ValueError(
            f"{name}: chunk_length * (1 + num_chunks_before + num_chunks_after) = {window} differs from the "
            f"{layer.window} this layer's cached bucket index was built for"
        )
    batch_size, num_heads, _, head_dim = query_key.shape
    length = layer.length  # L: the new token goes to slot L
    past_min, past_max, steps = layer.real_min, layer.real_max, layer.steps
    saved = None if append else _state(layer)
    cache._append(layer, query_key, value)
    device = layer.keys.device

    bucket = None  # [B, H, R, 1] raw id of the new token
    if layer.buckets is None and past_max + 1 >= chunk_length:
        # the sequence reached a chunk: hash every cached token once (transformers' transition)
        hashed = _hash(hash_fn, layer.keys[:, :, : length + 1], num_hashes, name)  # [B, H, R, L + 1]
        layer.num_buckets, layer.window = _num_buckets(num_buckets, name), window
        layer.num_hashes = num_hashes
        layer.buckets = torch.empty(
            batch_size, num_heads, num_hashes, layer.capacity, dtype=torch.int32, device=device
        )  # [B, H, R, capacity]
        layer.buckets[..., : length + 1] = hashed
        _pad_buckets(layer, length + 1, layer.num_real + 1)
        _build_index(layer, length + 1, layer.num_real + 1)
        bucket = hashed[..., length:].long() - _layer_round_offsets(layer)  # [B, H, R, 1]
    elif layer.buckets is not None:
        hashed = _hash(hash_fn, query_key, num_hashes, name)  # [B, H, R, 1]
        if layer.counts is None:
            # first step after a hashed prompt: the index of the prompt's tokens, once
            layer.num_buckets, layer.window = _num_buckets(num_buckets, name), window
            _pad_buckets(layer, length, layer.num_real)
            _build_index(layer, length, layer.num_real)
        layer.buckets.index_copy_(3, layer.position, hashed if hashed.dtype == torch.int32 else hashed.int())
        bucket = hashed.long()  # [B, H, R, 1]
        if num_hashes > 1:
            bucket -= _layer_round_offsets(layer)  # raw ids: round r's offset r * (nb + 1) off
        _insert(layer, bucket)

    # which rows attend through their bucket window: past the first chunk (and, after a prompt of exactly one
    # chunk, from the second step on: transformers hashes only once the cached sequence reaches a chunk)
    def windowed_bound(num_past: int) -> bool:
        return num_past > chunk_length or (num_past == chunk_length and steps > 0)

    any_windowed = windowed_bound(past_max)
    all_windowed = windowed_bound(past_min)
    if any_windowed and layer.counts is None:
        raise RuntimeError("internal error: an LSH row needs its bucket window but the layer has not hashed")
    query = query_key[:, :, 0]  # [B, H, D]
    self_index = layer.position.expand(batch_size)  # [B] the new token's slot
    out = None
    if any_windowed:
        positions = _window_positions(layer, bucket, chunk_length, num_chunks_before)  # [B, H, R, T]
        layer.last_index = positions
        out = decode_attention(
            query, layer.keys, layer.values, positions, True, self_index=self_index, validate=False
        )  # [B, H, D]
    if not all_windowed:
        # rows within a chunk: every real cached token (at most one chunk, at the end of the cache) and itself
        span = min(length, chunk_length)
        positions = layer.position - span + torch.arange(span + 1, device=device)  # [S + 1]
        key_start = (span - layer.num_real).clamp(min=0)  # [B] padding entries first
        full = decode_attention(
            query,
            layer.keys,
            layer.values,
            positions.view(1, 1, 1, -1).expand(batch_size, num_heads, 1, -1),
            True,
            key_start=key_start,
            self_index=self_index,
            validate=False,
        )  # [B, H, D]
        if out is None:
            out = full
        else:
            num_past = layer.num_real  # [B] (the new token is not counted yet)
            windowed = (num_past > chunk_length) | ((num_past == chunk_length) & (steps > 0))  # [B]
            out = torch.where(windowed.view(batch_size, 1, 1), out, full)  # [B, H, D]
    _keep_or_undo(cache, layer, saved)
    return out.unsqueeze(2)


@torch.compiler.disable
def local_decode_step(
    cache: ReformerDynamicCache,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    chunk_length: int,
    num_chunks_before: int,
    append: bool = True,
) -> torch.Tensor:
    """One new token per row through a cached local layer (``query/key/value [B, H, 1, D]``); appends it in place
    (``append=False``: leaves the cache as it was, as in ``lsh_decode_step``).

    The query attends to the cached keys from the start of the chunk ``num_chunks_before`` chunks before its own
    (transformers' ``_retrieve_relevant_hidden_states``, counted in each row's real tokens) and to itself.
    Returns ``[B, H, 1, D]``.
    """
    name = "local_decode_step"
    layer = cache._layer(layer_idx, name, ("query", query), ("key", key), ("value", value))
    _check_window(name, chunk_length=chunk_length, num_chunks_before=num_chunks_before)
    batch_size, num_heads = query.shape[:2]
    length = layer.length
    saved = None if append else _state(layer)
    cache._append(layer, key, value)
    num_past = layer.num_real  # [B]
    span = min(length, (num_chunks_before + 1) * chunk_length)
    # transformers keeps past[start:] with start = (n // chunk - before) * chunk, a Python slice (negative: from
    # the end); entry t is cache position L - S + t, real index t - S + num_past; those before `start` are masked
    on_cpu = layer.keys.device.type == "cpu"
    skipped = 0  # leading window entries left out of a CPU slice
    if on_cpu and layer.real_min == layer.real_max:
        # every row holds the same number n of real tokens (known on the host): the masked entries are the first
        # key_start of the window, left out of the slice instead (their probabilities are exp(-1e9 - lse) = 0 in
        # fp32: the same sums, up to rounding); the new token (entry S) is never among them
        skipped, key_start = _local_key_start(layer.real_min, span, chunk_length, num_chunks_before), None
    elif layer.real_min >= (num_chunks_before + 1) * chunk_length:
        # every row past its first (before + 1) chunks: start >= 0 and S = (before + 1) * chunk, so
        # start + S - n = chunk - n % chunk
        key_start = chunk_length - torch.remainder(num_past, chunk_length)  # [B]
    else:
        start = (torch.div(num_past, chunk_length, rounding_mode="floor") - num_chunks_before) * chunk_length  # [B]
        start = torch.where(start >= 0, start, (num_past + start).clamp(min=0))  # [B]
        key_start = (start + span - num_past).clamp(min=0)  # [B]
    if on_cpu:
        # the window is the last S + 1 cached positions: on CPU their slice is read in place
        window = slice(length - span + skipped, length + 1)  # cache positions L - S + skipped .. L
        keys, values, positions = layer.keys[:, :, window], layer.values[:, :, window], None
    else:
        # on a GPU the positions are computed on the device from `position`, so that a step has no host-side number
        # in it (CUDA graphs)
        if layer.span_offsets is None or layer.span_offsets.shape[0] != span + 1:
            # S stops changing once the cache holds (before + 1) chunks
            layer.span_offsets = torch.arange(-span, 1, device=layer.keys.device)  # [S + 1]
        keys, values = layer.keys, layer.values
        positions = (layer.position + layer.span_offsets).view(1, 1, 1, -1).expand(batch_size, num_heads, 1, -1)
    out = decode_attention(
        query[:, :, 0], keys, values, positions, False, key_start=key_start, validate=False
    )  # [B, H, D]
    _keep_or_undo(cache, layer, saved)
    return out.unsqueeze(2)


def _local_key_start(num_past: int, span: int, chunk_length: int, num_chunks_before: int) -> int:
    """``local_decode_step``'s ``key_start`` of a row with ``num_past`` real cached tokens, in host integers: the
    window entries (of ``S + 1 = span + 1``) before transformers' ``start`` of the kept past."""
    start = (num_past // chunk_length - num_chunks_before) * chunk_length
    start = start if start >= 0 else max(num_past + start, 0)
    return max(start + span - num_past, 0)


def _state(layer: _LayerCache) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A layer's state before a step that must not keep its token: its attributes, and copies of the index tensors
    a step updates in place (``counts``, ``slots``). What else a step writes lies beyond the cached length (slot
    ``L`` of the buffers and buckets) or is what a later step writes anyway (the pad bucket at padding)."""
    copies = {name: getattr(layer, name).clone() for name in ("counts", "slots") if getattr(layer, name) is not None}
    return dict(vars(layer)), copies


def _keep_or_undo(cache: ReformerDynamicCache, layer: _LayerCache, saved) -> None:
    """Keep the step's token (``saved`` None), or put the layer back as ``_state`` saved it: its attributes (an index
    or bucket buffer this step built, or buffers it grew, are dropped; the old buffers still hold every cached
    position) and its index tensors in place (an O(index) copy, for this rare call only; their addresses stay)."""
    if saved is None:
        cache._finish_step(layer)
        return
    attributes, copies = saved
    vars(layer).clear()
    vars(layer).update(attributes)
    for name, copy in copies.items():
        getattr(layer, name).copy_(copy)


def _hash(hash_fn, vectors: torch.Tensor, num_hashes: int, name: str) -> torch.Tensor:
    buckets = hash_fn(vectors)
    expected = (*vectors.shape[:2], num_hashes, vectors.shape[2])
    if not isinstance(buckets, torch.Tensor) or tuple(buckets.shape) != expected:
        raise ValueError(
            f"{name}: hash_fn must return buckets [batch, heads, num_hashes, n] = {expected}; got "
            f"{getattr(buckets, 'shape', buckets)}"
        )
    if buckets.is_floating_point() or buckets.dtype == torch.bool:
        raise TypeError(f"{name}: hash_fn must return integer bucket ids; got {buckets.dtype}")
    return buckets


def _num_buckets(num_buckets, name: str) -> int:
    value = num_buckets() if callable(num_buckets) else num_buckets
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{name}: num_buckets must be a positive int (the product of the bucket factors); got {value!r}"
        )
    return value


def _pad_buckets(layer: _LayerCache, length: int, num_real: torch.Tensor) -> None:
    """Give the padding among the first ``length`` positions (``num_real [B]`` of them real) the pad bucket."""
    device = layer.keys.device
    padding = torch.arange(length, device=device) < length - num_real.view(-1, 1, 1, 1)  # [B, 1, 1, L]
    pad_ids = _round_offsets(layer.num_hashes, layer.num_buckets, device) + layer.num_buckets  # [1, 1, R, 1]
    view = layer.buckets[..., :length]
    view.copy_(torch.where(padding, pad_ids.to(torch.int32), view))
