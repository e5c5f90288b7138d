"""``torch_fast.lsh_hash_fast`` against ``lsh_hash_reference``: bit-identical ids, no exclusions.

The fast path hashes rows in blocks (one einsum per row slice) and replaces
``argmax(cat([x, -x]))`` by max/min reductions; every comparison below is ``torch.equal``.
``BLOCK_BYTES`` is lowered in most tests so that short sequences are split into several blocks
(of ``MIN_BLOCK_ROWS // 2`` rows or more, the sizes the op itself uses for long sequences).
"""

from __future__ import annotations

import pytest
import torch

import reformer_kernels
from reformer_kernels.ops.lsh_hash import lsh_hash, lsh_hash_reference, torch_fast
from reformer_kernels.ops.lsh_hash.reference import bucket_factors
from reformer_kernels.ops.lsh_hash.torch_fast import lsh_hash_fast


def _rotations(num_heads, head_dim, num_rounds, num_buckets):
    return torch.randn(num_heads, head_dim, num_rounds, sum(bucket_factors(num_buckets)) // 2)


def _mask(batch_size, seq_len, kind):
    if kind == "none":
        return None
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if kind == "pad":
        mask[-1, max(1, seq_len - seq_len // 3) :] = 0
        if seq_len > 4:
            mask[0, seq_len // 2] = 0
        if seq_len == 1:
            mask[-1, 0] = 0
    return mask  # "ones": a mask without padding rows


@pytest.fixture
def small_blocks(monkeypatch):
    """Split every sequence into blocks of ~MIN_BLOCK_ROWS rows."""
    monkeypatch.setattr(torch_fast, "BLOCK_BYTES", 1)


def _num_blocks(vectors, rotations):
    batch_size, num_heads, seq_len, _ = vectors.shape
    width = rotations.shape[2] * rotations.shape[3]
    rows = torch_fast._block_rows(batch_size, num_heads, width, vectors.element_size(), seq_len)
    return -(-seq_len // rows)


CASES = [
    # (B, H, L, D, R, num_buckets, mask kind, increase_num_buckets)
    (1, 1, 1, 16, 1, 4, "none", False),
    (2, 3, 7, 32, 2, [4, 6], "pad", False),
    (2, 3, 150, 64, 4, [2, 2, 4], "pad", True),
    (2, 3, 150, 32, 1, 8, "ones", False),
    (1, 2, 4099, 64, 4, [16, 32], "pad", False),
    (2, 3, 4099, 64, 2, 32, "none", True),
    (2, 1, 1500, 48, 1, [4, 6, 2], "ones", True),
    (1, 2, 1, 16, 4, [4, 6], "pad", False),
]


def _case_id(case):
    b, h, length, d, r, nb, mask, inc = case
    nb_id = "x".join(map(str, nb)) if isinstance(nb, list) else str(nb)
    return f"B{b}-H{h}-L{length}-D{d}-R{r}-NB{nb_id}-{mask}{'-inc' if inc else ''}"


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fast_equals_reference(case, dtype, small_blocks):
    batch_size, num_heads, seq_len, head_dim, num_rounds, num_buckets, mask_kind, increase = case
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim).to(dtype)
    rotations = _rotations(num_heads, head_dim, num_rounds, num_buckets)
    mask = _mask(batch_size, seq_len, mask_kind)
    if seq_len >= 1024:
        assert _num_blocks(vectors, rotations) > 1

    expected = lsh_hash_reference(vectors, rotations, num_buckets, mask, increase)
    actual = lsh_hash_fast(vectors, rotations, num_buckets, mask, increase)
    assert actual.dtype == torch.int32 and actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties(dtype, small_blocks):
    """Zero vectors tie every column (and +0 with -0); duplicated and negated columns make
    max(x) == -min(x) and equal maxima: the first maximum of [x, -x] must win."""
    batch_size, num_heads, seq_len, head_dim, num_rounds = 2, 2, 1100, 32, 2
    num_buckets = [8, 6, 4]
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim)
    vectors[:, :, ::3] = 0.0
    vectors[:, :, 1::7] = -0.0
    rotations = _rotations(num_heads, head_dim, num_rounds, num_buckets)
    # group 0 = columns 0..3, group 1 = 4..6, group 2 = 7..8
    rotations[..., 1] = rotations[..., 0]
    rotations[..., 3] = -rotations[..., 2]
    rotations[..., 6] = rotations[..., 5]
    rotations[..., 8] = -rotations[..., 7]
    vectors = vectors.to(dtype)
    assert _num_blocks(vectors, rotations) > 1

    expected = lsh_hash_reference(vectors, rotations, num_buckets)
    actual = lsh_hash_fast(vectors, rotations, num_buckets)
    assert torch.equal(actual, expected)
    # the constructed ties occur: group 2 always has max(x) == -min(x) (x = [a, -a]); the tie
    # goes to the x part, so its digit is 0 or 1, never 2 or 3
    group2 = actual.long() % (8 * 6 * 4) // (8 * 6)
    assert (group2 < 2).all()
    # zero rows: bucket 0 plus the round offset
    zero_ids = actual.view(batch_size, num_heads, num_rounds, seq_len)[..., ::3]
    offsets = (torch.arange(num_rounds) * 192).view(1, 1, -1, 1)
    assert torch.equal(zero_ids, offsets.expand_as(zero_ids).to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(dtype):
    """argmax treats NaN as the maximum (first NaN wins, also over an earlier +inf)."""
    batch_size, num_heads, seq_len, head_dim, num_rounds = 1, 2, 64, 16, 2
    num_buckets = [8, 4]
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim)
    rotations = _rotations(num_heads, head_dim, num_rounds, num_buckets)
    # column 2 ignores dimension 0, so inf there gives +-inf in every column but NaN (inf * 0) in
    # column 2 only: rows with +inf at columns 0..1 before the NaN, and -inf (+inf in -x)
    rotations[:, 0, :, 2] = 0.0
    vectors[:, :, 0:8, 0] = float("inf")
    vectors[:, :, 8:16, 0] = float("-inf")
    vectors[:, :, 16:20, 3] = float("nan")  # NaN in every column
    vectors[:, :, 20:24, 0] = float("inf")
    vectors[:, :, 20:24, 1] = float("-inf")  # inf - inf: NaN depending on the column signs
    vectors = vectors.to(dtype)

    expected = lsh_hash_reference(vectors, rotations, num_buckets)
    actual = lsh_hash_fast(vectors, rotations, num_buckets)
    assert torch.equal(actual, expected)


def test_wide_group_integer_path():
    """A factor of 514 (257 columns) takes the integer-weight path: ties, NaN and inf there too."""
    vectors = torch.randn(2, 2, 33, 16)
    rotations = _rotations(2, 16, 2, [514, 4])
    rotations[..., 200] = rotations[..., 100]
    rotations[:, 0, :, 150] = 0.0
    vectors[:, :, ::5] = 0.0
    vectors[:, :, 1::5, 0] = float("inf")  # NaN in column 150, +-inf elsewhere
    for dtype in (torch.float32, torch.bfloat16):
        expected = lsh_hash_reference(vectors.to(dtype), rotations, [514, 4])
        assert torch.equal(lsh_hash_fast(vectors.to(dtype), rotations, [514, 4]), expected)


def test_masks_and_non_contiguous(small_blocks):
    vectors = torch.randn(2, 1200, 3, 32).transpose(1, 2)  # [B, H, L, D] view
    rotations = _rotations(3, 32, 2, [4, 6])
    mask = _mask(2, 1200, "pad")
    expected = lsh_hash_reference(vectors, rotations, [4, 6], mask)
    for m in (mask, mask.bool(), mask.float()):
        assert torch.equal(lsh_hash_fast(vectors, rotations, [4, 6], m), expected)
    # padding in a single position (decided on the device, not per block)
    one_pad = torch.ones(2, 1200, dtype=torch.long)
    one_pad[1, 1199] = 0
    assert torch.equal(
        lsh_hash_fast(vectors, rotations, [4, 6], one_pad), lsh_hash_reference(vectors, rotations, [4, 6], one_pad)
    )


def test_empty_length_and_grad_inputs():
    vectors = torch.randn(2, 3, 0, 16)
    rotations = _rotations(3, 16, 2, 8)
    ids = lsh_hash_fast(vectors, rotations, 8)
    assert ids.shape == (2, 3, 0) and ids.dtype == torch.int32
    vectors = torch.randn(1, 2, 20, 16, requires_grad=True)
    assert torch.equal(lsh_hash_fast(vectors, rotations[:2], 8), lsh_hash_reference(vectors, rotations[:2], 8))


def test_dispatch_uses_fast_path(monkeypatch):
    calls = []
    original = torch_fast.lsh_hash_fast

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_fast, "lsh_hash_fast", counting)
    vectors = torch.randn(2, 2, 30, 16)
    rotations = _rotations(2, 16, 2, [4, 4])
    with reformer_kernels.backend("torch"):
        ids = lsh_hash(vectors, rotations, [4, 4])
    assert calls and torch.equal(ids, lsh_hash_reference(vectors, rotations, [4, 4]))
    with pytest.raises(ValueError, match="rotations"):
        lsh_hash(vectors, rotations[:1], [4, 4])


@pytest.mark.parametrize("seq_len, num_rounds", [(16384, 1), (16384, 4), (65536, 1), (65536, 4)])
def test_block_projection_is_bitwise_the_full_einsum(seq_len, num_rounds):
    """The premise of the blocking: each block's einsum equals the same rows of the full one.

    Checked for the op's own blocks and for the smallest block it can make (MIN_BLOCK_ROWS / 2
    rows) at unaligned starts and at the sequence tail. (With torch 2.13 / MKL, slices of 1-3
    rows do not match: MKL's small-M path rounds differently.)
    """
    vectors = torch.randn(1, 2, seq_len, 64)
    rotations = _rotations(2, 64, num_rounds, [16, 32] if seq_len == 16384 else [32, 64])
    full = torch.einsum("bhld,hdrk->bhrlk", vectors, rotations)
    width = rotations.shape[2] * rotations.shape[3]
    rows = torch_fast._block_rows(1, 2, width, 4, seq_len)
    assert rows < seq_len
    smallest = torch_fast.MIN_BLOCK_ROWS // 2
    slices = [(start, rows) for start in range(0, seq_len, rows)]
    slices += [(start, smallest) for start in (0, 1, 777, seq_len // 2 + 3, seq_len - smallest)]
    for start, size in slices:
        block = torch.einsum("bhld,hdrk->bhrlk", vectors[:, :, start : start + size], rotations)
        assert torch.equal(block, full[:, :, :, start : start + size]), (start, size)


def test_large_case():
    """B1 H2 L16384 D64 R4, num_buckets [16, 32] (the model's configuration), default blocks."""
    vectors = torch.randn(1, 2, 16384, 64)
    rotations = _rotations(2, 64, 4, [16, 32])
    assert _num_blocks(vectors, rotations) > 1
    mask = torch.ones(1, 16384, dtype=torch.long)
    mask[0, -100:] = 0
    for m in (None, mask):
        assert torch.equal(
            lsh_hash_fast(vectors, rotations, [16, 32], m), lsh_hash_reference(vectors, rotations, [16, 32], m)
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_buckets", [2, 8, [4, 6], [16, 2, 4]], ids=str)
@pytest.mark.parametrize("num_rounds", [1, 3])
def test_few_rows_equal_reference(num_buckets, num_rounds, dtype, monkeypatch):
    """A decoding step's hash (one token per row: ``_hash_few_rows``) gives the reference's ids bit for bit,
    including exact ties (zero vectors), NaN and infinities; the path is seen taken."""
    calls = []
    original = torch_fast._hash_few_rows
    monkeypatch.setattr(torch_fast, "_hash_few_rows", lambda *args: calls.append(1) or original(*args))
    generator = torch.Generator().manual_seed(7)
    for batch_size, seq_len in [(1, 1), (3, 1), (2, 5), (1, torch_fast.FEW_ROWS)]:
        vectors = torch.randn(batch_size, 2, seq_len, 16, generator=generator)
        vectors[0, 0, 0] = 0.0
        if seq_len > 1:
            vectors[-1, 1, 1, 3] = float("nan")
            vectors[0, 1, -1, 2] = float("inf")
        vectors = vectors.to(dtype)
        rotations = torch.randn(2, 16, num_rounds, sum(bucket_factors(num_buckets)) // 2, generator=generator)
        for increase in (False, True):
            expected = lsh_hash_reference(vectors, rotations, num_buckets, None, increase)
            actual = lsh_hash_fast(vectors, rotations, num_buckets, None, increase)
            assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    assert len(calls) == 8
    # more rows, or a mask: the blocked path
    lsh_hash_fast(torch.randn(1, 2, torch_fast.FEW_ROWS + 1, 16), rotations, num_buckets)
    lsh_hash_fast(torch.randn(1, 2, 1, 16), rotations, num_buckets, torch.ones(1, 1, dtype=torch.long))
    assert len(calls) == 8


def test_few_rows_int64_ids():
    """Bucket counts past int32 give int64 ids on the few-rows path too."""
    num_buckets = [2**16, 2**16]
    vectors = torch.randn(1, 1, 2, 4)
    rotations = torch.randn(1, 4, 2, sum(num_buckets) // 2)
    expected = lsh_hash_reference(vectors, rotations, num_buckets, None, True)
    actual = lsh_hash_fast(vectors, rotations, num_buckets, None, True)
    assert expected.dtype == actual.dtype == torch.int64 and torch.equal(actual, expected)
