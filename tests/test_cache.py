"""The in-place decoding cache (``reformer.cache``) against today's cached steps (``reformer.generation``).

A real tiny model is decoded with ``reformer.generation``'s cache and steps (transformers' semantics, each
left-padded row as if alone). Forward hooks on every attention layer record each step's layer-normed input and
output. The same inputs, projected by the layer's own modules, drive ``lsh_decode_step`` / ``local_decode_step``
on a ``ReformerDynamicCache`` prefilled from the same prompt: every step's output must equal today's (<= 1e-5,
relative to the step's largest output when that exceeds 1: see ``_error``),
the cached buckets must be the same ids, and the LSH window positions found through the bucket index must equal
those of today's sort over the whole cache (recomputed here from the cached buckets, as ``lsh_attention_step``
does). Also: left-padded rows equal the row alone, ``reorder_cache``, capacity doubling without per-step
reallocation, a static capacity, bad input, and no host synchronisation in a step.

The models use ``initializer_range=0.3`` and random LayerNorm / position parameters (as tests/test_generation.py)
so that which keys a step sees changes the outputs by O(0.1-1).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from model_testing import tiny_config

import reformer
from reformer import generation
from reformer.cache import ReformerDynamicCache, local_decode_step, lsh_decode_step
from reformer.generation import hash_for_cache
from reformer_kernels.ops.lsh_hash import num_buckets_product

OUT_ATOL = 1e-5


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` in units of ``max(1, max |expected|)``. The outputs here reach |8| (large weights
    and LayerNorm scales), where fp32 numbers are ~1e-6 apart: the two sides compute the same sums in another order
    (cached vs re-projected keys and values, a fused kernel's online softmax), so their rounding scales with the
    output; for outputs within [-1, 1] this is the plain max-abs error."""
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


BASE = tiny_config(
    axial_pos_shape=[8, 16],
    axial_pos_embds_dim=[12, 20],
    max_position_embeddings=128,
    lsh_num_chunks_after=0,
    local_num_chunks_after=0,
    num_buckets=4,
    num_hashes=1,
    is_decoder=True,
    initializer_range=0.3,
    eos_token_id=None,
)


def _model(seed: int = 0, **overrides) -> reformer.ReformerModelWithLMHead:
    torch.manual_seed(seed)
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**{**BASE, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(
                    (1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn(param.shape, generator=generator)
                )
            elif "position_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1
    return ids, mask


def _attention_layers(model):
    return [layer.attention.self_attention for layer in model.reformer.encoder.layers]


class _Recorder:
    """Each attention layer's (normed input [B, 1, hidden], output [B, 1, H*D]) of today's cached steps."""

    def __init__(self, model):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [attn.register_forward_hook(self._hook, with_kwargs=True) for attn in _attention_layers(model)]

    def _hook(self, module, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.records.append((hidden_states.detach().clone(), output.hidden_states.detach().clone()))

    def take(self):
        records, self.records = self.records, []
        return records

    def remove(self):
        for handle in self.handles:
            handle.remove()


class _Ours:
    """Our cache and steps, driven by the layers' own modules (projections, hashing)."""

    def __init__(self, model, num_hashes: int, **cache_kwargs):
        self.model = model
        self.attns = _attention_layers(model)
        self.num_hashes = num_hashes
        self.cache = ReformerDynamicCache(**cache_kwargs)

    def prefill(self, today: reformer.generation.ReformerDynamicCache, real: torch.Tensor | None) -> None:
        """From today's cached states (the layer-normed prompt) and buckets."""
        for layer_idx, attn in enumerate(self.attns):
            states = today.states_cache[layer_idx]  # [B, L, hidden]
            if isinstance(attn, reformer.modeling_reformer.LSHSelfAttention):
                key, value = attn._split_heads(attn.query_key(states)), attn._split_heads(attn.value(states))
                buckets = today.buckets_cache[layer_idx]
                buckets = buckets if buckets.numel() else None
            else:
                key, value = attn._split_heads(attn.key(states)), attn._split_heads(attn.value(states))
                buckets = None
            self.cache.prefill(layer_idx, key, value, buckets, real)

    def step(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        attn = self.attns[layer_idx]
        if isinstance(attn, reformer.modeling_reformer.LSHSelfAttention):
            out = lsh_decode_step(
                self.cache,
                layer_idx,
                attn._split_heads(attn.query_key(hidden_states)),
                attn._split_heads(attn.value(hidden_states)),
                hash_fn=lambda vectors: hash_for_cache(attn, vectors, self.num_hashes, None),
                num_buckets=lambda: num_buckets_product(attn.num_buckets),
                num_hashes=self.num_hashes,
                chunk_length=attn.chunk_length,
                num_chunks_before=attn.num_chunks_before,
                num_chunks_after=attn.num_chunks_after,
            )
        else:
            out = local_decode_step(
                self.cache,
                layer_idx,
                attn._split_heads(attn.query(hidden_states)),
                attn._split_heads(attn.key(hidden_states)),
                attn._split_heads(attn.value(hidden_states)),
                chunk_length=attn.chunk_length,
                num_chunks_before=attn.num_chunks_before,
            )
        return attn._merge_heads(out)


def _todays_prefill(model, ids, real, left_padded: bool, num_hashes: int):
    """The prompt through today's cache: ``(next-token logits [B, V], cache)``; a left-padded batch as
    ``reformer.generation`` prefills it (each row as if alone)."""
    if not left_padded:
        out = model(ids, use_cache=True, num_hashes=num_hashes, return_dict=True)
        return out.logits[:, -1], out.past_buckets_states
    prefill = getattr(generation, "prefill_left_padded", None)  # its name since generation moved to GenerationMixin
    if prefill is not None:
        return prefill(model, ids, real, num_hashes)
    return generation._prefill(model, ids, real, True, num_hashes)


def _windows_by_sort(buckets: torch.Tensor, num_real: torch.Tensor, attn, num_hashes: int) -> torch.Tensor:
    """``reformer.generation.lsh_attention_step``'s window positions ``[B, H, R, T]`` of the last cached token,
    by a stable sort of all cached buckets ``[B, H, R, L + 1]`` (``num_real [B]``: real tokens, the new one
    included)."""
    length = buckets.shape[-1] - 1
    num_buckets = num_buckets_product(attn.num_buckets)
    offsets = (torch.arange(num_hashes) * (num_buckets + 1)).view(1, 1, -1, 1)
    raw = buckets.long() - offsets  # [B, H, R, L + 1]
    sorted_pos = torch.sort(raw, dim=-1, stable=True).indices
    rank = (raw[..., :length] <= raw[..., length:]).sum(-1)  # [B, H, R]
    chunk = attn.chunk_length
    window = chunk * (1 + attn.num_chunks_before + attn.num_chunks_after)
    start = (torch.div(rank, chunk, rounding_mode="floor") - attn.num_chunks_before) * chunk
    ranks = torch.remainder(start.unsqueeze(-1) + torch.arange(window), num_real.view(-1, 1, 1, 1))
    return sorted_pos.gather(-1, ranks)


class _Lockstep:
    """Today's cache (``reformer.generation``, through the model) and ours, stepped together with greedy tokens.

    Every step runs the model once on today's cache; the recorded per-layer inputs drive our steps and our
    outputs are compared with today's (``errors``), and after each layer the cached buckets and (for rows past
    their first chunk) the window positions are checked (``check``).
    """

    def __init__(self, model, ids, mask=None, num_hashes=1, check=True, cache=None, **cache_kwargs):
        self.model, self.num_hashes, self.check = model, num_hashes, check
        self.left_padded = mask is not None and not bool(mask.bool().all())
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        self.ours = _Ours(model, num_hashes, **cache_kwargs)
        with torch.no_grad():
            self.logits, self.today = _todays_prefill(model, ids, real, self.left_padded, num_hashes)
            if cache is None:
                self.ours.prefill(self.today, real if self.left_padded else None)
            else:
                self.ours.cache = cache
        self.step_mask = real.long()
        self.num_real = real.sum(-1, keepdim=True)
        self.steps = 0
        self.tokens: list[torch.Tensor] = []
        self.outputs: list[list[torch.Tensor]] = []  # per step, our per-layer outputs [B, 1, H*D]
        self.errors: list[float] = []
        self.step_wrapper = None  # e.g. a host-read guard around our steps

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            token = self.logits.argmax(-1)  # [B]
            self.tokens.append(token)
            self.step_mask = torch.cat([self.step_mask, self.step_mask.new_ones(token.shape[0], 1)], dim=1)
            recorder = _Recorder(self.model)
            try:
                with torch.no_grad():
                    out = self.model(
                        token[:, None],
                        attention_mask=self.step_mask if self.left_padded else None,
                        position_ids=self.num_real + self.steps,
                        past_buckets_states=self.today,
                        use_cache=True,
                        num_hashes=self.num_hashes,
                    )
            finally:
                recorder.remove()
            self.logits, self.today = out.logits[:, -1], out.past_buckets_states
            outputs = []
            with torch.no_grad():
                for layer_idx, (hidden_states, expected) in enumerate(recorder.take()):
                    if self.step_wrapper is None:
                        actual = self.ours.step(layer_idx, hidden_states)
                    else:
                        actual = self.step_wrapper(self.ours.step, layer_idx, hidden_states)
                    outputs.append(actual)
                    self.errors.append(_error(actual, expected))
                    if self.check:
                        _check_layer(self.ours, self.today, layer_idx, self.num_hashes, self.steps)
            self.outputs.append(outputs)
            self.steps += 1

    def reorder(self, order: torch.Tensor) -> None:
        self.today.reorder_cache(order)
        self.ours.cache.reorder_cache(order)
        self.logits, self.step_mask, self.num_real = self.logits[order], self.step_mask[order], self.num_real[order]


def _check_layer(ours: _Ours, today, layer_idx: int, num_hashes: int, step: int) -> None:
    attn = ours.attns[layer_idx]
    layer = ours.cache.layers[layer_idx]
    assert layer.length == today.states_cache[layer_idx].shape[1]
    if not isinstance(attn, reformer.modeling_reformer.LSHSelfAttention):
        return
    expected = today.buckets_cache[layer_idx]
    actual = ours.cache.buckets_cache[layer_idx]
    assert actual.shape == expected.shape and torch.equal(actual.long(), expected.long()), f"buckets, step {step}"
    num_real = layer.num_real  # after the step: the new token included
    chunk = attn.chunk_length
    windowed = (num_real - 1 > chunk) | ((num_real - 1 == chunk) & (layer.steps > 1))
    if windowed.any():
        by_sort = _windows_by_sort(actual, num_real, attn, num_hashes)
        assert torch.equal(layer.last_index.long()[windowed], by_sort[windowed]), f"window positions, step {step}"


# --------------------------------------------------------------------------------------------------
# parity with today's steps
# --------------------------------------------------------------------------------------------------
# (overrides, prompt length): within one chunk, exactly one chunk, several chunks (chunk 8), 1 and 4 rounds
PARITY = {
    "R1-P5-within": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 5),
    "R1-P8-one-chunk": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 8),
    "R1-P29-chunks": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 29),
    "R4-P8-one-chunk": (dict(attn_layers=["lsh", "local", "lsh"], num_hashes=4), 8),
    "R4-P37-chunks": (dict(attn_layers=["lsh", "local", "lsh"], num_hashes=4), 37),
    "R2-c4-before2-P13": (
        dict(
            attn_layers=["lsh", "local"],
            num_hashes=2,
            lsh_attn_chunk_length=4,
            lsh_num_chunks_before=2,
            local_num_chunks_before=2,
        ),
        13,
    ),  # fmt: skip
    "R2-before0-factors-P19": (
        dict(attn_layers=["lsh", "lsh"], num_hashes=2, lsh_num_chunks_before=0, num_buckets=[2, 4]),
        19,
    ),
    "R1-nb-unset-P3": (dict(attn_layers=["lsh", "local"], num_buckets=None), 3),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_steps_equal_todays(case):
    overrides, prompt_len = PARITY[case]
    model = _model(**overrides)
    run = _Lockstep(model, _ids(2, prompt_len, seed=1), num_hashes=model.config.num_hashes)
    run.step(40)
    assert len(run.errors) == 40 * len(model.config.attn_layers)
    assert max(run.errors) <= OUT_ATOL, run.errors
    # every LSH layer went through its bucket window (40 steps pass the first chunk whatever the prompt)
    for layer, kind in zip(run.ours.cache.layers, model.config.attn_layers):
        assert (layer.last_index is not None) == (kind == "lsh")
        assert layer.steps == 40
    assert run.ours.cache.decode_steps == 40 and run.ours.cache.get_seq_length() == prompt_len + 40


def test_comparison_is_sensitive(monkeypatch):
    """A wrong window changes the outputs far beyond the tolerance: windows shifted by one chunk do."""
    import reformer.cache as cache_module

    original = cache_module._window_positions

    def shifted(layer, bucket, chunk_length, num_chunks_before):
        return original(layer, bucket, chunk_length, num_chunks_before - 1)

    monkeypatch.setattr(cache_module, "_window_positions", shifted)
    model = _model(attn_layers=["local", "lsh"])
    run = _Lockstep(model, _ids(1, 21, seed=2), check=False)
    run.step(12)
    assert max(run.errors) > 1e-2


# --------------------------------------------------------------------------------------------------
# left-padded batches
# --------------------------------------------------------------------------------------------------
LEFT_PADDED = {
    "mixed-P3..29-R1": (dict(attn_layers=["local", "lsh", "local", "lsh"]), [3, 13, 8, 29, 9]),
    "within-chunk-P1..8-R4": (dict(attn_layers=["lsh", "local", "lsh"], num_hashes=4), [3, 7, 1, 8]),
    "c4-before2-R2": (
        dict(attn_layers=["lsh", "local"], num_hashes=2, lsh_attn_chunk_length=4, lsh_num_chunks_before=2),
        [2, 9, 4, 17],
    ),
}


@pytest.mark.parametrize("case", list(LEFT_PADDED))
def test_left_padded_rows_equal_todays_and_the_row_alone(case):
    overrides, lengths = LEFT_PADDED[case]
    model = _model(**overrides)
    prompts = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = _left_pad(prompts)
    batched = _Lockstep(model, ids, mask, num_hashes=model.config.num_hashes)
    batched.step(24)
    assert max(batched.errors) <= OUT_ATOL, batched.errors
    for row, prompt in enumerate(prompts):
        alone = _Lockstep(model, prompt[None], num_hashes=model.config.num_hashes, check=False)
        alone.step(24)
        assert torch.equal(torch.stack(alone.tokens, 1)[0], torch.stack(batched.tokens, 1)[row]), f"row {row}"
        for step, (ours_batched, ours_alone) in enumerate(zip(batched.outputs, alone.outputs)):
            for layer_idx, (b, a) in enumerate(zip(ours_batched, ours_alone)):
                assert _error(b[row : row + 1], a) <= OUT_ATOL, f"row {row} step {step} layer {layer_idx}"


def test_merged_row_groups_equal_todays_left_padded_batch():
    """``merge_left_padded``: per-length prompt caches (hashed and unhashed groups) merged into one left-padded
    batch decode as today's merged cache does."""
    model = _model(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2)
    lengths = [3, 13, 8, 29, 13]
    prompts = [_ids(1, n, seed=70 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = _left_pad(prompts)
    groups = []
    with torch.no_grad():
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length])
            group = _Ours(model, 2)
            group.prefill(
                model(ids[rows, ids.shape[1] - length :], use_cache=True, num_hashes=2).past_buckets_states, None
            )
            groups.append((rows, group.cache))
        hash_fns = {
            i: (lambda vectors, attn=attn: hash_for_cache(attn, vectors, 2, None))
            for i, attn in enumerate(_attention_layers(model))
            if isinstance(attn, reformer.modeling_reformer.LSHSelfAttention)
        }
        assert {cache.layers[1].buckets is None for _, cache in groups} == {True, False}
        merged = ReformerDynamicCache.merge_left_padded(groups, len(lengths), hash_fns)
    assert merged.get_seq_length() == 29 and merged.batch_size == 5
    run = _Lockstep(model, ids, mask, num_hashes=2, cache=merged)
    run.step(16)
    assert max(run.errors) <= OUT_ATOL, run.errors
    with pytest.raises(ValueError, match="pass its hash_fn"):
        ReformerDynamicCache.merge_left_padded(groups, len(lengths))
    with pytest.raises(ValueError, match="cover 0 .. 5 once"):
        ReformerDynamicCache.merge_left_padded(groups, 6, hash_fns)


# --------------------------------------------------------------------------------------------------
# reorder, capacity
# --------------------------------------------------------------------------------------------------
def test_reorder_cache_selects_rows():
    model = _model(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2)
    prompts = [_ids(1, n, seed=30 + n)[0] for n in (12, 5, 20)]
    run = _Lockstep(model, *_left_pad(prompts), num_hashes=2)
    run.step(6)
    before = [
        (layer.keys.data_ptr(), layer.counts is None or layer.counts.data_ptr()) for layer in run.ours.cache.layers
    ]
    run.reorder(torch.tensor([2, 0, 0]))
    # the same number of rows: rewritten in place
    assert [
        (layer.keys.data_ptr(), layer.counts is None or layer.counts.data_ptr()) for layer in run.ours.cache.layers
    ] == before
    run.step(6)
    run.reorder(torch.tensor([1, 2]))
    assert run.ours.cache.batch_size == 2
    run.step(6)
    assert max(run.errors) <= OUT_ATOL, run.errors


def _buffers(cache: ReformerDynamicCache) -> list[tuple]:
    return [
        (
            layer.capacity,
            layer.keys.data_ptr(),
            layer.values.data_ptr(),
            layer.buckets is not None and layer.buckets.data_ptr(),
        )
        for layer in cache.layers
    ]


def _poison_unwritten_slots(cache: ReformerDynamicCache) -> None:
    """NaN in every slot not yet written: a step that read one would return NaN."""
    for layer in cache.layers:
        layer.keys[:, :, layer.length :] = float("nan")
        layer.values[:, :, layer.length :] = float("nan")


def test_capacity_doubles_and_buffers_stay_between_doublings(monkeypatch):
    monkeypatch.setattr(ReformerDynamicCache, "capacity_quantum", 16)
    model = _model(attn_layers=["local", "lsh"], num_hashes=2)
    run = _Lockstep(model, _ids(2, 11, seed=40), num_hashes=2)
    _poison_unwritten_slots(run.ours.cache)
    history = [_buffers(run.ours.cache)]
    index = None
    for _ in range(60):
        run.step()
        history.append(_buffers(run.ours.cache))
        lsh = run.ours.cache.layers[1]
        if index is None:
            index = (lsh.counts.data_ptr(), lsh.slots.data_ptr())
        assert (lsh.counts.data_ptr(), lsh.slots.data_ptr()) == index  # the bucket index is never reallocated
    assert max(run.errors) <= OUT_ATOL, run.errors
    for layer_idx in range(2):
        capacities = [entry[layer_idx][0] for entry in history]
        assert sorted(set(capacities)) == [16, 32, 64, 128]
        for previous, current in zip(history, history[1:]):
            (old_capacity, *old), (capacity, *new) = previous[layer_idx], current[layer_idx]
            if old[2] is False:
                # no bucket buffer before the LSH layer first hashed (local layers: never)
                old, new = old[:2], new[:2]
            # buffers change exactly when the capacity doubles
            assert all((n != o) == (capacity != old_capacity) for n, o in zip(new, old)), (previous, current)


def test_static_capacity_is_never_reallocated():
    model = _model(attn_layers=["lsh", "local"], num_hashes=2)
    run = _Lockstep(model, _ids(2, 11, seed=41), num_hashes=2, max_cache_len=20)
    _poison_unwritten_slots(run.ours.cache)
    first = _buffers(run.ours.cache)
    run.step(9)
    assert max(run.errors) <= OUT_ATOL
    assert [entry[:3] for entry in _buffers(run.ours.cache)] == [entry[:3] for entry in first]
    assert run.ours.cache.get_seq_length() == 20 == run.ours.cache.capacity()
    with pytest.raises(ValueError, match="max_cache_len=20"):
        run.step()
    with pytest.raises(ValueError, match="more than max_cache_len=4"):
        _Lockstep(model, _ids(1, 5, seed=1), max_cache_len=4)


# --------------------------------------------------------------------------------------------------
# backends, host synchronisation, no sort
# --------------------------------------------------------------------------------------------------
def test_steps_on_the_triton_backend_equal_todays():
    import reformer_kernels

    if not reformer_kernels.triton_available():
        pytest.skip("Triton is not installed")
    model = _model(attn_layers=["local", "lsh"], num_hashes=2)
    prompts = [_ids(1, n, seed=50 + n)[0] for n in (6, 13)]
    run = _Lockstep(model, *_left_pad(prompts), num_hashes=2)

    def on_triton(step, layer_idx, hidden_states):
        with reformer_kernels.backend("triton"):
            return step(layer_idx, hidden_states)

    run.step_wrapper = on_triton
    run.step(12)
    assert max(run.errors) <= OUT_ATOL, run.errors


_SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
_SORTS = ((torch, "sort"), (torch, "argsort"), (torch.Tensor, "sort"), (torch.Tensor, "argsort"))


@pytest.mark.parametrize(
    "lengths, sort_steps",
    [((3, 7, 13), [0, 0]), ((3, 6), [1, 1])],
    ids=["hashed-prompt", "transition"],
)
def test_steps_have_no_host_synchronisation_and_no_sort(lengths, sort_steps):
    """No step reads a tensor value on the host (the transition, the first index build, windowed rows and rows
    still within a chunk in one batch, the layer's hashing included), and no step sorts but the one that builds
    a layer's bucket index: the first step after a hashed prompt, or the transition (the longest row reaching a
    chunk of 8 tokens)."""
    model = _model(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2)
    prompts = [_ids(1, n, seed=60 + n)[0] for n in lengths]
    run = _Lockstep(model, *_left_pad(prompts), num_hashes=2, check=False)
    reads: list[tuple] = []
    sorts: list[int] = []

    def guard(method_name, original):
        def checked(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            site = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) if frame else ("?", "?")
            reads.append((*site, method_name))
            return original(self, *args, **kwargs)

        return checked

    def counting(original):
        def counted(*args, **kwargs):
            sorts.append(run.steps)
            return original(*args, **kwargs)

        return counted

    def guarded_step(step, layer_idx, hidden_states):
        with pytest.MonkeyPatch.context() as patch:
            for method_name in _SYNCING_METHODS:
                patch.setattr(torch.Tensor, method_name, guard(method_name, getattr(torch.Tensor, method_name)))
            for owner, name in _SORTS:
                patch.setattr(owner, name, counting(getattr(owner, name)))
            return step(layer_idx, hidden_states)

    run.step_wrapper = guarded_step
    run.step(20)
    assert reads == [], f"host reads of tensor values in a decoding step: {sorted(set(reads))}"
    # one sort per LSH layer, to build its index
    assert sorts == sort_steps, sorts
    assert max(run.errors) <= OUT_ATOL
    # the guard was live: it sees a host read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "item", guard("item", torch.Tensor.item))
        torch.ones(1).item()
    assert reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_have_no_cuda_sync():
    device = "cuda"
    batch, heads, length, head_dim, chunk = 2, 2, 40, 16, 8
    generator = torch.Generator().manual_seed(0)
    rotations = torch.randn(heads, head_dim, 2, 2, generator=generator).to(device)

    def hash_fn(vectors):
        # 4 buckets per round (argmax of [xR, -xR]), round r offset by r * (4 + 1)
        rotated = torch.einsum("bhld,hdrk->bhrlk", vectors, rotations)  # [B, H, R, L, 2]
        offsets = (torch.arange(2, device=device) * 5).view(1, 1, 2, 1)
        return torch.argmax(torch.cat([rotated, -rotated], -1), -1) + offsets  # [B, H, R, L]

    cache = ReformerDynamicCache(max_cache_len=64)
    key = torch.randn(batch, heads, length, head_dim, device=device)
    cache.prefill(
        0, key, torch.randn_like(key), hash_fn(key), torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    cache.prefill(1, key, torch.randn_like(key))

    def one_step():
        new = torch.randn(batch, heads, 1, head_dim, device=device)
        lsh_decode_step(cache, 0, new, new, hash_fn, 4, 2, chunk, 1, 0)
        local_decode_step(cache, 1, new, new, new, chunk, 1)

    one_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# the cache API and bad input
# --------------------------------------------------------------------------------------------------
def test_cache_api():
    cache = ReformerDynamicCache()
    assert len(cache) == 0 and cache.get_seq_length() == 0 and cache.batch_size is None and cache.decode_steps == 0
    key = torch.randn(3, 2, 10, 4)
    cache.prefill(0, key, key + 1)
    cache.prefill(1, key, key + 2, buckets=torch.zeros(3, 2, 2, 10, dtype=torch.int32))
    assert len(cache) == 2 and cache.get_seq_length(1) == 10 == cache.get_start_idx() and cache.batch_size == 3
    assert cache.capacity() == 256 and cache.buckets_cache[0].numel() == 0
    assert cache.buckets_cache[1].shape == (3, 2, 2, 10)
    keys, values = cache.cached_projections(0)
    assert torch.equal(keys, key) and torch.equal(values, key + 1)
    with pytest.raises(AttributeError):
        cache.decode_steps += 1  # steps count themselves
    # the rows' real lengths are read once, at the first prefill given a padding mask
    padded = ReformerDynamicCache()
    padded.prefill(0, key, key)
    padded.prefill(1, key, key, real=torch.arange(10).expand(3, 10) >= torch.tensor([[0], [4], [7]]))
    assert (padded.layers[0].real_min, padded.layers[0].real_max) == (10, 10)
    assert (padded.layers[1].real_min, padded.layers[1].real_max) == (3, 10)
    assert padded.layers[1].num_real.tolist() == [10, 6, 3]


def test_bad_input():
    key = torch.randn(2, 2, 6, 4)
    cache = ReformerDynamicCache()
    with pytest.raises(ValueError, match="in order"):
        cache.prefill(1, key, key)
    with pytest.raises(ValueError, match="key must be a"):
        cache.prefill(0, key[0], key[0])
    with pytest.raises(TypeError, match="key must be floating point"):
        cache.prefill(0, key.long(), key.long())
    with pytest.raises(ValueError, match="value .* must match key"):
        cache.prefill(0, key, key[:, :, :5])
    with pytest.raises(ValueError, match="buckets must be a"):
        cache.prefill(0, key, key, buckets=torch.zeros(2, 2, 1, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="buckets must be an integer"):
        cache.prefill(0, key, key, buckets=torch.zeros(2, 2, 1, 6))
    with pytest.raises(ValueError, match="real must be a"):
        cache.prefill(0, key, key, real=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="real must be left-padded"):
        cache.prefill(0, key, key, real=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="max_cache_len"):
        ReformerDynamicCache(max_cache_len=0)
    cache.prefill(0, key, key, buckets=torch.zeros(2, 2, 2, 6, dtype=torch.int32))
    cache.prefill(1, key, key)
    with pytest.raises(ValueError, match="layer 2 caches 5 positions but layer 0 caches 6"):
        cache.prefill(2, key[:, :, :5], key[:, :, :5])
    with pytest.raises(ValueError, match="batch size 1 but the cache holds 2"):
        cache.prefill(2, key[:1], key[:1])
    new = torch.randn(2, 2, 1, 4)

    def hash_fn(vectors):
        return torch.zeros(2, 2, 2, vectors.shape[2], dtype=torch.int32)

    step = dict(hash_fn=hash_fn, num_buckets=2, num_hashes=2, chunk_length=4, num_chunks_before=1, num_chunks_after=0)
    with pytest.raises(ValueError, match="layer_idx=5 is not a cached layer"):
        lsh_decode_step(cache, 5, new, new, **step)
    with pytest.raises(ValueError, match="query_key must be the new token's"):
        lsh_decode_step(cache, 0, torch.randn(2, 2, 2, 4), new, **step)
    with pytest.raises(ValueError, match="num_hashes=3 differs from the 2 hash rounds"):
        lsh_decode_step(cache, 0, new, new, **{**step, "num_hashes": 3})
    with pytest.raises(ValueError, match="chunk_length must be an int >= 1"):
        lsh_decode_step(cache, 0, new, new, **{**step, "chunk_length": 0})
    with pytest.raises(ValueError, match="hash_fn must return buckets"):
        lsh_decode_step(cache, 0, new, new, **{**step, "hash_fn": lambda v: torch.zeros(2, 2, 1, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="num_buckets must be a positive int"):
        lsh_decode_step(cache, 0, new, new, **{**step, "num_buckets": lambda: None})
    assert cache.get_seq_length(0) == 6 and cache.layers[0].steps == 0  # nothing was appended by a refused step
    with pytest.raises(ValueError, match="key must be the new token's"):
        local_decode_step(cache, 1, new, new[:, :1], new, 4, 1)
