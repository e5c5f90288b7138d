"""The in-place decoding cache (``reformer.cache``) through the model's cached steps, against transformers' own cached
decoding (``past_buckets_states``) of the same weights.

The oracle and the comparison live in ``decoding_testing``: both models decode the same tokens; forward hooks on every
attention layer record each step's output, which must equal transformers' (``error`` <= 1e-5); the cached bucket ids
must be transformers' (round offsets remapped), the LSH window positions the cache's index finds must be the ones
transformers gathers and the ones a stable sort over all cached bucket ids gives (``windows_by_sort``), and the
cached projections must be transformers' cached states through its projections. A row of a left-padded batch is held
to transformers decoding that row alone. Also: the bucket index alone against the sort on adversarial bucket ids,
``merge_left_padded``, ``reorder_cache``, capacity doubling without per-step reallocation, a static capacity, the
Triton backend, no host synchronisation and no sort in a model step, the cache API and bad input.

The models use ``initializer_range=0.3`` and random LayerNorm / position parameters (as tests/test_generation.py)
so that which keys a step sees changes the outputs by O(0.1-1).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from decoding_testing import (
    assert_same_decoding,
    attention_layers,
    decode,
    error,
    hf_and_ours,
    is_lsh,
    left_pad,
    random_ids,
    windows_by_sort,
)
from model_testing import tiny_config

import reformer.cache as cache_module
import reformer_kernels
from reformer.cache import ReformerDynamicCache, local_decode_step, lsh_decode_step
from reformer.generation import hash_for_cache

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


def _config(**overrides) -> dict:
    return {**BASE, **overrides}


def _split(ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ids[:, :prompt_len], ids[:, prompt_len:]


def _rows_alone(hf, prompts, continuation, num_hashes):
    """transformers decoding each row alone: the oracle of a left-padded batch."""
    return [decode(hf, p[None], continuation[row : row + 1], num_hashes=num_hashes) for row, p in enumerate(prompts)]


# --------------------------------------------------------------------------------------------------
# parity with transformers' cached steps
# --------------------------------------------------------------------------------------------------
STEPS = 40
# (overrides, prompt length): within one chunk, exactly one chunk, several chunks (chunk 8), 1, 2 and 4 rounds
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
    # num_buckets unset: transformers sets it in the prompt forward (the padded length, 16)...
    "R1-nb-unset-P13": (dict(attn_layers=["lsh", "local"], num_buckets=None), 13),
    # ... or fails when the prompt fits in a chunk; ours then applies transformers' rule at the length where the
    # layer first hashes (a chunk): the oracle is transformers with that rule applied up front
    "R1-nb-unset-P3": (dict(attn_layers=["lsh", "local"], num_buckets=None), 3),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_steps_equal_transformers(case, tmp_path):
    overrides, prompt_len = PARITY[case]
    hf, ours = hf_and_ours(tmp_path, _config(**overrides))
    config = ours.config
    if config.num_buckets is None and prompt_len <= config.lsh_attn_chunk_length:
        for attn in attention_layers(hf):
            if is_lsh(attn):
                attn._set_num_buckets(attn.chunk_length)
    prompt, continuation = _split(random_ids(2, prompt_len + STEPS, seed=1), prompt_len)
    actual = decode(ours, prompt, continuation)
    for row, expected in enumerate(_rows_alone(hf, prompt, continuation, config.num_hashes)):
        assert_same_decoding(actual, expected, row=row)
        # every LSH layer went through its bucket window (40 steps pass the first chunk whatever the prompt)
        for layer_idx, kind in enumerate(config.attn_layers):
            assert any(windows[layer_idx] is not None for windows in expected.windows) == (kind == "lsh")
        assert actual.num_buckets == expected.num_buckets
    cache = actual.cache
    assert cache.decode_steps == STEPS and cache.get_seq_length() == prompt_len + STEPS


def test_comparison_is_sensitive(monkeypatch, tmp_path):
    """A wrong window changes the outputs far beyond the tolerance: windows shifted by one chunk do."""
    original = cache_module._window_positions

    def shifted(layer, bucket, chunk_length, num_chunks_before):
        return original(layer, bucket, chunk_length, num_chunks_before - 1)

    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh"]))
    prompt, continuation = _split(random_ids(1, 33, seed=2), 21)
    expected = decode(hf, prompt, continuation)
    monkeypatch.setattr(cache_module, "_window_positions", shifted)
    actual = decode(ours, prompt, continuation)
    errors = [error(a[1], e[1]) for a, e in zip(actual.outputs, expected.outputs)]
    assert max(errors) > 1e-2, errors
    with pytest.raises(AssertionError, match="step 0 layer 1: attention output error"):
        assert_same_decoding(actual, expected)


# --------------------------------------------------------------------------------------------------
# the bucket index alone, on adversarial bucket ids
# --------------------------------------------------------------------------------------------------
# (num_buckets, num_hashes, chunk_length, num_chunks_before, num_chunks_after, real prompt lengths, bucket weights):
# crowded buckets (far more tokens than a window: the tail rings), sparse ones, a skewed distribution, a row
# shorter than a window (the wrap repeats positions), and prompts within a chunk (the transition hashes them)
INDEX_CASES = {
    "crowded-nb2-R3-c4-before2": (2, 3, 4, 2, 0, [40, 6, 31], None),
    "sparse-nb16-R1-c4-before1-after1": (16, 1, 4, 1, 1, [25, 12], None),
    "skewed-nb8-R2-c8-before1": (8, 2, 8, 1, 0, [30, 17, 9], [20.0, 1, 1, 1, 1, 1, 1, 4]),
    "transition-nb4-R2-c8-before1": (4, 2, 8, 1, 0, [3, 6, 7], None),
}


@pytest.mark.parametrize("insert", ["host", "operators", "host-strided"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bucket_index_windows_equal_a_sort_over_the_cache(case, insert, monkeypatch):
    """``lsh_decode_step`` driven directly with bucket ids drawn from a table (``hash_fn`` looks them up by position,
    which the first coordinate of each key holds): at every step the window positions of every row past its first
    chunk equal ``windows_by_sort`` over all cached bucket ids. Each step's insertion into the index both ways: with
    host integers (``_insert_on_host``, a CPU index of few rows) and with tensor operators (every other index); and
    with the index tensors made non-contiguous before each step (batch and head dims swapped in memory), which the
    host path must leave to the operators (a NumPy reshape of them would be a copy)."""
    host_calls = []
    original_host_insert = cache_module._insert_on_host
    monkeypatch.setattr(cache_module, "HOST_INDEX_ROWS", 0 if insert == "operators" else 10**9)
    monkeypatch.setattr(
        cache_module,
        "_insert_on_host",
        lambda layer, bucket: host_calls.append(layer.counts.is_contiguous()) or original_host_insert(layer, bucket),
    )
    num_buckets, num_hashes, chunk, before, after, lengths, weights = INDEX_CASES[case]
    batch_size, num_heads, head_dim, steps = len(lengths), 2, 4, 50
    width = max(lengths)
    total = width + steps
    generator = torch.Generator().manual_seed(7)
    probs = torch.ones(num_buckets) if weights is None else torch.tensor(weights)
    table = torch.multinomial(probs, batch_size * num_heads * num_hashes * total, True, generator=generator)
    table = table.view(batch_size, num_heads, num_hashes, total)  # [B, H, R, positions] raw ids
    offsets = (torch.arange(num_hashes) * (num_buckets + 1)).view(1, 1, -1, 1)  # [1, 1, R, 1]

    def hash_fn(vectors):
        positions = vectors[..., 0].long()  # [B, H, n]
        return table.gather(-1, positions.unsqueeze(2).expand(-1, -1, num_hashes, -1)) + offsets  # [B, H, R, n]

    def keys(positions):
        key = torch.randn(batch_size, num_heads, positions.numel(), head_dim, generator=generator)
        key[..., 0] = positions.float()
        return key

    real = torch.arange(width) >= width - torch.tensor(lengths).view(-1, 1)  # [B, W] left-padded
    key = keys(torch.arange(width))
    hashed = width > chunk
    cache = ReformerDynamicCache()
    cache.prefill(0, key, torch.randn_like(key), hash_fn(key) if hashed else None, real)
    num_real = torch.tensor(lengths)
    windowed_steps = 0
    for step in range(steps):
        new = keys(torch.tensor([width + step]))
        layer = cache.layers[0]
        if insert == "host-strided" and layer.counts is not None:
            layer.counts = layer.counts.transpose(0, 1).contiguous().transpose(0, 1)
            layer.slots = layer.slots.transpose(0, 1).contiguous().transpose(0, 1)
        lsh_decode_step(cache, 0, new, new, hash_fn, num_buckets, num_hashes, chunk, before, after)
        # transformers' rule: a row attends through its window once it is past its first chunk (after a prompt of
        # exactly one chunk, from the second step on)
        windowed = (num_real > chunk) | ((num_real == chunk) & (step > 0))  # [B]
        num_real = num_real + 1
        if not windowed.any():
            continue
        windowed_steps += 1
        raw = cache.buckets_cache[0].long() - offsets  # [B, H, R, L + 1]
        by_sort = windows_by_sort(raw, num_real, chunk, before, after)
        found = cache.layers[0].last_index.long()
        assert torch.equal(found[windowed], by_sort[windowed]), f"step {step}"
    assert windowed_steps >= steps - chunk
    layer = cache.layers[0]
    assert layer.counts.sum(-1).eq(num_real.view(-1, 1, 1)).all()  # every real token counted once per round
    # the host path ran, on contiguous index tensors only (in "host-strided": at most the step that builds the index)
    assert bool(host_calls) == (insert == "host") or insert == "host-strided"
    assert all(host_calls) and len(host_calls) <= (1 if insert == "host-strided" else steps)
    assert insert != "host-strided" or not layer.counts.is_contiguous()


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
def test_left_padded_rows_equal_transformers_alone(case, tmp_path):
    """Each row of a left-padded batch (prefilled as ``generate`` does, stepped with the mask) decodes exactly as
    transformers decodes that row alone: outputs, buckets, windows, cached projections (padding: zeros)."""
    overrides, lengths = LEFT_PADDED[case]
    hf, ours = hf_and_ours(tmp_path, _config(**overrides))
    prompts = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    continuation = random_ids(len(prompts), 24, seed=3)
    batched = decode(ours, ids, continuation, mask=mask)
    for row, alone in enumerate(_rows_alone(hf, prompts, continuation, ours.config.num_hashes)):
        assert_same_decoding(batched, alone, row=row, pad=ids.shape[1] - lengths[row])


def _lsh_hash_fns(model, num_hashes: int) -> dict:
    return {
        i: (lambda vectors, attn=attn: hash_for_cache(attn, vectors, num_hashes, None))
        for i, attn in enumerate(attention_layers(model))
        if is_lsh(attn)
    }


def test_merged_row_groups_decode_as_each_row_alone(tmp_path):
    """``merge_left_padded``: per-length prompt caches (hashed and unhashed groups) merged into one left-padded batch
    decode every row as transformers decodes it alone."""
    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2))
    lengths = [3, 13, 8, 29, 13]
    prompts = [random_ids(1, n, seed=70 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    groups = []
    with torch.no_grad():
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length])
            out = ours(ids[rows, ids.shape[1] - length :], use_cache=True, num_hashes=2)
            groups.append((rows, out.past_buckets_states))
    hash_fns = _lsh_hash_fns(ours, 2)
    assert {cache.buckets_cache[1].numel() == 0 for _, cache in groups} == {True, False}
    merged = ReformerDynamicCache.merge_left_padded(groups, len(lengths), hash_fns)
    assert merged.get_seq_length() == 29 and merged.batch_size == 5
    continuation = random_ids(len(lengths), 16, seed=5)
    batched = decode(ours, ids, continuation, mask=mask, cache=merged)
    for row, alone in enumerate(_rows_alone(hf, prompts, continuation, 2)):
        assert_same_decoding(batched, alone, row=row, pad=ids.shape[1] - lengths[row])
    with pytest.raises(ValueError, match="pass its hash_fn"):
        ReformerDynamicCache.merge_left_padded(groups, len(lengths))
    with pytest.raises(ValueError, match="cover 0 .. 5 once"):
        ReformerDynamicCache.merge_left_padded(groups, 6, hash_fns)


# --------------------------------------------------------------------------------------------------
# reorder, capacity
# --------------------------------------------------------------------------------------------------
def _pointers(cache: ReformerDynamicCache) -> list[tuple]:
    return [(layer.keys.data_ptr(), layer.counts is None or layer.counts.data_ptr()) for layer in cache.layers]


def test_reorder_cache_selects_rows(tmp_path):
    """``reorder_cache`` with as many rows rewrites the buffers in place, with fewer replaces them; either way each
    row then decodes as the row it was selected from (transformers, that row alone)."""
    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2))
    lengths = [12, 5, 20]
    prompts = [random_ids(1, n, seed=30 + n)[0] for n in lengths]
    ids, mask = left_pad(prompts)
    continuation = random_ids(3, 18, seed=4)
    first, second = torch.tensor([2, 0, 0]), torch.tensor([1, 2])
    pointers = {}

    def after_step(step, cache):
        pointers[step] = _pointers(cache)

    batched = decode(
        ours, ids, continuation, mask=mask, after_step=after_step, reorders={5: first, 11: second}
    )  # fmt: skip
    assert pointers[6] == pointers[5]  # the same number of rows: rewritten in place
    assert batched.cache.batch_size == 2
    oracles = _rows_alone(hf, prompts, continuation, 2)
    segments = [(range(0, 6), torch.arange(3)), (range(6, 12), first), (range(12, 18), first[second])]
    for steps, source_rows in segments:
        for row, source in enumerate(source_rows.tolist()):
            pad = ids.shape[1] - lengths[source]
            last = steps.stop == 18
            assert_same_decoding(batched, oracles[source], row=row, pad=pad, steps=steps, check_projections=last)


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


def test_capacity_doubles_and_buffers_stay_between_doublings(monkeypatch, tmp_path):
    monkeypatch.setattr(ReformerDynamicCache, "capacity_quantum", 16)
    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh"], num_hashes=2))
    prompt, continuation = _split(random_ids(2, 71, seed=40), 11)
    history, index = [], []

    def after_step(step, cache):
        if step == -1:
            _poison_unwritten_slots(cache)
        history.append(_buffers(cache))
        lsh = cache.layers[1]
        index.append((lsh.counts.data_ptr(), lsh.slots.data_ptr()) if lsh.counts is not None else None)

    actual = decode(ours, prompt, continuation, after_step=after_step)
    for row, expected in enumerate(_rows_alone(hf, prompt, continuation, 2)):
        assert_same_decoding(actual, expected, row=row)
    # the bucket index is built at the first step and never reallocated
    assert index[0] is None and len(set(index[1:])) == 1 and None not in index[1:]
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


def test_static_capacity_is_never_reallocated(tmp_path):
    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["lsh", "local"], num_hashes=2))
    prompt, continuation = _split(random_ids(2, 20, seed=41), 11)
    history = []

    def after_step(step, cache):
        if step == -1:
            _poison_unwritten_slots(cache)
        history.append(_buffers(cache))

    cache = ReformerDynamicCache(max_cache_len=20)
    actual = decode(ours, prompt, continuation, cache=cache, after_step=after_step)
    assert actual.cache is cache
    for row, expected in enumerate(_rows_alone(hf, prompt, continuation, 2)):
        assert_same_decoding(actual, expected, row=row)
    assert all(entry == history[0] for entry in history) and history[0][0][3] is not False
    assert cache.get_seq_length() == 20 == cache.capacity()
    with pytest.raises(ValueError, match="max_cache_len=20"), torch.no_grad():
        ours(prompt[:, :1], past_buckets_states=cache, use_cache=True)
    assert cache.get_seq_length() == 20 and _buffers(cache) == history[0]
    with pytest.raises(ValueError, match="more than max_cache_len=4"), torch.no_grad():
        ours(prompt[:, :5], past_buckets_states=ReformerDynamicCache(max_cache_len=4), use_cache=True)


# --------------------------------------------------------------------------------------------------
# backends, host synchronisation, no sort
# --------------------------------------------------------------------------------------------------
_SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
_SORTS = ((torch, "sort"), (torch, "argsort"), (torch.Tensor, "sort"), (torch.Tensor, "argsort"))
# The only host reads a model step may do, each on CPU tensors only (on other devices they are torch._assert_async):
# ReformerModel._check_cached_step's left-padding check of the step's attention_mask (reformer.generation's
# check_left_padded), the new token's bucket ids that a CPU index of few rows is updated with (_insert_on_host),
# and the range checks of the token and position ids (the model's, and the fused embedding's on
# the Triton backend; the ids' check is reformer_kernels.validation's).
_ALLOWED_HOST_READS = {
    ("generation.py", "check_left_padded"),
    ("cache.py", "_insert_on_host"),
    ("validation.py", "check_index_range"),
    ("fused.py", "_check_ids"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "lengths, sort_steps",
    [((3, 7, 13), [0, 0]), ((3, 6), [1, 1])],
    ids=["hashed-prompt", "transition"],
)
def test_model_steps_have_no_host_synchronisation_and_no_sort(lengths, sort_steps, backend, tmp_path):
    """No model step reads a tensor value on the host (the transition, the first index build, windowed rows and
    rows still within a chunk in one batch, the layer's hashing included) but the CPU-only checks above, and no
    step sorts but the one that builds a layer's bucket index: the first step after a hashed prompt, or the
    transition (the longest row reaching a chunk of 8 tokens). On both backends (Triton: the interpreter on CPU),
    every row equal to transformers decoding it alone: this is also the Triton backend's parity test."""
    if backend == "triton" and not reformer_kernels.triton_available():
        pytest.skip("Triton is not installed")
    hf, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2))
    prompts = [random_ids(1, n, seed=60 + n)[0] for n in lengths]
    ids, mask = left_pad(prompts)
    # the interpreter is slow (seconds a step): four steps on Triton, still through the index build or the
    # transition, with windowed rows and rows within their first chunk in one batch
    continuation = random_ids(len(lengths), 20 if backend == "torch" else 4, seed=8)
    reads: list[tuple] = []
    allowed: list[tuple] = []
    sorts: list[int] = []
    current = [None]

    def guard(method_name, original):
        def checked(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back  # skip torch-internal frames
            site = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) if frame else ("?", "?")
            if site in _ALLOWED_HOST_READS and self.device.type == "cpu":
                allowed.append(site)
            else:
                reads.append((*site, method_name))
            return original(self, *args, **kwargs)

        return checked

    def counting(original):
        def counted(*args, **kwargs):
            sorts.append(current[0])
            return original(*args, **kwargs)

        return counted

    def guarded(call, step):
        current[0] = step
        with reformer_kernels.backend(backend), pytest.MonkeyPatch.context() as patch:
            for method_name in _SYNCING_METHODS:
                patch.setattr(torch.Tensor, method_name, guard(method_name, getattr(torch.Tensor, method_name)))
            for owner, name in _SORTS:
                patch.setattr(owner, name, counting(getattr(owner, name)))
            return call()

    batched = decode(ours, ids, continuation, mask=mask, step_wrapper=guarded)
    assert reads == [], f"host reads of tensor values in a decoding step: {sorted(set(reads))}"
    # one sort per LSH layer, to build its index
    assert sorts == sort_steps, sorts
    # the guard was live (it saw the allowed CPU checks)
    assert ("generation.py", "check_left_padded") in allowed and set(allowed) <= _ALLOWED_HOST_READS
    for row, alone in enumerate(_rows_alone(hf, prompts, continuation, 2)):
        assert_same_decoding(batched, alone, row=row, pad=ids.shape[1] - lengths[row])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_steps_have_no_cuda_sync(tmp_path):
    """On CUDA a model step (left-padded batch, mask over past and new token; windowed rows and a row within its
    first chunk) never synchronises with the host."""
    _, ours = hf_and_ours(tmp_path, _config(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2))
    ours = ours.to("cuda")
    prompts = [random_ids(1, n, seed=60 + n)[0] for n in (3, 13, 20)]
    ids, mask = left_pad(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    continuation = random_ids(3, 6, seed=9).cuda()
    cache = None

    def synchronising_steps(call, step):
        if step < 2:
            return call()  # the index build and the first use: outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return call()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    cache = decode(ours, ids, continuation, mask=mask, step_wrapper=synchronising_steps).cache
    assert cache.decode_steps == 6


# --------------------------------------------------------------------------------------------------
# a step that does not keep its token (use_cache=False with a cache)
# --------------------------------------------------------------------------------------------------
def _snapshot(cache: ReformerDynamicCache, addresses: bool = True) -> list[dict]:
    """Every layer's cached data (the written part of its buffers; bucket ids at real positions: those at padding
    are ignored) and bookkeeping, as values; with ``addresses``, where its index tensors live."""
    snapshot = []
    for layer in cache.layers:
        length = layer.length
        padding = torch.arange(length) < length - layer.num_real.view(-1, 1, 1, 1)  # [B, 1, 1, L]
        state = {
            "length": length,
            "steps": layer.steps,
            "bounds": (layer.real_min, layer.real_max),
            "position": layer.position.clone(),
            "keys": layer.keys[:, :, :length].clone(),
            "values": layer.values[:, :, :length].clone(),
            "num_real": layer.num_real.clone(),
            "buckets": None if layer.buckets is None else torch.where(padding, -1, layer.buckets[..., :length]),
            "counts": None if layer.counts is None else layer.counts.clone(),
            "slots": None if layer.slots is None else layer.slots.clone(),
        }
        if addresses:
            state["addresses"] = [None if t is None else t.data_ptr() for t in (layer.counts, layer.slots)]
        snapshot.append(state)
    return snapshot


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize(
    "lengths", [(13, 9), (3, 5)], ids=["hashed-prompt", "transition"]
)  # fmt: skip
def test_steps_without_append_leave_the_cache_as_it_was(lengths):
    """``append=False`` (what a model step with ``use_cache=False`` needs): the step returns what the appending step
    returns and leaves every layer as it was (the index tensors in place), whether it is the step that builds the
    bucket index, a later one, or the transition; the cache then decodes as if that step never happened."""
    import copy

    batch_size, num_heads, head_dim, chunk, num_buckets, num_hashes = len(lengths), 2, 4, 8, 4, 2
    generator = torch.Generator().manual_seed(11)
    rotations = torch.randn(num_heads, head_dim, num_hashes, num_buckets // 2, generator=generator)
    offsets = (torch.arange(num_hashes) * (num_buckets + 1)).view(1, 1, -1, 1)

    def hash_fn(vectors):
        rotated = torch.einsum("bhld,hdrk->bhrlk", vectors, rotations)  # [B, H, R, L, nb / 2]
        return torch.argmax(torch.cat([rotated, -rotated], -1), -1) + offsets  # [B, H, R, L]

    def randn(length):
        return torch.randn(batch_size, num_heads, length, head_dim, generator=generator)

    width = max(lengths)
    real = torch.arange(width) >= width - torch.tensor(lengths).view(-1, 1)  # [B, W]
    key, value = randn(width), randn(width)
    cache = ReformerDynamicCache()
    cache.prefill(0, key, value, hash_fn(key) if width > chunk else None, real)
    cache.prefill(1, key, value, None, real)

    def step(cache, new, append):
        lsh = lsh_decode_step(cache, 0, new, new, hash_fn, num_buckets, num_hashes, chunk, 1, 0, append=append)
        local = local_decode_step(cache, 1, new, new, new, chunk, 1, append=append)
        return lsh, local

    reference = copy.deepcopy(cache)
    checked = 0
    for count in range(8):
        new = randn(1)
        if count % 2 == 0:
            before = _snapshot(cache)
            kept_copy = copy.deepcopy(cache)
            expected = step(kept_copy, new, True)  # what the step returns when it keeps its token
            actual = step(cache, new, False)
            assert all(torch.equal(a, e) for a, e in zip(actual, expected)), f"step {count}: outputs"
            assert _same(_snapshot(cache), before), f"step {count}: the cache changed"
            checked += 1
        new = randn(1)
        expected = step(reference, new, True)
        actual = step(cache, new, True)
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), f"step {count}: outputs after"
        assert _same(_snapshot(cache, False), _snapshot(reference, False)), f"step {count}: caches differ"
    assert checked == 4 and cache.layers[0].counts is not None


# --------------------------------------------------------------------------------------------------
# the cache API and bad input
# --------------------------------------------------------------------------------------------------
def test_local_key_start_on_host_equals_the_device_formula():
    """A CPU local step whose rows all hold the same number of real tokens leaves the masked window entries out of
    its slice, counted on the host (``_local_key_start``): the device formula's count (both of its branches), for
    every chunk, chunks before, cached length and real count; the new token (entry S) is never masked."""
    from reformer.cache import _local_key_start

    for chunk in (1, 3, 8):
        for before in (0, 1, 2):
            for length in range(0, 5 * chunk + 3):
                span = min(length, (before + 1) * chunk)
                num_past = torch.arange(length + 1)  # [n]: every real count up to the cached length
                start = (torch.div(num_past, chunk, rounding_mode="floor") - before) * chunk
                start = torch.where(start >= 0, start, (num_past + start).clamp(min=0))
                general = (start + span - num_past).clamp(min=0)
                steady = chunk - torch.remainder(num_past, chunk)
                for n in range(length + 1):
                    host = _local_key_start(n, span, chunk, before)
                    assert host == int(general[n]), (chunk, before, length, n)
                    if n >= (before + 1) * chunk:
                        assert host == int(steady[n]), (chunk, before, length, n)
                    assert host <= span


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
