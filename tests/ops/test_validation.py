"""Input validation of the ops (issue #13): one validation per op for every backend, the shared value
checks of ``reformer_kernels.validation``, kernel limits as ``ValueError`` on backend ``triton``, and
empty inputs.

Without a GPU the Triton backend runs under the interpreter (``tests/conftest.py``); checks that read
tensor values raise ``ValueError`` for CPU tensors only (on CUDA they are asynchronous device asserts),
so those cases are skipped on a CUDA device.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import reformer_kernels
from reformer_kernels import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash
from reformer_kernels.ops.axial_pos import axial_word_embedding
from reformer_kernels.ops.chunked_attention import chunked_attention_with_grad
from reformer_kernels.validation import check_index_range, check_permutation

validation = importlib.import_module("reformer_kernels.validation")
BACKENDS = ["torch", "triton"]


# ------------------------------------------------------------------------------------------------
# the shared value checks
# ------------------------------------------------------------------------------------------------


def test_check_index_range_names_the_argument_and_the_range():
    check_index_range(torch.tensor([0, 3, 4]), 5, "ids")
    check_index_range(torch.zeros(0, dtype=torch.int64), 0, "ids")  # empty: nothing to check
    with pytest.raises(
        ValueError, match=r"^input_ids \(config.vocab_size\) must be in \[0, 5\); got values in \[0, 5\]$"
    ):
        check_index_range(torch.tensor([0, 5]), 5, "input_ids (config.vocab_size)")
    with pytest.raises(ValueError, match=r"got values in \[-2, 1\]"):
        check_index_range(torch.tensor([[1, -2]], dtype=torch.int32), 5, "ids")
    # an upper bound past the dtype's range: every int32 value is below it
    check_index_range(torch.tensor([2**31 - 1], dtype=torch.int32), 2**40, "ids")
    # a few values are read as a list, more reduced on the device first: the same check and message either way
    for count in (validation._FEW_VALUES, validation._FEW_VALUES + 1, 1000):
        ids = torch.arange(count).view(-1, 1) - 1  # [count, 1]
        check_index_range(ids + 1, count, "ids")
        with pytest.raises(ValueError, match=rf"^ids must be in \[0, {count}\); got values in \[-1, {count - 2}\]$"):
            check_index_range(ids, count, "ids")
        with pytest.raises(ValueError, match=rf"got values in \[1, {count}\]$"):
            check_index_range(ids + 2, count, "ids")


def test_value_checks_become_device_asserts_when_host_reads_are_off(monkeypatch):
    """The one switch point (``_host_checks_allowed``, false under torch.compile): the checks enqueue
    ``torch._assert_async`` instead of reading values on the host; eager CPU behaviour is unchanged."""
    asserts = []
    monkeypatch.setattr(validation, "_host_checks_allowed", lambda: False)
    monkeypatch.setattr(
        validation, "_device_assert", lambda condition, message: asserts.append((bool(condition), message))
    )
    check_index_range(torch.tensor([0, 7]), 5, "ids")
    check_permutation(torch.tensor([[0, 0, 2]]), "sorted_idx")
    assert asserts == [
        (False, "ids must be in [0, 5)"),
        (True, "sorted_idx must be in [0, 3)"),
        (False, "sorted_idx must be a permutation of [0, 3) in every row (each value exactly once)"),
    ]


def test_device_assert_fails_on_a_false_condition():
    """What the device path runs (on CPU tensors ``_assert_async`` raises at once)."""
    validation._device_assert(torch.tensor(True), "fine")
    with pytest.raises(RuntimeError, match="ids must be in"):
        validation._device_assert(torch.tensor(False), "ids must be in [0, 5)")


def test_value_checks_compile_without_graph_breaks():
    """Under torch.compile the value checks are device asserts: a full graph traces through them."""

    def checked(ids, order):
        check_index_range(ids, 5, "ids")
        check_permutation(order, "sorted_idx")
        return ids + 1

    compiled = torch.compile(checked, backend="eager", fullgraph=True)
    ids, order = torch.tensor([0, 4]), torch.tensor([[2, 0, 1]])
    assert torch.equal(compiled(ids, order), ids + 1)
    with pytest.raises(RuntimeError, match="ids must be in"):
        compiled(torch.tensor([0, 5]), order)


def test_check_permutation():
    check_permutation(torch.tensor([[[2, 0, 1], [0, 1, 2]]]), "sorted_idx")
    with pytest.raises(ValueError, match=r"permutation of \[0, 3\) .*; row \(0, 1\) repeats a value"):
        check_permutation(torch.tensor([[[2, 0, 1], [0, 1, 1]]]), "sorted_idx")
    with pytest.raises(ValueError, match=r"sorted_idx must be in \[0, 3\); got values in \[-1, 2\]"):
        check_permutation(torch.tensor([[[2, 0, -1]]]), "sorted_idx")


def test_axial_ids_use_the_shared_range_check(monkeypatch):
    """The ops' id range checks are ``validation.check_index_range`` (the one the model will use too)."""
    fused = importlib.import_module("reformer_kernels.ops.axial_pos.fused")
    calls = []
    monkeypatch.setattr(fused, "check_index_range", lambda values, upper, name: calls.append((upper, name)))
    tables = [torch.randn(4, 3), torch.randn(6, 5)]
    ids = torch.zeros(2, 8, dtype=torch.int64)
    axial_word_embedding(ids, torch.randn(11, 8), tables, ids)
    assert calls == [(24, "position_ids (prod(axial_pos_shape) = 24)"), (11, "input_ids (vocab_size)")]


# ------------------------------------------------------------------------------------------------
# one validation per op: the same error type and message on every backend
# ------------------------------------------------------------------------------------------------


def _attention(**overrides):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 4, generator=g)
    args = dict(
        query=q,
        key=None,
        value=torch.randn(1, 2, 8, 4, generator=g),
        sorted_idx=torch.arange(16).repeat(1, 2, 1),
        chunk_length=4,
        num_chunks_before=1,
        num_chunks_after=0,
        causal=True,
        attention_mask=None,
        dropout_p=0.0,
    )
    args.update(overrides)
    return lambda: chunked_attention(**args)


def _hash(**overrides):
    g = torch.Generator().manual_seed(0)
    args = dict(
        vectors=torch.randn(1, 2, 8, 4, generator=g),
        rotations=torch.randn(2, 4, 2, 4, generator=g),
        num_buckets=8,
        attention_mask=None,
    )
    args.update(overrides)
    return lambda: lsh_hash(**args)


def _sort(buckets=None, num_bins=8):
    if buckets is None:
        buckets = torch.randint(0, 8, (1, 2, 16))
    return lambda: bucket_sort(buckets, num_bins)


def _axial(position_ids=None, tables=None):
    tables = tables if tables is not None else [torch.randn(4, 3), torch.randn(6, 5)]
    position_ids = position_ids if position_ids is not None else torch.arange(8).view(1, 8)
    return lambda: axial_position_embedding(position_ids, tables)


def _embedding(input_ids=None, dropout_p=0.0):
    input_ids = input_ids if input_ids is not None else torch.zeros(1, 8, dtype=torch.int64)
    return lambda: axial_word_embedding(
        input_ids, torch.randn(11, 8), [torch.randn(4, 3), torch.randn(6, 5)], dropout_p=dropout_p
    )


_duplicate_idx = torch.arange(16).repeat(1, 2, 1)
_duplicate_idx[0, 1, 5] = 6

# (id, call, error type, fragment of the message, reads values (a device assert on CUDA))
BAD_CALLS = [
    # chunked_attention
    ("attn-dropout-str", _attention(dropout_p="0.1"), TypeError, "dropout_p must be a float; got '0.1'", False),
    ("attn-dropout-bool", _attention(dropout_p=True), TypeError, "dropout_p must be a float", False),
    ("attn-dropout-one", _attention(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1); got 1.0", False),
    ("attn-dropout-nan", _attention(dropout_p=float("nan")), ValueError, "dropout_p must be in [0, 1)", False),
    ("attn-mask-list", _attention(attention_mask=[[1] * 8]), TypeError, "attention_mask must be a torch.Tensor", False),
    (
        "attn-mask-shape",
        _attention(attention_mask=torch.ones(1, 7)),
        ValueError,
        "attention_mask must have shape",
        False,
    ),
    (
        "attn-mask-complex",
        _attention(attention_mask=torch.ones(1, 8, dtype=torch.complex64)),
        TypeError,
        "attention_mask must be a bool",
        False,
    ),
    ("attn-causal-str", _attention(causal="no"), TypeError, "causal must be a bool; got 'no'", False),
    ("attn-causal-int", _attention(causal=1), TypeError, "causal must be a bool", False),
    ("attn-chunk-float", _attention(chunk_length=4.0), TypeError, "chunk_length must be an int; got 4.0", False),
    ("attn-chunk-zero", _attention(chunk_length=0), ValueError, "chunk_length must be an int >= 1", False),
    (
        "attn-chunk-divides",
        _attention(chunk_length=3),
        ValueError,
        "chunk_length must divide the sequence length 8",
        False,
    ),
    (
        "attn-before-negative",
        _attention(num_chunks_before=-1),
        ValueError,
        "num_chunks_before must be an int >= 0",
        False,
    ),
    ("attn-after-float", _attention(num_chunks_after=1.0), TypeError, "num_chunks_after must be an int", False),
    (
        "attn-idx-int16",
        _attention(sorted_idx=torch.arange(16, dtype=torch.int16).repeat(1, 2, 1)),
        TypeError,
        "sorted_idx must be an int32 or int64 tensor",
        False,
    ),
    (
        "attn-idx-float",
        _attention(sorted_idx=torch.arange(16.0).repeat(1, 2, 1)),
        TypeError,
        "sorted_idx must be an int32 or int64",
        False,
    ),
    (
        "attn-idx-shape",
        _attention(sorted_idx=torch.arange(12).repeat(1, 2, 1)),
        ValueError,
        "sorted_idx must have shape",
        False,
    ),
    ("attn-idx-list", _attention(sorted_idx=[0, 1]), TypeError, "sorted_idx must be a torch.Tensor", False),
    ("attn-idx-duplicate", _attention(sorted_idx=_duplicate_idx), ValueError, "row (0, 1) repeats a value", True),
    (
        "attn-idx-range",
        _attention(sorted_idx=torch.arange(16).repeat(1, 2, 1) + 1),
        ValueError,
        "sorted_idx must be in [0, 16); got values in [1, 16]",
        True,
    ),
    ("attn-key-shape", _attention(key=torch.randn(1, 2, 8, 3)), ValueError, "key shape (1, 2, 8, 3) differs", False),
    (
        "attn-key-dtype",
        _attention(key=torch.randn(1, 2, 8, 4).double()),
        TypeError,
        "key dtype torch.float64 differs",
        False,
    ),
    (
        "attn-query-int",
        _attention(query=torch.zeros(1, 2, 8, 4, dtype=torch.int32)),
        TypeError,
        "query must be a floating-point tensor",
        False,
    ),
    (
        "attn-query-3d",
        _attention(query=torch.zeros(2, 8, 4)),
        ValueError,
        "query must be a [batch, heads, length, head_dim] tensor",
        False,
    ),
    (
        "attn-head-dim-0",
        _attention(query=torch.zeros(1, 2, 8, 0), value=torch.zeros(1, 2, 8, 0)),
        ValueError,
        "query head_dim (query.shape[-1]) must be >= 1; got 0",
        False,
    ),
    # lsh_hash
    (
        "hash-buckets-float",
        _hash(num_buckets=8.0),
        TypeError,
        "num_buckets must be an int or a list of ints; got 8.0",
        False,
    ),
    ("hash-buckets-bool", _hash(num_buckets=True), TypeError, "num_buckets must be an int or a list of ints", False),
    (
        "hash-buckets-odd",
        _hash(num_buckets=7, rotations=torch.randn(2, 4, 2, 3)),
        ValueError,
        "even and >= 2; got 7",
        False,
    ),
    ("hash-buckets-empty", _hash(num_buckets=[]), ValueError, "non-empty list", False),
    ("hash-factor-float", _hash(num_buckets=[2, 4.0]), TypeError, "num_buckets factors must be ints; got 4.0", False),
    ("hash-rotations-shape", _hash(rotations=torch.randn(2, 4, 2, 5)), ValueError, "rotations must have shape", False),
    (
        "hash-rotations-int",
        _hash(rotations=torch.zeros(2, 4, 2, 4, dtype=torch.int64)),
        TypeError,
        "rotations must be a floating-point tensor",
        False,
    ),
    (
        "hash-vectors-int",
        _hash(vectors=torch.zeros(1, 2, 8, 4, dtype=torch.int64)),
        TypeError,
        "vectors must be a floating-point tensor",
        False,
    ),
    ("hash-vectors-list", _hash(vectors=[1.0]), TypeError, "vectors must be a torch.Tensor", False),
    (
        "hash-head-dim-0",
        _hash(vectors=torch.zeros(1, 2, 8, 0), rotations=torch.zeros(2, 0, 2, 4)),
        ValueError,
        "vectors head_dim (vectors.shape[-1]) must be >= 1",
        False,
    ),
    ("hash-mask-list", _hash(attention_mask=[[1] * 8]), TypeError, "attention_mask must be a torch.Tensor", False),
    (
        "hash-mask-shape",
        _hash(attention_mask=torch.ones(8)),
        ValueError,
        "attention_mask must have shape [batch, length] = (1, 8)",
        False,
    ),
    (
        "hash-increase-str",
        lambda: lsh_hash(torch.randn(1, 2, 8, 4), torch.randn(2, 4, 2, 4), 8, None, "yes"),
        TypeError,
        "increase_num_buckets must be a bool",
        False,
    ),
    # bucket_sort
    (
        "sort-int16",
        _sort(torch.zeros(1, 2, 4, dtype=torch.int16)),
        TypeError,
        "buckets must be an int32 or int64 tensor; got torch.int16",
        False,
    ),
    (
        "sort-uint8",
        _sort(torch.zeros(1, 2, 4, dtype=torch.uint8)),
        TypeError,
        "buckets must be an int32 or int64",
        False,
    ),
    ("sort-float", _sort(torch.zeros(1, 2, 4)), TypeError, "buckets must be an int32 or int64", False),
    (
        "sort-2d",
        _sort(torch.zeros(2, 4, dtype=torch.int64)),
        ValueError,
        "buckets must be a [batch, heads, rounds*length] tensor",
        False,
    ),
    ("sort-bins-float", _sort(num_bins=8.0), TypeError, "num_bins must be an int; got 8.0", False),
    ("sort-bins-zero", _sort(num_bins=0), ValueError, "num_bins must be an int >= 1", False),
    (
        "sort-range",
        _sort(torch.tensor([[[0, 9, 2]]])),
        ValueError,
        "buckets (num_bins = 8) must be in [0, 8); got values in [0, 9]",
        True,
    ),
    # axial position / word embeddings
    (
        "axial-int8",
        _axial(torch.arange(8, dtype=torch.int8).view(1, 8)),
        TypeError,
        "position_ids must be an int32 or int64 tensor; got torch.int8",
        False,
    ),
    (
        "axial-int16",
        _axial(torch.arange(8, dtype=torch.int16).view(1, 8)),
        TypeError,
        "position_ids must be an int32 or int64",
        False,
    ),
    (
        "axial-uint8",
        _axial(torch.arange(8, dtype=torch.uint8).view(1, 8)),
        TypeError,
        "position_ids must be an int32 or int64",
        False,
    ),
    ("axial-float", _axial(torch.arange(8.0).view(1, 8)), TypeError, "position_ids must be an int32 or int64", False),
    (
        "axial-range",
        _axial(torch.arange(8).view(1, 8) + 20),
        ValueError,
        "position_ids (prod(axial_pos_shape) = 24) must be in [0, 24); got values in [20, 27]",
        True,
    ),
    (
        "axial-table-list",
        _axial(tables=[torch.randn(4, 3), [1.0]]),
        TypeError,
        "axial_weights[1] must be a torch.Tensor",
        False,
    ),
    (
        "embed-ids-int8",
        _embedding(torch.zeros(1, 8, dtype=torch.int8)),
        TypeError,
        "input_ids must be an int32 or int64 tensor",
        False,
    ),
    ("embed-dropout-str", _embedding(dropout_p="0.1"), TypeError, "dropout_p must be a float; got '0.1'", False),
    ("embed-dropout-big", _embedding(dropout_p=1.5), ValueError, "dropout_p must be in [0, 1]; got 1.5", False),
]


def _outcome(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None, None


@pytest.mark.parametrize("case", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_bad_input_same_error_on_every_backend(case, device):
    """The same bad call gets the same error type and message on backend torch and triton, raised by
    the op's one validation before any work; the message names the argument."""
    _, call, error, fragment, reads_values = case
    if device == "cuda" and reads_values:
        pytest.skip("on CUDA tensors the value checks are asynchronous device asserts (no host sync)")
    outcomes = {}
    for name in BACKENDS:
        with reformer_kernels.backend(name):
            outcomes[name] = _outcome(call)
    assert outcomes["torch"] == outcomes["triton"], outcomes
    assert outcomes["torch"][0] is error, outcomes
    assert fragment in outcomes["torch"][1], outcomes


# ------------------------------------------------------------------------------------------------
# kernel limits: ValueError on backend triton, the PyTorch path on auto
# ------------------------------------------------------------------------------------------------


def _float64_calls():
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    return {
        "lsh_hash": lambda: lsh_hash(q, torch.randn(1, 4, 1, 2, dtype=torch.float64), 4),
        "chunked_attention": lambda: chunked_attention(q, None, q, None, 4, 1, 0, False),
        "axial_position_embedding": lambda: axial_position_embedding(
            torch.arange(6).view(1, 6), [torch.randn(2, 3).double(), torch.randn(3, 5).double()]
        ),
        "axial_word_embedding": lambda: axial_word_embedding(
            torch.zeros(1, 6, dtype=torch.int64),
            torch.randn(3, 8).double(),
            [torch.randn(2, 3).double(), torch.randn(3, 5).double()],
        ),
    }


@pytest.mark.parametrize("op", list(_float64_calls()))
def test_float64_is_a_value_error_on_backend_triton(op):
    """README: a call a kernel does not support (float64) raises a ValueError that says why on backend
    triton (it used to be a TypeError, and the axial kernels silently computed float64 in fp32), and
    runs the PyTorch path on backend torch."""
    call = _float64_calls()[op]
    with reformer_kernels.backend("triton"), pytest.raises(ValueError, match=r"backend 'triton': .*torch\.float64"):
        call()
    with reformer_kernels.backend("torch"):
        out = call()
    assert (out[0] if isinstance(out, tuple) else out).dtype in (torch.float64, torch.int32)


def test_auto_falls_back_for_what_the_kernels_refuse():
    """Each kernel's ``unsupported_reason`` names float64 (auto then runs PyTorch, even for CUDA tensors)."""
    from reformer_kernels.ops.axial_pos.triton import unsupported_reason as axial_reason
    from reformer_kernels.ops.chunked_attention.triton import unsupported_reason as attention_reason
    from reformer_kernels.ops.lsh_hash.triton import unsupported_reason as hash_reason

    q = torch.zeros(1, 1, 8, 4, dtype=torch.float64)
    assert "float64" in attention_reason(q, None, 4, 1, 0)
    assert "float64" in hash_reason(q, torch.zeros(1, 4, 1, 2), 4)
    assert "float64" in axial_reason([torch.zeros(2, 3, dtype=torch.float64)])
    assert attention_reason(q.float(), None, 4, 1, 0) is None
    assert hash_reason(q.float(), torch.zeros(1, 4, 1, 2), 4) is None
    assert axial_reason([torch.zeros(2, 3)]) is None


# ------------------------------------------------------------------------------------------------
# empty inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 8), (2, 0, 8), (2, 2, 0)], ids=["B0", "H0", "L0"])
def test_empty_inputs_give_empty_outputs(shape, backend, device):
    """B, H or L = 0: every op returns an empty result of the right shape on every backend (the torch
    path of lsh_hash raised a reshape error, chunked_attention with L = 0 a ZeroDivisionError)."""
    B, H, L = shape
    D, R = 4, 2
    x = torch.randn(B, H, L, D, device=device)
    with reformer_kernels.backend(backend):
        ids = lsh_hash(x, torch.randn(H, D, R, 4, device=device), 8, torch.ones(B, L, device=device))
        assert ids.shape == (B, H, R * L) and ids.dtype == torch.int32
        sorted_idx, undo = bucket_sort(ids, R * 9)
        assert sorted_idx.shape == undo.shape == (B, H, R * L) and sorted_idx.dtype == torch.int64
        for key, order in ((None, sorted_idx), (torch.randn(B, H, L, D, device=device), None)):
            q, v = x.clone().requires_grad_(), torch.randn(B, H, L, D, device=device, requires_grad=True)
            k = None if key is None else key.requires_grad_()
            out, probs = chunked_attention(q, k, v, order, 4, 1, 0, True, torch.ones(B, L, device=device))
            assert out.shape == (B, H, L, D) and probs is None
            grads = torch.autograd.grad(out.sum(), [t for t in (q, k, v) if t is not None])
            assert all(g.shape == (B, H, L, D) and not g.any() for g in grads)
            _, probs = chunked_attention(q, k, v, order, 4, 1, 0, True, return_probs=True)
            rows = L if order is None else R * L
            assert probs.shape == (B, H, rows // 4, 4, 8)
            out, grads = chunked_attention_with_grad(q, k, v, order, 4, 1, 0, True, None, torch.ones_like(q))
            assert out.shape == (B, H, L, D) and grads[0].shape == (B, H, L, D) and (grads[1] is None) == (k is None)
        tables = [torch.randn(4, 3, device=device), torch.randn(6, 5, device=device)]
        positions = torch.zeros(B, L, dtype=torch.int64, device=device)
        assert axial_position_embedding(positions, tables).shape == (B, L, 8)
        assert axial_word_embedding(positions, torch.randn(5, 8, device=device), tables, positions).shape == (B, L, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_transformers_model_takes_an_empty_batch(backend):
    """transformers' Reformer with our ops patched in: a batch of 0 sequences gives empty logits (the
    torch path of ``lsh_hash`` used to raise a reshape error there)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ReformerConfig(
        vocab_size=17,
        hidden_size=16,
        num_attention_heads=2,
        attention_head_size=8,
        feed_forward_size=16,
        attn_layers=["local", "lsh"],
        num_hashes=2,
        num_buckets=4,
        lsh_attn_chunk_length=4,
        local_attn_chunk_length=4,
        axial_pos_shape=[4, 4],
        axial_pos_embds_dim=[8, 8],
        max_position_embeddings=16,
        is_decoder=True,
        hash_seed=3,
    )
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(config).eval()
    reformer_kernels.patch_transformers(model)
    try:
        with reformer_kernels.backend(backend), torch.no_grad():
            logits = model(torch.zeros(0, 16, dtype=torch.int64)).logits
    finally:
        reformer_kernels.unpatch_transformers(model)
    assert logits.shape == (0, 16, 17)
