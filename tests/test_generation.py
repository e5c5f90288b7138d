"""Cached decoding and ``generate``: parity with transformers' ``past_buckets_states`` and ``generate``, cached vs
uncached logits (where they must agree, and why not elsewhere), left-padded batches vs one prompt at a time,
sampling, bad input, and a smoke run of ``examples/train_char_lm.py``. The step-by-step comparison with transformers'
cached decoding is ``decoding_testing``'s (tests/test_cache.py holds the cache's own tests).

The models use ``initializer_range=0.3`` and random LayerNorm / position parameters so that attention (hence
which keys a step sees) changes the logits by O(0.1-1): a wrong window or mask cannot hide under 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from decoding_testing import assert_same_decoding, decode, randomize_norms_and_positions
from decoding_testing import hf_and_ours as _hf_and_ours
from model_testing import tiny_config
from torch.utils.flop_counter import FlopCounterMode

import reformer
from reformer.generation import ReformerDynamicCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_ATOL = 1e-4

# the shared tiny config, causal, with two hash rounds over four buckets and no look-ahead (cached decoding)
BASE = tiny_config(
    axial_pos_shape=[8, 8],
    lsh_num_chunks_after=0,
    local_num_chunks_after=0,
    num_buckets=4,
    num_hashes=2,
    is_decoder=True,
    initializer_range=0.3,
    eos_token_id=None,
)


# 128 positions: prompts over several chunks and 64 new tokens (issue #14's functional target)
LONG = dict(axial_pos_shape=[8, 16], max_position_embeddings=128)


def _config(**overrides) -> dict:
    return {**BASE, **overrides}


def ours_model(seed: int = 0, **overrides) -> reformer.ReformerModelWithLMHead:
    torch.manual_seed(seed)
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**_config(**overrides)))
    randomize_norms_and_positions(model, seed)
    return model.eval()


def hf_and_ours(tmp_path, seed: int = 0, **overrides):
    """transformers' model (the oracle) and ours loaded from its checkpoint."""
    return _hf_and_ours(tmp_path, _config(**overrides), seed)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1
    return ids, mask


# configurations shared by the transformers comparisons: mixed layers, several rounds, prompts shorter than,
# equal to and longer than a chunk (padded and chunk-aligned prefill), two chunk lengths, two chunks before
PARITY_CASES = {
    "local-lsh-x2-R2-P5": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 5),
    "local-lsh-x2-R2-P8": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 8),
    "local-lsh-x2-R2-P13": (dict(attn_layers=["local", "lsh", "local", "lsh"]), 13),
    "lsh-local-R3-c4-P9": (dict(attn_layers=["lsh", "local"], num_hashes=3, lsh_attn_chunk_length=4), 9),
    "lsh-local-R2-before2-P7": (
        dict(attn_layers=["lsh", "local"], lsh_num_chunks_before=2, local_num_chunks_before=2),
        7,
    ),
    "lsh-lsh-R2-factors-P16": (dict(attn_layers=["lsh", "lsh"], num_buckets=[2, 4]), 16),
    # issue #14: prompts over several chunks, 1 and 4 rounds, 64 new tokens
    "local-lsh-x2-R1-P29-long": (dict(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=1, **LONG), 29),
    "lsh-local-lsh-R4-P37-long": (dict(attn_layers=["lsh", "local", "lsh"], num_hashes=4, **LONG), 37),
}


# --------------------------------------------------------------------------------------------------
# transformers parity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, new",
    [
        ("local-lsh-x2-R2-P13", 40),
        ("lsh-local-R3-c4-P9", 40),
        ("local-lsh-x2-R2-P5", 40),
        ("local-lsh-x2-R1-P29-long", 64),
        ("lsh-local-lsh-R4-P37-long", 64),
    ],
)
def test_greedy_generate_matches_transformers(case, new, tmp_path):
    """Greedy tokens equal transformers' ``generate`` (which decodes with its cache): issue #14's target of 64 new
    tokens after prompts over several chunks with 1 and 4 hash rounds among the cases."""
    overrides, prompt_len = PARITY_CASES[case]
    hf, ours = hf_and_ours(tmp_path, **overrides)
    num_hashes = ours.config.num_hashes
    prompt = _ids(1, prompt_len, seed=1)

    calls = []
    hf_forward = hf.forward

    def recording_forward(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("past_buckets_states")))
        return hf_forward(*args, **kwargs)

    hf.forward = recording_forward
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new, do_sample=False, num_hashes=num_hashes)
    # transformers did decode with its cache: one prompt pass, then one token per step against the cache
    assert calls[0] == (prompt_len, None) and len(calls) == new
    assert all(
        length == 1 and isinstance(cache, type(calls[1][1])) and cache is not None for length, cache in calls[1:]
    )
    assert calls[-1][1].get_start_idx() == prompt_len + new - 1

    actual = ours.generate(prompt, max_new_tokens=new, num_hashes=num_hashes)
    assert actual.shape == (1, prompt_len + new)
    assert torch.equal(actual, expected), (
        f"\nours:         {actual[0, prompt_len:].tolist()}\ntransformers: {expected[0, prompt_len:].tolist()}"
    )


def test_generate_under_inference_mode_equals_no_grad(tmp_path):
    """Under ``torch.inference_mode`` (whose tensors the cache's buffers and the CPU index's host views are then made
    of) the same tokens and final logits as under ``no_grad``: windowed LSH steps, two hash rounds."""
    overrides, prompt_len = PARITY_CASES["local-lsh-x2-R2-P13"]
    _, ours = hf_and_ours(tmp_path, **overrides)
    prompt = _ids(1, prompt_len, seed=3)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = ours.generate(prompt, max_new_tokens=24, output_logits=True, return_dict_in_generate=True)
        results.append((out.sequences, out.logits[-1]))
    (tokens, logits), (inference_tokens, inference_logits) = results
    assert torch.equal(tokens, inference_tokens) and torch.equal(logits, inference_logits)


def _teacher_forced(model, ids: torch.Tensor, prompt_len: int, num_hashes: int):
    """Prompt with ``use_cache=True``, then one cached step per token of ``ids``: logits of every step."""
    logits = []
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True, num_hashes=num_hashes)
        logits.append(out.logits[:, -1])
        cache = out.past_buckets_states
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_buckets_states=cache, use_cache=True, num_hashes=num_hashes)
            cache = out.past_buckets_states
            logits.append(out.logits[:, -1])
    return logits, cache


@pytest.mark.parametrize("case", [case for case in PARITY_CASES if not case.endswith("-long")])
def test_cached_steps_match_transformers_cache(case, tmp_path):
    """Every step's logits and attention outputs, and the cache itself (its projections: transformers' cached states
    through its projections; bucket ids within each round; the LSH window positions), equal transformers'."""
    overrides, prompt_len = PARITY_CASES[case]
    hf, ours = hf_and_ours(tmp_path, **overrides)
    ids = _ids(1, prompt_len + 36, seed=2)
    expected = decode(hf, ids[:, :prompt_len], ids[:, prompt_len:])
    actual = decode(ours, ids[:, :prompt_len], ids[:, prompt_len:])
    assert_same_decoding(actual, expected)

    cache, num_hashes = actual.cache, ours.config.num_hashes
    assert isinstance(cache, ReformerDynamicCache) and len(cache) == len(ours.config.attn_layers)
    assert cache.get_start_idx() == expected.cache.get_start_idx() == ids.shape[1]
    for layer, kind in enumerate(ours.config.attn_layers):
        if kind == "local":
            assert cache.buckets_cache[layer].numel() == 0
        else:
            assert cache.buckets_cache[layer].shape == (1, 2, num_hashes, ids.shape[1])


def test_transformers_offset_heuristic_divergence(tmp_path):
    """After a padded prompt transformers hashes the new token with the offset ``prod(num_buckets) + 1`` only if
    the largest cached id exceeds ``R * prod(num_buckets) - 1``. Here no cached token of the last round has a large
    enough bucket, so transformers offsets the query by ``prod(num_buckets)``: in rounds >= 1 it is compared with
    the wrong cached buckets. We keep the offset the prompt used. With transformers' query hash forced to that
    offset its steps equal ours exactly; unpatched, they differ.
    """
    from transformers.models.reformer import modeling_reformer as theirs

    hf, ours = hf_and_ours(tmp_path, seed=1, attn_layers=["lsh", "lsh"], num_buckets=[2, 4])
    prompt_len = 12  # padded to 16: the prompt's buckets use the pad offset 8 + 1
    ids = torch.randint(3, 37, (1, prompt_len + 4), generator=torch.Generator().manual_seed(0))
    actual, _ = _teacher_forced(ours, ids, prompt_len, 2)
    unpatched, hf_cache = _teacher_forced(hf, ids, prompt_len, 2)
    assert int(hf_cache.buckets_cache[0][..., :prompt_len].max()) <= 2 * 8 - 1, (
        "this prompt no longer triggers the heuristic"
    )
    assert max(_max_abs(a, e) for a, e in zip(actual[1:], unpatched[1:])) > 1e-3

    original = theirs.LSHSelfAttention._hash_vectors

    def query_hash_with_pad_offset(self, vectors, num_hashes, attention_mask, increase_num_buckets=False):
        return original(self, vectors, num_hashes, attention_mask, increase_num_buckets or vectors.shape[2] == 1)

    theirs.LSHSelfAttention._hash_vectors = query_hash_with_pad_offset
    try:
        patched, _ = _teacher_forced(hf, ids, prompt_len, 2)
    finally:
        theirs.LSHSelfAttention._hash_vectors = original
    assert max(_max_abs(a, e) for a, e in zip(actual, patched)) <= LOGITS_ATOL


# --------------------------------------------------------------------------------------------------
# cached vs uncached
# --------------------------------------------------------------------------------------------------
def _step_vs_uncached(model, ids: torch.Tensor, prompt_len: int) -> dict[int, float]:
    """``{prefix length: max |cached step logits - uncached forward logits at the last position|}``."""
    cached, _ = _teacher_forced(model, ids, prompt_len, model.config.num_hashes)
    errors = {}
    with torch.no_grad():
        for offset, logits in enumerate(cached):
            length = prompt_len + offset
            errors[length] = _max_abs(logits, model(ids[:, :length]).logits[:, -1])
    return errors


@pytest.mark.parametrize(
    "overrides, batch, length, masked",
    [
        (dict(attn_layers=["local", "lsh", "local", "lsh"]), 2, 13, False),
        (dict(attn_layers=["local", "lsh", "local", "lsh"]), 2, 24, False),
        (dict(attn_layers=["lsh", "local"], num_hashes=3, lsh_attn_chunk_length=4), 3, 21, True),
    ],
    ids=["mixed-B2-L13", "mixed-B2-L24", "lsh-local-R3-B3-L21-mask"],
)
def test_prompt_logits_with_cache_equal_uncached(overrides, batch, length, masked):
    model = ours_model(**overrides)
    ids = _ids(batch, length, seed=3)
    mask = None
    if masked:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        mask[2, :3] = 0
    with torch.no_grad():
        cached = model(ids, attention_mask=mask, use_cache=True)
        uncached = model(ids, attention_mask=mask)
    assert uncached.past_buckets_states is None
    assert torch.equal(cached.logits, uncached.logits)
    assert cached.past_buckets_states.get_start_idx() == length
    if masked:
        # the cache's rows are left-padded: other padding is refused, naming the argument
        mask[2, -3:] = 0
        with pytest.raises(ValueError, match="attention_mask must be left-padded"), torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True)


def test_local_only_steps_equal_uncached():
    """Local attention is causal-invariant (with one chunk before): every cached step equals the uncached forward
    over the whole prefix, across chunk boundaries. (With two chunks before, the uncached forward's circular look-back
    makes the second chunk attend to duplicated keys, as in transformers, so there they differ.)"""
    model = ours_model(attn_layers=["local", "local", "local"])
    errors = _step_vs_uncached(model, _ids(2, 40, seed=4), prompt_len=3)
    assert max(errors.values()) <= LOGITS_ATOL, errors


def test_steps_within_a_chunk_equal_uncached():
    """While the prefix fits in one chunk every layer attends to all of it: cached == uncached, LSH included."""
    model = ours_model(attn_layers=["local", "lsh", "local", "lsh"])
    errors = _step_vs_uncached(model, _ids(2, 8, seed=5), prompt_len=2)
    assert max(errors.values()) <= LOGITS_ATOL, errors


def test_lsh_step_equals_uncached_at_chunk_multiples():
    """What a cached LSH step equals exactly: the uncached forward over the same prefix when that prefix is a multiple
    of the chunk length (no padding, same circular wrap), with one hash round (with several, the uncached forward's
    first chunk of a round looks back into the previous round) and the LSH layer last (an earlier LSH layer's
    outputs at past positions were computed with the shorter context of their own step, while the uncached forward
    recomputes them with every token in the sort). Elsewhere they differ, as transformers' do.
    """
    model = ours_model(attn_layers=["local", "lsh"], num_hashes=1)
    errors = _step_vs_uncached(model, _ids(1, 44, seed=6), prompt_len=3)
    aligned = {length: error for length, error in errors.items() if length % 8 == 0 or length <= 8}
    assert len(aligned) >= 10 and max(aligned.values()) <= LOGITS_ATOL, aligned
    # the comparison is sensitive: where the bucket windows differ the logits do too
    assert max(errors.values()) > 1e-2


def test_decoding_step_work_is_independent_of_the_sequence_length():
    """A model step's FLOPs (projections, scores, values) do not grow with the cached length (bookkeeping aside):
    the step after 21 cached tokens and the step after 53 (the same place in a chunk of 8: a CPU local step leaves
    its masked window entries out, so its window varies within a chunk) count the same, and no step after the
    prompt counts more than the step after 21 plus the 8 entries a local window can add."""
    model = ours_model(attn_layers=["local", "lsh", "local", "lsh"])
    ids = _ids(2, 60, seed=7)
    prompt_len = 17
    flops = {}

    def counted(call, step):
        length = prompt_len + step  # cached positions before this step
        with FlopCounterMode(display=False) as counter:
            out = call()
        flops[length] = counter.get_total_flops()
        return out

    decoded = decode(model, ids[:, :prompt_len], ids[:, prompt_len:], step_wrapper=counted)
    assert decoded.cache.get_seq_length() == 60
    assert flops[21] == flops[53] > 0, flops
    # a local layer's 8 more entries: scores and values, 2 FLOPs each per (row, head, dim), two local layers
    config = model.config
    extra = 2 * 8 * 2 * 2 * config.num_attention_heads * config.attention_head_size * 2
    assert max(flops.values()) <= flops[21] + extra, flops


# --------------------------------------------------------------------------------------------------
# left-padded batches
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, lengths, new",
    [
        (dict(attn_layers=["local", "lsh", "local", "lsh"]), [3, 7, 1, 8], 30),
        (dict(attn_layers=["local", "lsh", "local", "lsh"]), [3, 13, 8, 20, 9], 30),
        (
            dict(attn_layers=["lsh", "local"], num_hashes=3, lsh_attn_chunk_length=4, lsh_num_chunks_before=2),
            [2, 9, 4, 17],
            30,
        ),
        # issue #14: prompts over several chunks, 1 and 4 rounds, 64 new tokens
        (dict(attn_layers=["local", "lsh", "local", "lsh"], num_hashes=1, **LONG), [29, 5, 13, 22], 64),
        (dict(attn_layers=["lsh", "local", "lsh"], num_hashes=4, **LONG), [37, 9, 20], 64),
    ],
    ids=["within-chunk-P1..8", "mixed-P3..20", "lsh-c4-before2-R3-P2..17", "long-R1-P5..29", "long-R4-P9..37"],
)
def test_left_padded_batch_equals_one_prompt_at_a_time(overrides, lengths, new):
    model = ours_model(**overrides)
    prompts = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = _left_pad(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert batched.shape == (len(lengths), ids.shape[1] + new)
    assert torch.equal(batched[:, : ids.shape[1]], ids)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=new)
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, prompt.numel() :]), (
            f"row {row} (prompt length {prompt.numel()})"
        )


def test_left_padded_cached_forward_matches_alone_logits():
    """The forward API: a left-padded prompt (mask, positions from the first real token) and cached steps with a
    mask over past + new give every row the logits it gets alone."""
    model = ours_model(attn_layers=["local", "lsh", "local", "lsh"])
    prompts = [_ids(1, n, seed=20 + n)[0] for n in (2, 6, 4)]
    ids, mask = _left_pad(prompts)
    continuation = _ids(3, 20, seed=30)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        batched = [out.logits[:, -1]]
        cache = out.past_buckets_states
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            # default position ids in a step: the real tokens before it in the row
            out = model(continuation[:, t : t + 1], attention_mask=mask, past_buckets_states=cache, use_cache=True)
            cache = out.past_buckets_states
            batched.append(out.logits[:, -1])
    for row, prompt in enumerate(prompts):
        alone, _ = _teacher_forced(model, torch.cat([prompt, continuation[row]])[None], prompt.numel(), 2)
        for step, (b, a) in enumerate(zip(batched, alone)):
            assert _max_abs(b[row : row + 1], a) <= 1e-5, f"row {row} step {step}"


def test_eos_stops_a_row_and_pads_it():
    model = ours_model(attn_layers=["local", "lsh"])
    prompts = [_ids(1, n, seed=40 + n)[0] for n in (5, 11)]
    ids, mask = _left_pad(prompts)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=25)
    width = ids.shape[1]
    # an eos that row 0 emits at step k (and row 1 not before)
    row0 = free[0, width:].tolist()
    eos = next(
        t
        for k, t in enumerate(row0)
        if k >= 3 and t not in free[1, width : width + k + 1].tolist() and t not in row0[:k]
    )
    stop = row0.index(eos)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=25, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out[0, width : width + stop + 1], free[0, width : width + stop + 1])
    assert (out[0, width + stop + 1 :] == 1).all()
    row1 = free[1, width:].tolist()
    end1 = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert torch.equal(out[1, width : width + end1], free[1, width : width + end1])
    # all rows stopped: generation ends early
    only_row0 = model.generate(prompts[0][None], max_new_tokens=25, eos_token_id=eos)
    assert only_row0.shape[1] == prompts[0].numel() + stop + 1 and only_row0[0, -1] == eos


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_generator():
    model = ours_model(attn_layers=["local", "lsh"])
    prompt = _ids(2, 6, seed=50)

    def sample(seed):
        return model.generate(
            prompt,
            max_new_tokens=20,
            do_sample=True,
            num_return_sequences=3,
            generator=torch.Generator().manual_seed(seed),
        )

    first = sample(1)
    assert first.shape == (6, 26)
    assert torch.equal(first[:, :6], prompt.repeat_interleave(3, dim=0))
    assert torch.equal(first, sample(1))
    assert not torch.equal(first, sample(2))
    # the draws come from the generator only
    state = torch.get_rng_state()
    sample(3)
    assert torch.equal(state, torch.get_rng_state())


def _replayed_step_logits(model, sequences: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    logits, _ = _teacher_forced(model, sequences[:, :-1], prompt_len, model.config.num_hashes)
    return logits  # logits[k] produced sequences[:, prompt_len + k]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_respects_top_k(temperature):
    model = ours_model(attn_layers=["local", "lsh"])
    prompt = _ids(1, 5, seed=51)
    out = model.generate(
        prompt,
        max_new_tokens=30,
        do_sample=True,
        top_k=3,
        temperature=temperature,
        num_return_sequences=4,
        generator=torch.Generator().manual_seed(0),
    )
    logits = _replayed_step_logits(model, out, 5)
    for step, step_logits in enumerate(logits):
        allowed = torch.topk(step_logits, 3, dim=-1).indices
        assert (allowed == out[:, 5 + step, None]).any(-1).all(), f"step {step}: token outside the top 3"


def test_sampling_respects_top_p():
    model = ours_model(attn_layers=["local", "lsh"])
    prompt = _ids(1, 5, seed=52)
    top_p, temperature = 0.6, 0.8
    out = model.generate(
        prompt,
        max_new_tokens=30,
        do_sample=True,
        top_p=top_p,
        temperature=temperature,
        num_return_sequences=4,
        generator=torch.Generator().manual_seed(0),
    )
    logits = _replayed_step_logits(model, out, 5)
    sizes = []
    for step, step_logits in enumerate(logits):
        probs = torch.softmax(step_logits.double() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # the nucleus: the most likely tokens until their mass reaches top_p
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        in_nucleus = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
        sizes.append(int(in_nucleus.sum(-1).min()))
        assert in_nucleus.gather(-1, out[:, 5 + step, None]).all(), f"step {step}: token outside the top-p nucleus"
    assert max(sizes) < BASE["vocab_size"] // 2, "the nucleus never excluded much: the test would be vacuous"


# --------------------------------------------------------------------------------------------------
# bad input and the cache API
# --------------------------------------------------------------------------------------------------
def test_generate_rejects_bad_input():
    model = ours_model(attn_layers=["local", "lsh"])
    prompt = _ids(1, 5, seed=60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(_ids(1, 65, seed=61), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens=60"):
        model.generate(prompt, max_new_tokens=60)  # 5 + 60 > 64 positions
    small_axial = ours_model(attn_layers=["local", "lsh"], axial_pos_shape=[4, 8])  # 32 positions < 64
    with pytest.raises(ValueError, match="max_new_tokens=30.*axial_pos_shape"):
        small_axial.generate(prompt, max_new_tokens=30)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask must be left-padded"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model.generate(prompt, attention_mask=mask[:, :4], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(prompt, num_return_sequences=2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, do_sample=True, top_k=-1)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompt, eos_token_id=37)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model.generate(prompt.float())
    with pytest.raises(ValueError, match="eval"):
        model.train().generate(prompt)
    model.eval()
    with pytest.raises(ValueError, match="max_new_tokens"):  # transformers' rule
        model.generate(prompt, max_new_tokens=0)


def test_cached_forward_rejects_bad_input():
    model = ours_model(attn_layers=["local", "lsh"])
    ids = _ids(2, 10, seed=62)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_buckets_states
        with pytest.raises(ValueError, match="one new token per row"):
            model(ids[:, :2], past_buckets_states=cache)
        with pytest.raises(ValueError, match="batch size 1"):
            model(ids[:1, :1], past_buckets_states=cache)
        with pytest.raises(ValueError, match=r"attention_mask in a cached step .* \(2, 11\)"):
            model(ids[:, :1], attention_mask=torch.ones(2, 1), past_buckets_states=cache)
        with pytest.raises(ValueError, match="num_hashes=3 differs"):
            model(ids[:, :1], past_buckets_states=cache, num_hashes=3)
        with pytest.raises(TypeError, match="ReformerDynamicCache"):
            model(ids[:, :1], past_buckets_states=[])
        with pytest.raises(ValueError, match="eval"):
            model.train()(ids[:, :1], past_buckets_states=cache)
    model.eval()


def test_cache_api_and_reorder():
    model = ours_model(attn_layers=["local", "lsh"])
    ids = _ids(3, 12, seed=63)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_buckets_states
        assert len(cache) == 2 and cache.get_start_idx() == 12 and cache.get_seq_length() == 12
        keys, values = cache.cached_projections(0)
        assert keys.shape == values.shape == (3, 2, 12, 12) and cache.buckets_cache[0].numel() == 0
        assert cache.buckets_cache[1].shape == (3, 2, 2, 12)
        order = torch.tensor([2, 0])
        selected = [t[order] for i in range(2) for t in cache.cached_projections(i)] + [cache.buckets_cache[1][order]]
        cache.reorder_cache(order)
        assert cache.batch_size == 2
        reordered = [t for i in range(2) for t in cache.cached_projections(i)] + [cache.buckets_cache[1]]
        assert all(torch.equal(a, b) for a, b in zip(reordered, selected, strict=True))
        step = model(ids[order, :1], past_buckets_states=cache, use_cache=True)
        reference = model(ids[order], use_cache=True).past_buckets_states
        expected = model(ids[order, :1], past_buckets_states=reference, use_cache=True)
    assert torch.equal(step.logits, expected.logits)
    assert step.past_buckets_states.get_start_idx() == 13


def test_cached_step_without_use_cache_reads_the_cache_only():
    """``use_cache=False`` with a cache (transformers: the step reads the cache and appends nothing): the step's logits
    are the appending step's, it returns no cache and the cache is left as it was (later steps see no trace)."""
    model = ours_model(attn_layers=["local", "lsh"])
    ids = _ids(2, 15, seed=64)
    with torch.no_grad():
        cache = model(ids[:, :12], use_cache=True).past_buckets_states
        reference = model(ids[:, :12], use_cache=True).past_buckets_states
        read = model(ids[:, 12:13], past_buckets_states=cache, use_cache=False)
        assert read.past_buckets_states is None
        assert cache.get_start_idx() == 12, "a step with use_cache=False appended to the cache"
        for t in (12, 13):
            kept = model(ids[:, t : t + 1], past_buckets_states=reference, use_cache=True)
            if t == 12:
                assert torch.equal(read.logits, kept.logits)
            step = model(ids[:, t : t + 1], past_buckets_states=cache, use_cache=True)
            assert torch.equal(step.logits, kept.logits)
    assert cache.get_start_idx() == 14


# --------------------------------------------------------------------------------------------------
# the training example
# --------------------------------------------------------------------------------------------------
def test_train_char_lm_example_smoke(tmp_path):
    output_dir = tmp_path / "char_lm"
    script = os.path.join(ROOT, "examples", "train_char_lm.py")
    command = [
        sys.executable, script, "--steps", "3", "--seq-len", "60", "--chunk-length", "16", "--batch-size", "2",
        "--hidden-size", "32", "--eval-every", "2", "--sample-tokens", "12", "--output-dir", str(output_dir),
        "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "REFORMER_BACKEND": "torch"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 3 steps" in result.stdout and "sample:" in result.stdout
    sample = result.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("When in the Course of human events, ")
    model = reformer.ReformerModelWithLMHead.from_pretrained(output_dir)
    assert model.config.is_decoder and model.config.vocab_size == 258
    assert model.config.max_position_embeddings == 64  # the 60-byte window rounded up to whole chunks
    assert os.path.exists(output_dir / "config.json")
