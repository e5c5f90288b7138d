"""Stable counting sort of bucket ids in Triton: histogram -> prefix sum -> rank within bucket.

Each (batch, head) row of ``N = R*L`` ids is cut into ``T`` contiguous chunks, one program per
(row, chunk), and sorted in three launches, none of which uses atomics or a composite key:

1. ``bucket_sort_fwd_hist_kernel``: each program walks its chunk in tiles of ``BLOCK_N`` ids, in
   order, and counts the ids of each bucket into its own row ``counts[row, chunk, :]``. Within a
   tile, equal ids are found by an all-pairs comparison (``[BLOCK_N, BLOCK_N]``): the count of an
   id's bucket in the tile, and whether it is the bucket's last id in the tile. Only that last id
   updates the counter, so every counter has one writer. Ids outside ``[0, num_bins)`` raise a
   device-side error flag and are otherwise ignored (no out-of-bounds write).
2. ``bucket_sort_fwd_scan_kernel``: one program per row turns the counts into the first output
   position of each (chunk, bucket): ``offsets[c, b] = sum_{b' < b} total[b'] + sum_{c' < c}
   counts[c', b]`` (bucket-major order, which is what makes the sort stable across chunks).
3. ``bucket_sort_fwd_rank_kernel``: each program walks its chunk again in order; an id's output
   position is its (chunk, bucket) cursor plus the number of equal ids before it in the tile
   (the same all-pairs comparison); it writes ``sorted[pos] = i`` and ``undo[i] = pos``, and the
   bucket's last id in the tile advances the cursor. Positions are unique, so the scatter is race
   free and deterministic.

The counters and cursors live in global memory, owned by one program each; within a program a
tile's reads of them happen before a barrier and its updates after it, with a second barrier
before the next tile (``tl.debug_barrier``, i.e. ``bar.sync``, which also orders the CTA's global
memory accesses), and the loops are not software-pipelined (``num_stages=1``). The tables take
``B*H*T*num_bins`` int32 each; ``T`` is chosen to fill the GPU while keeping them at most about
4x the size of the ids.

Work per id is ``O(BLOCK_N)`` integer compares in registers and O(1) memory traffic: read the id
twice, a cursor gather, and the two int64 scatters of the result. Each loop loads the next tile's
ids before working on the current one, so the DRAM latency of the ids is off the loop's critical
path (the barriers keep Triton from pipelining by itself). There is no fallback to
``torch.sort``: no GPU here to show that it is faster for some shape; the benchmarks compare the
two on a GPU.

Out-of-range ids: the op's validation (``validation.check_index_range``, for every backend) raises a
``ValueError`` for CPU tensors (the interpreter) before any launch, and enqueues an asynchronous
device assert for CUDA tensors (a host check would synchronise). The hist kernel also sets a device
flag that ``torch._assert_async`` checks: the kernels never read or write out of bounds, and the
output is undefined.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...kernel_registry import KernelSpec

BLOCK_N = 64
BLOCK_B = 1024
_TARGET_PROGRAMS = 1024
_NUM_WARPS = 8
_KEY_TYPES = {torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def _tile_ranks(b_raw, o, end, num_bins, BLOCK_N: tl.constexpr):
    """For the ids ``b_raw`` of one tile (positions ``o``): validity, the ids as int32 (-1 when
    invalid), each id's rank among the equal ids before it in the tile, and their count."""
    o_n = tl.arange(0, BLOCK_N)  # [BN]
    m_n = o < end  # [BN]
    # compare in the ids' own dtype: an int64 id >= 2**32 must not wrap into range
    m_valid = m_n & (b_raw >= 0) & (b_raw < num_bins)  # [BN]
    b_key = tl.where(m_valid, b_raw, -1).to(tl.int32)  # [BN]
    b_eq = (b_key[:, None] == b_key[None, :]) & m_valid[None, :]  # [BN, BN]
    b_before = tl.sum((b_eq & (o_n[None, :] < o_n[:, None])).to(tl.int32), 1)  # [BN]
    b_count = tl.sum(b_eq.to(tl.int32), 1)  # [BN]
    m_invalid = m_n & ~m_valid  # [BN]
    return b_key, m_valid, m_invalid, b_before, b_count


@triton.jit
def bucket_sort_fwd_hist_kernel(
    keys_ptr,
    counts_ptr,
    err_ptr,
    H,
    N,
    num_bins,
    chunk,
    num_chunks,
    stride_b,
    stride_h,
    stride_n,
    BLOCK_N: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = i_p // num_chunks
    i_c = i_p % num_chunks
    p_keys = keys_ptr + (i_bh // H) * stride_b + (i_bh % H) * stride_h
    p_counts = counts_ptr + i_p * num_bins
    start = i_c * chunk
    end = tl.minimum(start + chunk, N)
    n_invalid = tl.zeros([BLOCK_N], dtype=tl.int32)  # [BN]
    o_n = tl.arange(0, BLOCK_N)  # [BN]
    b_next = tl.load(p_keys + (start + o_n) * stride_n, mask=start + o_n < end, other=0)  # [BN]
    for i_s in range(start, end, BLOCK_N):
        o = i_s + o_n  # [BN]
        b_raw = b_next  # [BN]
        # prefetch the next tile: its latency overlaps this tile's work and barriers
        b_next = tl.load(p_keys + (o + BLOCK_N) * stride_n, mask=o + BLOCK_N < end, other=0)  # [BN]
        b_key, m_valid, m_invalid, b_before, b_count = _tile_ranks(b_raw, o, end, num_bins, BLOCK_N)
        n_invalid += m_invalid.to(tl.int32)  # [BN]
        # the bucket's last id in the tile owns the update of its counter
        m_last = m_valid & (b_before == b_count - 1)  # [BN]
        b_old = tl.load(p_counts + b_key, mask=m_last, other=0)  # [BN]
        # every read of the counters precedes every write (threads may hold replicas of an id)
        tl.debug_barrier()
        tl.store(p_counts + b_key, b_old + b_count, mask=m_last)
        # the next tile reads what this one wrote
        tl.debug_barrier()
    any_invalid = tl.max(n_invalid, 0) > 0
    tl.store(err_ptr, 1, mask=any_invalid)


@triton.jit
def bucket_sort_fwd_scan_kernel(
    counts_ptr,
    offsets_ptr,
    num_bins,
    num_chunks,
    BLOCK_B: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    p_counts = counts_ptr + i_bh * num_chunks * num_bins
    p_offsets = offsets_ptr + i_bh * num_chunks * num_bins
    carry = tl.zeros([], dtype=tl.int32)
    for i_b in range(0, num_bins, BLOCK_B):
        o_b = i_b + tl.arange(0, BLOCK_B)  # [BB]
        m_b = o_b < num_bins  # [BB]
        b_total = tl.zeros([BLOCK_B], dtype=tl.int32)  # [BB]
        for i_c in range(num_chunks):
            b_total += tl.load(p_counts + i_c * num_bins + o_b, mask=m_b, other=0)  # [BB]
        # exclusive prefix over buckets, continuing from the previous block of buckets
        b_pos = tl.cumsum(b_total, 0) - b_total + carry  # [BB]
        carry += tl.sum(b_total, 0)
        for i_c in range(num_chunks):
            b_count = tl.load(p_counts + i_c * num_bins + o_b, mask=m_b, other=0)  # [BB]
            tl.store(p_offsets + i_c * num_bins + o_b, b_pos, mask=m_b)
            b_pos += b_count  # [BB]


@triton.jit
def bucket_sort_fwd_rank_kernel(
    keys_ptr,
    offsets_ptr,
    sorted_ptr,
    undo_ptr,
    H,
    N,
    num_bins,
    chunk,
    num_chunks,
    stride_b,
    stride_h,
    stride_n,
    BLOCK_N: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = i_p // num_chunks
    i_c = i_p % num_chunks
    p_keys = keys_ptr + (i_bh // H) * stride_b + (i_bh % H) * stride_h
    p_cursor = offsets_ptr + i_p * num_bins
    p_sorted = sorted_ptr + i_bh * N
    p_undo = undo_ptr + i_bh * N
    start = i_c * chunk
    end = tl.minimum(start + chunk, N)
    o_n = tl.arange(0, BLOCK_N)  # [BN]
    b_next = tl.load(p_keys + (start + o_n) * stride_n, mask=start + o_n < end, other=0)  # [BN]
    for i_s in range(start, end, BLOCK_N):
        o = i_s + o_n  # [BN]
        b_raw = b_next  # [BN]
        # prefetch the next tile: its latency overlaps this tile's work and barriers
        b_next = tl.load(p_keys + (o + BLOCK_N) * stride_n, mask=o + BLOCK_N < end, other=0)  # [BN]
        b_key, m_valid, m_invalid, b_before, b_count = _tile_ranks(b_raw, o, end, num_bins, BLOCK_N)
        b_pos = tl.load(p_cursor + b_key, mask=m_valid, other=0) + b_before  # [BN]
        tl.store(p_sorted + b_pos, o.to(tl.int64), mask=m_valid)
        tl.store(p_undo + o, b_pos.to(tl.int64), mask=m_valid)
        # every read of the cursors precedes every write (threads may hold replicas of an id)
        tl.debug_barrier()
        tl.store(p_cursor + b_key, b_pos + 1, mask=m_valid & (b_before == b_count - 1))
        # the next tile reads what this one wrote
        tl.debug_barrier()


def _num_chunks(num_rows: int, n: int, num_bins: int, chunks: int | None = None) -> tuple[int, int]:
    """(chunk length, number of chunks) per row: enough programs, bounded count tables."""
    n_tiles = triton.cdiv(n, BLOCK_N)
    if chunks is None:
        chunks = max(1, min(n_tiles, triton.cdiv(_TARGET_PROGRAMS, num_rows)))
        # counts and offsets are num_rows * chunks * num_bins int32 each: at most ~4x the ids
        chunks = max(1, min(chunks, (4 * n) // num_bins))
    chunks = max(1, min(chunks, n_tiles))
    chunk = triton.cdiv(n_tiles, chunks) * BLOCK_N
    return chunk, triton.cdiv(n, chunk)


def unsupported_reason(buckets: torch.Tensor, num_bins: int) -> str | None:
    """Why the counting sort cannot take these (valid) inputs, or ``None``: its tables and positions are
    int32. The ``auto`` backend falls back to ``torch.sort`` instead; backend ``triton`` raises a
    ``ValueError`` with this reason."""
    if num_bins >= 2**31:
        return (
            f"num_bins must be < 2**31 for the Triton counting sort (int32 tables); got {num_bins} "
            "(num_hashes * (prod(num_buckets) + 1) for LSH bucket ids)"
        )
    if buckets.shape[-1] >= 2**31:
        return f"buckets: the sorted dimension must be < 2**31 for the Triton counting sort; got {buckets.shape[-1]}"
    return None


def bucket_sort_triton(
    buckets: torch.Tensor, num_bins: int, *, num_chunks: int | None = None, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``bucket_sort``: stable sort of ``[B, H, N]`` ids in ``[0, num_bins)``.

    Returns ``(sorted_idx, undo_idx)``, int64 ``[B, H, N]``, equal to ``bucket_sort_reference``.
    ``num_chunks`` overrides the number of chunks per row (tests and tuning; default: heuristic).
    ``check=False`` skips the validation a caller (the ``bucket_sort`` op) has already run: the op's
    ``check_bucket_sort_inputs`` (including the id range) and ``unsupported_reason``.
    """
    if check:
        from . import check_bucket_sort_inputs

        check_bucket_sort_inputs(buckets, num_bins)
        reason = unsupported_reason(buckets, num_bins)
        if reason is not None:
            raise ValueError(reason)
    if num_chunks is not None and (not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"num_chunks must be a positive int or None; got {num_chunks!r}")
    return torch.ops.reformer_kernels.bucket_sort_triton(buckets, int(num_bins), num_chunks)


@triton_op("reformer_kernels::bucket_sort_triton", mutates_args=())
def _bucket_sort_triton_op(
    buckets: torch.Tensor, num_bins: int, num_chunks: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three kernel launches as a registered operator (``torch.compile`` traces them through ``wrap_triton``)."""
    batch_size, num_heads, n = buckets.shape

    sorted_idx = torch.empty((batch_size, num_heads, n), dtype=torch.int64, device=buckets.device)
    undo_idx = torch.empty_like(sorted_idx)
    if sorted_idx.numel() == 0:
        return sorted_idx, undo_idx

    num_rows = batch_size * num_heads
    chunk, num_chunks = _num_chunks(num_rows, n, num_bins, num_chunks)
    counts = torch.zeros((num_rows, num_chunks, num_bins), dtype=torch.int32, device=buckets.device)
    offsets = torch.empty_like(counts)
    err = torch.zeros(1, dtype=torch.int32, device=buckets.device)
    strides = (buckets.stride(0), buckets.stride(1), buckets.stride(2))
    grid = (num_rows * num_chunks,)
    wrap_triton(bucket_sort_fwd_hist_kernel)[grid](
        buckets, counts, err, num_heads, n, num_bins, chunk, num_chunks, *strides,
        BLOCK_N=BLOCK_N, num_warps=_NUM_WARPS, num_stages=1,
    )  # fmt: skip
    if buckets.is_cuda:
        # raises on the device, without synchronising the host, if an id was out of range
        torch._assert_async(err[0] == 0, "bucket_sort: buckets must lie in [0, num_bins)")
    wrap_triton(bucket_sort_fwd_scan_kernel)[(num_rows,)](
        counts, offsets, num_bins, num_chunks, BLOCK_B=BLOCK_B, num_warps=_NUM_WARPS, num_stages=1
    )
    wrap_triton(bucket_sort_fwd_rank_kernel)[grid](
        buckets, offsets, sorted_idx, undo_idx, num_heads, n, num_bins, chunk, num_chunks, *strides,
        BLOCK_N=BLOCK_N, num_warps=_NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return sorted_idx, undo_idx


def kernel_specs() -> list[KernelSpec]:
    """The three kernels as launched on contiguous ids (int32 from ``lsh_hash``, and int64)."""
    ints = ("H", "N", "num_bins", "chunk", "num_chunks", "stride_b", "stride_h")
    specs = []
    for type_name in _KEY_TYPES.values():
        specs.append(
            KernelSpec(
                name=f"bucket_sort_fwd_hist-{type_name}",
                kernel=bucket_sort_fwd_hist_kernel,
                signature={
                    "keys_ptr": f"*{type_name}",
                    "counts_ptr": "*i32",
                    "err_ptr": "*i32",
                    **{k: "i32" for k in ints},
                },
                constexprs={"stride_n": 1, "BLOCK_N": BLOCK_N},
                num_warps=_NUM_WARPS,
                num_stages=1,
                divisible_by_16=("chunk",),
            )
        )
        specs.append(
            KernelSpec(
                name=f"bucket_sort_fwd_rank-{type_name}",
                kernel=bucket_sort_fwd_rank_kernel,
                signature={
                    "keys_ptr": f"*{type_name}",
                    "offsets_ptr": "*i32",
                    "sorted_ptr": "*i64",
                    "undo_ptr": "*i64",
                    **{k: "i32" for k in ints},
                },
                constexprs={"stride_n": 1, "BLOCK_N": BLOCK_N},
                num_warps=_NUM_WARPS,
                num_stages=1,
                divisible_by_16=("chunk",),
            )
        )
    specs.append(
        KernelSpec(
            name="bucket_sort_fwd_scan",
            kernel=bucket_sort_fwd_scan_kernel,
            signature={"counts_ptr": "*i32", "offsets_ptr": "*i32", "num_bins": "i32", "num_chunks": "i32"},
            constexprs={"BLOCK_B": BLOCK_B},
            num_warps=_NUM_WARPS,
            num_stages=1,
        )
    )
    return specs
