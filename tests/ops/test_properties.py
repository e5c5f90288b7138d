"""Property-based tests of the ops API (hypothesis): both backends against the reference on valid
inputs, and the same error on both backends for invalid ones.

Valid inputs: odd lengths and head dims, chunk sizes, hash rounds (round-major and mixed visiting
orders), windows before/after (wider than the sequence too), masks with empty and full rows, causal
and not, shared-QK and separate keys, fp32 and fp16. The ``torch`` backend and the ``triton``
backend (the Triton interpreter without a GPU, ``tests/conftest.py``) must agree with the
reference: fp32 to ~1e-5, fp16 by the project's tolerance rule (STYLE.md: the error against the
fp32 reference at most 2x the fp16 reference's own error plus a small atol), outputs and gradients.
Hashing is tested on integer-valued inputs, whose projections are exact in every dtype, so ids must
be equal, ties and NaN included (no near-tie exclusions needed).

Invalid inputs: a valid call with one argument corrupted; both backends must raise the same
``TypeError``/``ValueError`` with the same message, before any work.

Budget: the profiles live in ``tests/conftest.py``; the default ``ci`` profile is derandomized and
bounded (the interpreter runs a kernel program in ~0.1 s, so attention cases are kept to a few
programs); ``REFORMER_HYPOTHESIS_PROFILE=thorough`` runs ten times the examples, randomized.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reformer_kernels  # noqa: E402
from reformer_kernels import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash  # noqa: E402
from reformer_kernels.backend import triton_interpreting  # noqa: E402
from reformer_kernels.ops.axial_pos import axial_word_embedding, axial_word_embedding_reference  # noqa: E402
from reformer_kernels.ops.chunked_attention import chunked_attention_reference  # noqa: E402
from reformer_kernels.ops.lsh_hash import lsh_hash_reference  # noqa: E402

BACKENDS = ("torch", "triton")
ON_CPU = not torch.cuda.is_available() or triton_interpreting()
DEVICE = "cpu" if ON_CPU else "cuda"


def examples(ci_count: int) -> int:
    """``ci_count`` examples under the ``ci`` profile (max_examples 10), scaled with the loaded profile."""
    return max(1, ci_count * settings.default.max_examples // 10)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masks(draw, batch_size: int, seq_len: int):
    """None, or a [B, L] 0/1 mask (long, bool or float) whose rows are all kept, all masked or mixed."""
    if not draw(st.booleans()):
        return None
    rows = []
    for _ in range(batch_size):
        kind = draw(st.sampled_from(["full", "empty", "mixed"]))
        if kind == "mixed":
            rows.append(draw(st.lists(st.integers(0, 1), min_size=seq_len, max_size=seq_len)))
        else:
            rows.append([int(kind == "full")] * seq_len)
    mask = torch.tensor(rows, dtype=torch.long).view(batch_size, seq_len)
    return mask.to(draw(st.sampled_from([torch.long, torch.bool, torch.float32])))


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


def _size(values: torch.Tensor) -> float:
    """max(1, max |values|): the scale of a tolerance (1 for empty tensors)."""
    return max(1.0, values.abs().max().item()) if values.numel() else 1.0


# ------------------------------------------------------------------------------------------------
# chunked attention
# ------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    mode = draw(st.sampled_from(["lsh", "local", "lsh-sepkey", "local-sharedqk"]))
    lsh = mode.startswith("lsh")
    batch_size, num_heads = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
    chunk = draw(st.integers(1, 5))
    num_rounds = draw(st.integers(1, 3)) if lsh else 1
    # programs per kernel = B * H * rounds * chunks per round: at most 6 (the interpreter's cost)
    chunks = draw(st.integers(1, max(1, 6 // (batch_size * num_heads * num_rounds))))
    seq_len = chunk * chunks
    head_dim = draw(st.sampled_from([1, 3, 5, 8, 12, 17]))
    before, after = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    causal = draw(st.booleans())
    sorted_idx = None
    if lsh:
        rows = []
        for _ in range(batch_size * num_heads):
            if draw(st.booleans()):
                # round-major, as bucket_sort returns it: a permutation of the positions per round
                row = [p + r * seq_len for r in range(num_rounds) for p in draw(st.permutations(range(seq_len)))]
            else:
                # any permutation of [0, R * L) is valid: rounds mix
                row = draw(st.permutations(range(num_rounds * seq_len)))
            rows.append(list(row))
        index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        sorted_idx = torch.tensor(rows, dtype=index_dtype).view(batch_size, num_heads, num_rounds * seq_len)
    mask = _masks(draw, batch_size, seq_len)
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    shared_qk = mode in ("lsh", "local-sharedqk")
    return dict(
        shape=(batch_size, num_heads, seq_len, head_dim),
        shared_qk=shared_qk,
        sorted_idx=sorted_idx,
        window=(chunk, before, after, causal),
        mask=mask,
        dtype=dtype,
        seed=seed,
    )


def _attention_outputs(backend, tensors, grad_out, case):
    """(out, *input gradients) of the op on ``backend`` (``"reference"``: the specification)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    args = (case["sorted_idx"], *case["window"], case["mask"])
    if backend == "reference":
        out, _ = chunked_attention_reference(*leaves, *args)
    else:
        with reformer_kernels.backend(backend):
            out, _ = chunked_attention(*leaves, *args)
    used = [t for t in leaves if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, used, grad_out.to(out.dtype)))


# pinned examples (always run, before the generated ones): the degenerate rows of issue #13
_FULLY_MASKED_FP16 = dict(
    shape=(2, 1, 6, 5),
    shared_qk=False,
    sorted_idx=None,
    window=(3, 1, 0, True),
    mask=torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 1]]),
    dtype=torch.float16,
    seed=1,
)
_INT32_ORDER_MIXING_ROUNDS = dict(
    shape=(1, 1, 4, 3),
    shared_qk=True,
    sorted_idx=torch.tensor([[[5, 0, 7, 2, 1, 6, 3, 4]]], dtype=torch.int32),
    window=(2, 1, 1, True),
    mask=torch.tensor([[1, 0, 1, 1]], dtype=torch.bool),
    dtype=torch.float32,
    seed=2,
)


@settings(max_examples=examples(16))
@example(case=_FULLY_MASKED_FP16)
@example(case=_INT32_ORDER_MIXING_ROUNDS)
@given(case=attention_cases())
def test_chunked_attention_backends_match_the_reference(case):
    gen = _generator(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    # inputs rounded to dtype once; the fp32 reference runs on exactly those values
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    k = None if case["shared_qk"] else k
    grad_out = torch.randn(shape, generator=gen)
    inputs = [q, k, v]
    exact = _attention_outputs("reference", [None if t is None else t.float() for t in inputs], grad_out, case)
    names = ["out", "dq"] + ([] if k is None else ["dk"]) + ["dv"]
    if dtype == torch.float16:
        low = _attention_outputs("reference", inputs, grad_out, case)
        low_errors = [_max_error(a, b) for a, b in zip(low, exact)]
    for backend in BACKENDS:
        got = _attention_outputs(backend, inputs, grad_out, case)
        for i, (name, g, e) in enumerate(zip(names, got, exact)):
            assert g.dtype == dtype and g.shape == e.shape, (backend, name)
            if dtype == torch.float32:
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}")
            else:
                # STYLE.md: at most 2x the fp16 reference's error against the fp32 one, plus a small atol
                bound = 2 * low_errors[i] + 5e-3 * _size(e)
                assert _max_error(g, e) <= bound, (backend, name, _max_error(g, e), low_errors[i])


# ------------------------------------------------------------------------------------------------
# LSH hashing and bucket sort
# ------------------------------------------------------------------------------------------------


@st.composite
def hash_cases(draw):
    batch_size, num_heads = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    seq_len, head_dim, num_rounds = draw(st.integers(0, 9)), draw(st.integers(1, 16)), draw(st.integers(1, 3))
    if draw(st.booleans()):
        num_buckets = draw(st.sampled_from([2, 4, 6, 8, 10]))
    else:
        num_buckets = draw(st.lists(st.sampled_from([2, 4, 6]), min_size=1, max_size=4))
    width = sum([num_buckets] if isinstance(num_buckets, int) else num_buckets) // 2
    gen = _generator(draw(st.integers(0, 2**16)))
    # integers in [-3, 3]: every product and sum (|x . r| <= 16 * 9) is exact in fp32, fp16 and bf16, so
    # all backends must give the same ids, exact ties (first maximum wins) included
    vectors = torch.randint(-3, 4, (batch_size, num_heads, seq_len, head_dim), generator=gen).float()
    rotations = torch.randint(-3, 4, (num_heads, head_dim, num_rounds, width), generator=gen).float()
    if draw(st.booleans()) and vectors.numel():
        # NaN vectors (argmax's rule: the first NaN column) and a NaN rotation column
        vectors.view(-1)[draw(st.integers(0, vectors.numel() - 1))] = float("nan")
        rotations[draw(st.integers(0, num_heads - 1)), :, 0, draw(st.integers(0, width - 1))] = float("nan")
    mask = _masks(draw, batch_size, seq_len)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return vectors.to(dtype), rotations, num_buckets, mask, draw(st.booleans())


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max over NaN rows
@settings(max_examples=examples(25))
@given(case=hash_cases())
def test_lsh_hash_backends_equal_the_reference(case):
    vectors, rotations, num_buckets, mask, increase = case
    expected = lsh_hash_reference(vectors, rotations, num_buckets, mask, increase)
    for backend in BACKENDS:
        with reformer_kernels.backend(backend):
            ids = lsh_hash(vectors, rotations, num_buckets, mask, increase)
        assert ids.dtype == expected.dtype and torch.equal(ids, expected), backend


@settings(max_examples=examples(15))
@given(
    shape=st.tuples(st.integers(0, 2), st.integers(1, 2), st.integers(0, 40)),
    num_bins=st.integers(1, 20),
    dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_bucket_sort_backends_equal_a_stable_sort(shape, num_bins, dtype, seed):
    ids = torch.randint(0, num_bins, shape, generator=_generator(seed)).to(dtype)
    expected = torch.sort(ids, dim=-1, stable=True).indices
    positions = torch.arange(shape[-1]).expand(shape)
    for backend in BACKENDS:
        with reformer_kernels.backend(backend):
            sorted_idx, undo_idx = bucket_sort(ids, num_bins)
        assert torch.equal(sorted_idx, expected), backend
        assert torch.equal(sorted_idx.gather(-1, undo_idx), positions), backend


# ------------------------------------------------------------------------------------------------
# axial position (and word) embeddings
# ------------------------------------------------------------------------------------------------


@st.composite
def axial_cases(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dims = draw(st.lists(st.integers(1, 5), min_size=len(sizes), max_size=len(sizes)))
    total = math.prod(sizes)
    batch_size, seq_len = draw(st.integers(0, 2)), draw(st.integers(0, total))
    with_word = draw(st.booleans())
    gen = _generator(draw(st.integers(0, 2**16)))
    position_ids = None
    if not with_word or draw(st.booleans()):
        position_ids = torch.randint(0, total, (batch_size, seq_len), generator=gen)
        position_ids = position_ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
    input_ids = torch.randint(0, 7, (batch_size, seq_len), generator=gen) if with_word else None
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    tables = [torch.randn(n, d, generator=gen).to(dtype) for n, d in zip(sizes, dims)]
    word = torch.randn(7, sum(dims), generator=gen).to(dtype) if with_word else None
    return input_ids, word, tables, position_ids, draw(st.integers(0, 2**16))


def _axial_outputs(backend, input_ids, word, tables, position_ids, grad_seed):
    leaves = [t.detach().clone().requires_grad_() for t in ([] if word is None else [word]) + tables]
    word_leaf = leaves[0] if word is not None else None
    table_leaves = leaves[1:] if word is not None else leaves
    if backend == "reference":
        out = axial_word_embedding_reference(input_ids, word_leaf, table_leaves, position_ids)
    else:
        with reformer_kernels.backend(backend):
            if input_ids is None:
                out = axial_position_embedding(position_ids, table_leaves)
            else:
                out = axial_word_embedding(input_ids, word_leaf, table_leaves, position_ids)
    grad_out = torch.randn(out.shape, generator=_generator(grad_seed)).to(out.dtype)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out, allow_unused=True))


@settings(max_examples=examples(15))
@given(case=axial_cases())
def test_axial_embedding_backends_match_the_reference(case):
    input_ids, word, tables, position_ids, grad_seed = case
    dtype = tables[0].dtype
    exact_inputs = (None if word is None else word.float(), [t.float() for t in tables])
    exact = _axial_outputs("reference", input_ids, *exact_inputs, position_ids, grad_seed)
    low = _axial_outputs("reference", input_ids, word, tables, position_ids, grad_seed)
    for backend in BACKENDS:
        got = _axial_outputs(backend, input_ids, word, tables, position_ids, grad_seed)
        for i, (g, e) in enumerate(zip(got, exact)):
            g = torch.zeros_like(e) if g is None else g  # an empty batch: no gradient flows
            e_low = torch.zeros_like(e) if low[i] is None else low[i]
            assert g.shape == e.shape, backend
            # fp32: sums of the same terms in another order; fp16: the tolerance rule
            bound = 2 * _max_error(e_low, e) + (1e-5 if dtype == torch.float32 else 1e-3) * _size(e)
            assert _max_error(g, e) <= bound, (backend, i, _max_error(g, e), bound)


# ------------------------------------------------------------------------------------------------
# invalid inputs: the same error on both backends
# ------------------------------------------------------------------------------------------------


def _valid_call(op: str, gen: torch.Generator) -> dict:
    if op == "chunked_attention":
        return dict(
            query=torch.randn(1, 2, 6, 3, generator=gen),
            key=None,
            value=torch.randn(1, 2, 6, 3, generator=gen),
            sorted_idx=torch.stack([torch.randperm(12, generator=gen) for _ in range(2)]).view(1, 2, 12),
            chunk_length=3,
            num_chunks_before=1,
            num_chunks_after=0,
            causal=False,
            attention_mask=torch.ones(1, 6),
            dropout_p=0.0,
        )
    if op == "lsh_hash":
        return dict(
            vectors=torch.randn(1, 2, 6, 3, generator=gen),
            rotations=torch.randn(2, 3, 2, 3, generator=gen),
            num_buckets=[2, 4],
            attention_mask=torch.ones(1, 6),
        )
    if op == "bucket_sort":
        return dict(buckets=torch.randint(0, 5, (1, 2, 12), generator=gen), num_bins=5)
    return dict(
        position_ids=torch.randint(0, 12, (2, 5), generator=gen), weights=[torch.randn(3, 2), torch.randn(4, 3)]
    )


_OPS = {
    "chunked_attention": chunked_attention,
    "lsh_hash": lsh_hash,
    "bucket_sort": bucket_sort,
    "axial_position_embedding": axial_position_embedding,
}


def _set(*values):
    """Bad values used as they are."""
    return st.sampled_from([("set", value) for value in values])


def _make(*kinds):
    """Bad values made from the valid one (see ``_corrupt``)."""
    return st.sampled_from([("make", kind) for kind in kinds])


# argument -> strategy of corruptions
_CORRUPTIONS = {
    "chunked_attention": [
        ("dropout_p", _set("0.1", True, 1.0, -0.5, float("nan"), None)),
        ("causal", _set("no", 1, 0.0, None)),
        ("chunk_length", _set(0, -3, 4, 5, 3.0, "3")),
        ("num_chunks_before", _set(-1, 1.0, None)),
        ("num_chunks_after", _set(-2, "0")),
        ("attention_mask", _make("list", "shape", "complex")),
        ("sorted_idx", _make("duplicate", "range", "negative", "int16", "float", "shape", "one_round", "list")),
        ("query", _make("int", "3d", "list", "head_dim_0")),
        ("value", _make("shape", "float64")),
    ],
    "lsh_hash": [
        ("num_buckets", _set(8.0, 7, [], [2, 3], [2, 4.0], True, "8")),
        ("vectors", _make("int", "3d", "list", "head_dim_0")),
        ("rotations", _make("shape", "int", "list")),
        ("attention_mask", _make("list", "shape", "complex")),
    ],
    "bucket_sort": [
        ("buckets", _make("int16", "uint8", "int8", "float", "bool", "2d", "range", "negative")),
        ("num_bins", _set(0, -1, 5.0, True, "5")),
    ],
    "axial_position_embedding": [
        ("position_ids", _make("int8", "int16", "uint8", "float", "1d", "range", "negative", "list")),
        ("weights", _make("empty", "int", "float64_mix", "list_item")),
    ],
}
# ids past the valid range of each id argument
_OUT_OF_RANGE = {"sorted_idx": 1, "buckets": 5, "position_ids": 12}


def _corrupt(name: str, value, corruption):
    how, what = corruption
    if how == "set":
        return what
    if what == "list":
        return value.tolist()
    if what == "shape":
        return value[..., :-1]
    if what == "complex":
        return value.to(torch.complex64)
    if what in ("int16", "uint8", "int8"):
        return value.to(getattr(torch, what))
    if what in ("float", "bool", "float64"):
        return value.to({"float": torch.float32, "bool": torch.bool, "float64": torch.float64}[what])
    if what == "int":
        return value.long() if isinstance(value, torch.Tensor) else [table.long() for table in value]
    if what in ("3d", "2d"):
        return value[0]
    if what == "1d":
        return value.reshape(-1)
    if what == "head_dim_0":
        return value[..., :0]
    if what == "duplicate":
        bad = value.clone()
        bad[0, 1, 4] = bad[0, 1, 5]
        return bad
    if what == "range":
        return value + _OUT_OF_RANGE[name]
    if what == "negative":
        return value - 1 - value.max()
    if what == "one_round":
        return value[..., :6]  # the shape of one round, with values of two
    if what == "empty":
        return []
    if what == "float64_mix":
        return [value[0], value[1].double()]
    if what == "list_item":
        return [value[0], value[1].tolist()]
    raise AssertionError(f"unknown corruption {corruption!r}")


@st.composite
def invalid_calls(draw):
    op = draw(st.sampled_from(list(_OPS)))
    call = _valid_call(op, _generator(draw(st.integers(0, 2**16))))
    name, corruptions = draw(st.sampled_from(_CORRUPTIONS[op]))
    corruption = draw(corruptions)
    call[name] = _corrupt(name, call[name], corruption)
    return op, name, corruption, call


@settings(max_examples=examples(60))
@given(case=invalid_calls())
def test_invalid_input_gets_the_same_error_on_both_backends(case):
    op, name, corruption, call = case
    outcomes = []
    for backend in BACKENDS:
        try:
            with reformer_kernels.backend(backend):
                _OPS[op](**call)
        except (TypeError, ValueError) as error:
            outcomes.append((type(error), str(error)))
        else:
            outcomes.append(None)
    assert outcomes[0] is not None, f"{op}: {name} {corruption!r} was accepted"
    assert outcomes[0] == outcomes[1], outcomes
