"""Fast PyTorch (CPU) implementation of the LSH hash op.

Bit-identical to ``reference.lsh_hash_reference`` (the specification) for every input, organised
for speed and memory:

* Rows of the sequence are hashed in blocks (all batch x head pairs together), so the rotated
  block (~1 MB) stays in cache and no full ``[B, H, R, L, K]`` projection is materialised.
  Ids are written into one preallocated ``[B, H, R, L]`` int32 (or int64, see the reference) output.
* Each block's projection is transposed to columns-first (``[H, R, K, B, l]``) so the per-group
  reductions below are vectorised elementwise operations across rows.
* ``argmax(cat([x, -x]))`` becomes: the ``-x`` part wins iff ``-min(x) > max(x)``, and the
  index is the first column equal to the winning extreme (see ``_group_argmax`` for why ties,
  signed zeros, inf and NaN come out the same as in ``argmax``): no concatenation, negation or
  index-returning reduction over ``2K`` columns.
* The pad bucket and the round offsets are decided on the device, as in the reference (no host
  synchronisation). ``lsh_hash`` dispatches here for CPU tensors only (see below).
* A few rows (a decoding step hashes one token per row) take ``_hash_few_rows``: the reference's own
  arithmetic in its fewest operator calls, where the blocked machinery above would cost ten times more calls
  than the work it organises.

Bitwise identity of the projection. The reference computes
``einsum("bhld,hdrk->bhrlk", vectors, rotations)``, which torch lowers to one batched GEMM over
heads, ``[H, B*L, D] @ [H, D, R*K]``. Each block here runs the *same* einsum on a row slice
``vectors[:, :, l0:l1]``, i.e. the same GEMM restricted to some rows. Every output element is
a D-long dot product whose summation order is fixed by the GEMM micro-kernel, so the slice
reproduces the full GEMM's bits as long as both go through the same kernel. Measured with
torch 2.13 / MKL 2024.2 (AVX-512 code path on this AMD CPU), 1 and 2 threads, fp32, D 16..256,
R*K 4..512, B 1..3, block starts at any row (aligned or not) and the sequence tail: every slice
whose GEMM has at least 4 rows per thread matches the full einsum exactly; slices of 1-3 rows
(MKL's small-M path) do not. fp64, fp16 and bf16 matched for every slice size (2 threads). Therefore a
sequence that fits in one block is hashed with exactly the reference's call, and longer ones are
split into near-equal blocks of at least ``MIN_BLOCK_ROWS // 2`` rows, far above that limit.
``tests/ops/test_lsh_hash_fast.py`` re-checks the per-block projection against the full einsum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import bucket_factors, bucket_id_dtype, factor_buckets, num_buckets_product

# Target size of one block's rotated values ([B, H, R, rows, K] in the input dtype): fits the
# 2 MB per-core L2 with room for the reductions' outputs.
BLOCK_BYTES = 1 << 20
# Never split into blocks below this many rows (see the module docstring: the GEMM of a block must
# stay far from MKL's small-M path, whose rounding differs from the full product).
MIN_BLOCK_ROWS = 512


def _block_rows(batch_size: int, num_heads: int, width: int, element_size: int, seq_len: int) -> int:
    """Rows of L per block: near-equal blocks of about ``BLOCK_BYTES``, never small."""
    target = max(MIN_BLOCK_ROWS, BLOCK_BYTES // max(1, batch_size * num_heads * width * element_size))
    if seq_len <= target:
        return max(seq_len, 1)
    num_blocks = -(-seq_len // target)
    # near-equal blocks: every block has >= target / 2 >= MIN_BLOCK_ROWS / 2 rows
    return -(-seq_len // num_blocks)


# At most this many rows (batch x length) go through ``_hash_few_rows``.
FEW_ROWS = 64

# Groups up to this many columns mark columns with float weights (exact integers in bf16 too).
_FLOAT_WEIGHTS_MAX_COLUMNS = 256


def _group_argmax(columns: torch.Tensor) -> torch.Tensor:
    """``argmax(cat([x, -x], 2), 2)`` for ``columns = x`` of shape ``[H, R, k, ...]`` (int64, dim 2 removed).

    Overwrites ``columns``.

    The columns are an outer dim, so every reduction below is an elementwise (vectorised) operation
    across the rows; torch's index-returning ``argmax``/``max`` over a short last dim run a scalar
    loop per row and cost ~2x more here.

    * The ``-x`` part wins only if ``-min(x) > max(x)`` strictly: on a tie ``argmax`` of the
      concatenation returns the earlier index, which is in the ``x`` part. Negation is exact in
      every float format, so ``-min(x)`` is the ``-x`` part's maximum bit for bit, and the winning
      value is ``maximum(max(x), -min(x))``; the winning ``-x`` entries are where ``x == min(x)``.
    * The index is the first column equal (``==``, so ``-0.0 == 0.0`` as in ``argmax``) to the
      winning value: ``k - max_j(equal_j * (k - j))``.
    * NaN: ``argmax`` treats NaN as the maximum and returns the first NaN, at some column ``j``
      of ``x`` (its ``-x`` copy is at ``k + j``, later). ``amax``/``amin`` propagate NaN and a
      comparison with NaN is false, so such rows take the ``x`` branch with target NaN, and
      ``| isnan`` marks exactly the NaN columns (rows without NaN have none).
    """
    k = columns.shape[2]
    max_values = columns.amax(2, keepdim=True)  # [H, R, 1, ...]
    min_values = columns.amin(2, keepdim=True)  # [H, R, 1, ...]
    negative = min_values.neg() > max_values  # [H, R, 1, ...]
    target = torch.where(negative, min_values, max_values)  # [H, R, 1, ...]
    if k <= _FLOAT_WEIGHTS_MAX_COLUMNS:
        # In-place comparisons write 1.0/0.0 into a float tensor faster than ``==`` and
        # ``isnan`` produce bool tensors here; integers up to 256 are exact in every float format.
        weights = torch.arange(k, 0, -1, dtype=columns.dtype, device=columns.device)
        marks = columns.clone().eq_(target)  # [H, R, k, ...]
        marks += columns.ne_(columns)  # NaN columns (``columns`` is consumed)
        marks *= weights.view(k, *([1] * (columns.dim() - 3)))
    else:
        weights = torch.arange(k, 0, -1, dtype=torch.int64, device=columns.device)
        equal = columns == target  # [H, R, k, ...]
        equal |= columns.isnan()
        marks = equal * weights.view(k, *([1] * (columns.dim() - 3)))  # [H, R, k, ...]
    # the largest mark k - j is the first equal column j
    first = marks.amax(2).to(torch.int64)  # [H, R, ...]
    # x part: k - first; -x part: k + (k - first)
    return (negative.squeeze(2) * k + k) - first


def _hash_few_rows(
    vectors: torch.Tensor, rotations: torch.Tensor, factors: tuple[int, ...], increase_num_buckets: bool
) -> torch.Tensor:
    """``lsh_hash_reference`` without an attention mask, in its fewest calls: the reference einsum's own batched
    product (``einsum`` lowers ``bhld,hdrk->bhrlk`` to ``[H, B*L, D] @ [H, D, R*K]``; called here directly, hence
    the same projection bits, without einsum's parsing and a dozen view calls) and ``argmax(cat([x, -x]))`` per
    factor; round offsets as Python ints."""
    batch_size, num_heads, seq_len, head_dim = vectors.shape
    num_rounds, width = rotations.shape[2:]
    rows = vectors.transpose(0, 1).reshape(num_heads, batch_size * seq_len, head_dim)  # [H, B*L, D]
    product = torch.bmm(rows, rotations.reshape(num_heads, head_dim, num_rounds * width))  # [H, B*L, R*K]
    rotated = product.view(num_heads, batch_size, seq_len, num_rounds, width).permute(1, 0, 3, 2, 4)  # [B, H, R, L, K]
    buckets = factor_buckets(rotated, factors)  # [B, H, R, L]
    if num_rounds > 1:
        per_round = num_buckets_product(factors) + int(increase_num_buckets)
        offsets = torch.arange(0, num_rounds * per_round, per_round, device=vectors.device)  # [R]
        buckets = buckets.add_(offsets.view(num_rounds, 1))  # [B, H, R, L]
    out = buckets.to(bucket_id_dtype(num_rounds, factors))  # [B, H, R, L]
    return out.view(batch_size, num_heads, num_rounds * seq_len)


def lsh_hash_fast(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    increase_num_buckets: bool = False,
) -> torch.Tensor:
    """Same contract and output as ``reference.lsh_hash_reference`` (``[B, H, R*L]`` int32 or int64)."""
    factors = bucket_factors(num_buckets)
    batch_size, num_heads, seq_len, _ = vectors.shape
    num_rounds = rotations.shape[2]
    # (each call skipped where it would return its input: a decoding step hashes with a few dozen calls in all)
    if vectors.requires_grad:
        vectors = vectors.detach()
    if rotations.requires_grad:
        rotations = rotations.detach()
    if rotations.dtype != vectors.dtype:
        rotations = rotations.to(vectors.dtype)
    device = vectors.device

    if attention_mask is None and batch_size * seq_len <= FEW_ROWS:
        return _hash_few_rows(vectors, rotations, factors, increase_num_buckets)

    total = 1
    for factor in factors:
        total *= factor

    # the extra pad bucket, decided on the device (no host synchronisation), as in the reference
    keep = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)  # [B, L]
        has_padding = (~keep).any()
        # a row keeps its bucket if it is not padding or the batch has no padding at all
        keep = keep | ~has_padding  # [B, L]
        buckets_per_round = total + (has_padding | increase_num_buckets).to(torch.int64)
    else:
        buckets_per_round = total + int(increase_num_buckets)
    # round r is offset by r * buckets_per_round: nothing to add with one round (a decoding step hashes one token)
    offsets = None
    if num_rounds > 1:
        offsets = torch.arange(num_rounds, device=device).view(-1, 1, 1) * buckets_per_round  # [R, 1, 1]

    out = torch.empty(
        batch_size, num_heads, num_rounds, seq_len, dtype=bucket_id_dtype(num_rounds, factors), device=device
    )
    if out.numel() == 0:
        # empty in, empty out (the blocked reshapes below cannot infer sizes of 0 elements)
        return out.view(batch_size, num_heads, num_rounds * seq_len)
    out_hrbl = out.permute(1, 2, 0, 3)  # [H, R, B, L] view
    width = num_rounds * rotations.shape[3]
    rows = _block_rows(batch_size, num_heads, width, vectors.element_size(), seq_len)
    for start in range(0, seq_len, rows):
        stop = min(start + rows, seq_len)
        block_rows = batch_size * (stop - start)
        # the reference's einsum on a row slice: bitwise the same projection (module docstring)
        rotated = torch.einsum("bhld,hdrk->bhrlk", vectors[:, :, start:stop], rotations)  # [B, H, R, l, K]
        # Columns before rows: [H, R*K, B*l]. The einsum's result is a view of a [H, B*l, R*K]
        # GEMM output; a per-head 2-D transpose copy takes torch's cache-blocked transpose path
        # (faster than one permuted copy; benchmarks/README.md).
        columns = torch.empty(num_heads, width, block_rows, dtype=rotated.dtype, device=device)
        for head in range(num_heads):
            gemm_rows = rotated[:, head].permute(0, 2, 1, 3).reshape(block_rows, width)  # [B*l, R*K]
            columns[head].copy_(gemm_rows.t())
        columns = columns.view(num_heads, num_rounds, -1, batch_size, stop - start)  # [H, R, K, B, l]
        buckets = None
        column, radix = 0, 1
        for factor in factors:
            # each group's columns are read by this group only, so it may overwrite them
            factor_bucket = _group_argmax(columns[:, :, column : column + factor // 2])  # [H, R, B, l]
            column += factor // 2
            if buckets is None:
                buckets = factor_bucket
            else:
                buckets += radix * factor_bucket
            radix *= factor
        if keep is not None:
            buckets = torch.where(keep[:, start:stop], buckets, total)
        if offsets is not None:
            buckets += offsets
        # int64 -> the output dtype, like the reference's final ``.to(bucket_id_dtype(...))``
        out_hrbl[..., start:stop] = buckets
    return out.view(batch_size, num_heads, num_rounds * seq_len)
