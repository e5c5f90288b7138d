"""Triton counting sort against ``torch.sort(stable=True)`` (Triton interpreter on CPU).

The sort is exact: sorted and undo indices must be equal, not close.
"""

from __future__ import annotations

import pytest
import torch

import reformer_kernels
from reformer_kernels.ops.bucket_sort import bucket_sort
from reformer_kernels.ops.bucket_sort.triton import BLOCK_N, _num_chunks, bucket_sort_triton


def _stable_sort(buckets):
    sorted_idx = torch.sort(buckets, dim=-1, stable=True).indices
    undo_idx = torch.argsort(sorted_idx, dim=-1)
    return sorted_idx, undo_idx


def _check(buckets, num_bins, num_chunks=None):
    if num_chunks is None:
        with reformer_kernels.backend("triton"):
            sorted_idx, undo_idx = bucket_sort(buckets, num_bins)
    else:
        sorted_idx, undo_idx = bucket_sort_triton(buckets, num_bins, num_chunks=num_chunks)
    expected_sorted, expected_undo = _stable_sort(buckets)
    assert sorted_idx.dtype == torch.int64 and undo_idx.dtype == torch.int64
    assert sorted_idx.shape == buckets.shape and undo_idx.shape == buckets.shape
    assert torch.equal(sorted_idx, expected_sorted)
    assert torch.equal(undo_idx, expected_undo)
    positions = torch.arange(buckets.shape[-1], device=buckets.device).expand_as(sorted_idx)
    assert torch.equal(sorted_idx.gather(-1, undo_idx), positions)


CASES = [
    # (B, H, N, num_bins, kind)
    (1, 1, 1, 1, "uniform"),
    (2, 3, 150, 7, "uniform"),  # many ties, 3 chunks per row
    (1, 1, 300, 1, "uniform"),  # a single bucket: the identity permutation
    (2, 1, 1000, 3, "uniform"),  # few buckets, 16 chunks per row
    (1, 2, 777, 5000, "uniform"),  # more buckets than ids, one chunk
    (2, 2, 129, 130, "uniform"),
    (1, 3, 500, 64, "skewed"),  # most ids in one bucket, long equal runs
    (2, 2, 4 * 61, 4 * 9, "lsh"),  # 4 rounds of L=61, 8 buckets + pad bucket, round offsets
    (1, 1, 700, 40, "sorted"),
    (1, 1, 700, 40, "reversed"),
]


def _case_id(case):
    b, h, n, nb, kind = case
    return f"B{b}-H{h}-N{n}-bins{nb}-{kind}"


def _make(batch_size, num_heads, n, num_bins, kind, device, dtype=torch.int32):
    shape = (batch_size, num_heads, n)
    if kind == "uniform":
        ids = torch.randint(0, num_bins, shape)
    elif kind == "skewed":
        ids = torch.where(torch.rand(shape) < 0.9, torch.full(shape, num_bins // 2), torch.randint(0, num_bins, shape))
    elif kind == "lsh":
        rounds, per_round = 4, num_bins // 4
        length = n // rounds
        ids = torch.randint(0, per_round - 1, (batch_size, num_heads, rounds, length))
        ids[..., -5:] = per_round - 1  # padded tokens in the pad bucket
        ids = (ids + torch.arange(rounds).view(1, 1, -1, 1) * per_round).reshape(shape)
    elif kind == "sorted":
        ids = torch.randint(0, num_bins, shape).sort(-1).values
    elif kind == "reversed":
        ids = torch.randint(0, num_bins, shape).sort(-1, descending=True).values
    else:
        raise AssertionError(kind)
    return ids.to(dtype).to(device)


# chunks per row: the heuristic (through the dispatcher), one chunk (every tile of a row carries
# its counters into the next one) and three (cross-chunk prefix sums with multi-tile chunks)
@pytest.mark.parametrize("num_chunks", [None, 1, 3], ids=["auto", "chunks1", "chunks3"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_stable_sort(case, num_chunks, device):
    batch_size, num_heads, n, num_bins, kind = case
    _check(_make(batch_size, num_heads, n, num_bins, kind, device), num_bins, num_chunks)


def test_cases_cover_chunking():
    """Multi-tile chunks with repeated ids across tiles, and several chunks per row, are exercised."""
    assert _num_chunks(1, 700, 40, 1) == (704, 1)
    assert _num_chunks(1, 700, 40, 3) == (256, 3)
    assert sum(_num_chunks(c[0] * c[1], c[2], c[3])[1] > 1 for c in CASES) >= 3


def test_int64_ids(device):
    _check(_make(2, 1, 200, 9, "uniform", device, torch.int64), 9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8], ids=["int16", "uint8", "int8"])
def test_other_integer_dtypes_are_refused(dtype, backend, device):
    """Ids are int32 or int64 on every backend (the other ops' ids too): one clear TypeError."""
    ids = _make(2, 1, 20, 9, "uniform", device, dtype)
    with reformer_kernels.backend(backend), pytest.raises(TypeError, match="buckets must be an int32 or int64 tensor"):
        bucket_sort(ids, 9)


def test_non_contiguous_ids(device):
    ids = _make(3, 2, 150, 11, "uniform", device).transpose(0, 1)  # [2, 3, 150] view
    assert not ids.is_contiguous()
    _check(ids, 11)


def test_deterministic(device):
    ids = _make(2, 2, 300, 5, "uniform", device)
    with reformer_kernels.backend("triton"):
        first = bucket_sort(ids, 5)
        second = bucket_sort(ids, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_empty(device):
    for shape in [(2, 3, 0), (0, 2, 5)]:
        ids = torch.zeros(shape, dtype=torch.int32, device=device)
        with reformer_kernels.backend("triton"):
            sorted_idx, undo_idx = bucket_sort(ids, 4)
        assert sorted_idx.shape == shape and undo_idx.shape == shape and sorted_idx.dtype == torch.int64


@pytest.mark.parametrize(
    "ids, num_bins, error, match",
    [
        (
            torch.tensor([[[0, 1, 7]]]),
            7,
            ValueError,
            r"buckets \(num_bins = 7\) must be in \[0, 7\); got values in \[0, 7\]",
        ),
        (torch.tensor([[[0, -1, 2]]]), 7, ValueError, r"must be in \[0, 7\); got values in \[-1, 2\]"),
        # an int64 id that would wrap to 3 in int32
        (torch.tensor([[[0, 2**32 + 3, 2]]]), 7, ValueError, r"must be in \[0, 7\)"),
        (torch.tensor([[[0.0, 1.0]]]), 7, TypeError, "int32 or int64"),
        (torch.tensor([[True, False]]), 7, ValueError, "buckets must be"),
        (torch.tensor([[[True, False]]]), 7, TypeError, "int32 or int64"),
        (torch.tensor([[[0, 1]]]), 0, ValueError, "num_bins must be an int >= 1"),
        (torch.tensor([[[0, 1]]]), 2.0, TypeError, "num_bins must be an int"),
    ],
    ids=["too_large", "negative", "int64_wrap", "float", "dims", "bool", "zero_bins", "float_bins"],
)
def test_validation_errors(ids, num_bins, error, match, device):
    if device == "cuda" and error is ValueError and "must be in" in match:
        pytest.skip("on CUDA out-of-range ids are reported by a device-side assert (no host sync)")
    ids = ids.to(device)
    with pytest.raises(error, match=match):
        bucket_sort_triton(ids, num_bins)
    # one validation for every backend: the torch path raises the same (it used to sort out-of-range ids)
    for backend in ("triton", "torch"):
        with reformer_kernels.backend(backend), pytest.raises(error, match=match):
            bucket_sort(ids, num_bins)


def test_kernels_ignore_and_flag_out_of_range_ids(device):
    """The CUDA path cannot check on the host: the hist kernel must flag bad ids on the device and
    both kernels must skip them (no out-of-bounds access), including int64 ids that would wrap."""
    from reformer_kernels.ops.bucket_sort.triton import bucket_sort_fwd_hist_kernel

    num_bins = 5
    ids = torch.tensor([[[0, 4, 5, -1, 2**32 + 1, 4, 1]]], dtype=torch.int64, device=device)
    counts = torch.zeros((1, 1, num_bins), dtype=torch.int32, device=device)
    err = torch.zeros(1, dtype=torch.int32, device=device)
    bucket_sort_fwd_hist_kernel[(1,)](
        ids, counts, err, 1, ids.shape[-1], num_bins, BLOCK_N, 1, *ids.stride(), BLOCK_N=BLOCK_N
    )
    assert err.item() == 1
    assert counts.view(-1).tolist() == [1, 1, 0, 0, 2]
    err.zero_()
    counts.zero_()
    good = ids.clamp(0, num_bins - 1)
    bucket_sort_fwd_hist_kernel[(1,)](
        good, counts, err, 1, ids.shape[-1], num_bins, BLOCK_N, 1, *good.stride(), BLOCK_N=BLOCK_N
    )
    assert err.item() == 0
    assert counts.view(-1).tolist() == [2, 1, 0, 0, 4]


def test_sorts_lsh_hash_output(device):
    """The real pipeline: ids from lsh_hash (round offsets, pad bucket), num_bins = R * (n + 1)."""
    from reformer_kernels.ops.lsh_hash import lsh_hash_reference

    batch_size, num_heads, seq_len, head_dim, num_rounds, num_buckets = 2, 3, 53, 16, 3, [4, 2]
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    rotations = torch.randn(num_heads, head_dim, num_rounds, 3, device=device)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    mask[1, 40:] = 0
    ids = lsh_hash_reference(vectors, rotations, num_buckets, mask)
    _check(ids, num_rounds * (8 + 1))
