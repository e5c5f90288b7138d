"""Chunked LSH / local attention in Triton: fused forward, round combine and backward.

The visiting order (``sorted_idx``: LSH buckets, all hash rounds one after another; ``None``: the
identity order of local attention) is a sequence of ``R * L`` rows cut into ``N = R * L / C``
chunks of ``C`` rows (any ``C >= 1``). One program owns a block of rows of one query chunk of
one (batch, head) and reads them and the ``W = C * (before + 1 + after)`` key/value rows of its
window *through the sorted index*: row ``t`` is token ``sorted_idx[t] % L``. The window is simply
``W`` consecutive visiting rows starting at the first row of chunk ``n - before``, wrapping
circularly over all ``R * L`` rows. Nothing is gathered, chunked or materialised in memory;
scores live in registers only.

Forward (``chunked_attention_fwd_kernel``), per query row ``i`` and window key ``j``::

    s_ij = q_i . x_j * rsqrt(mean(x_j^2) + 1e-6) / sqrt(D)    shared QK (x = query rows)
    s_ij = q_i . k_j / sqrt(D)                                 separate keys (local)
    s_ij = -1e9  where key j is masked (attention_mask) or (causal and p_j > p_i)
    s_ij = -1e5  where p_j == p_i                               (shared QK only)
    lse_i = m_i + log(sum_j exp(s_ij - m_i)),   o_i = sum_j exp(s_ij - lse_i) v_j

with an online softmax in fp32 (``exp2``/``log2``). The output and the fp32 ``lse`` of row ``t``
are stored straight at slot ``sorted_idx[t]`` of per-round buffers ``[B, H, R * L, (D)]`` (the
original position in round ``sorted_idx[t] // L``); for ``R == 1`` the output buffer is the final
output. ``chunked_attention_combine_fwd_kernel`` then mixes the rounds with weights
``w_r = exp(lse_r - LSE)``, ``LSE = logsumexp_r(lse_r)``.

Numerics follow the reference bit for bit where it matters:

- The replacement values are applied to fp32 scores, so they are the reference's fp32 values
  (-1e9 / -1e5) for every input dtype. The reference uses -1e4 / -1e3 for fp16 *scores*; in exact
  arithmetic both give the same result, but rows whose keys are all masked are special: the
  reference's logsumexp of identical huge values rounds to the value itself (``fl(-1e9 + log w) ==
  -1e9``, and for fp16 scores ``fl16(-1e4 + log w) == -1e4`` for ``w <= 54``), so every masked key
  gets probability exactly 1 and the row's output is the *sum* of its window's values (and rounds
  sum the same way). With fp32 scores and -1e4 that rounding does not happen; with -1e9 it does,
  so the kernel reproduces the reference for fp32, bf16 and (for ``w <= 54``) fp16 inputs.
- For the same reason the max, the logsumexp and the rescaling are kept in natural-log units and
  the exponentials are ``exp2((s - m) * log2(e))``: folding ``log2(e)`` into the score scale would
  round ``m`` and ``lse`` in base 2, and the reference's rounding of ``lse`` at -1e5 (a row that
  sees only copies of itself from several rounds) would not be reproduced. The extra multiply per
  score is the price of matching the specification.
- The output is ``acc * exp(m - lse)`` rather than ``acc / l``: identical up to rounding for
  ordinary rows, and exactly the reference's ``exp(s - lse)`` for the degenerate ones.

Backward: probabilities are recomputed from the saved ``lse`` (no score matrix is stored), clamped
to ``p <= 1``: recomputed scores agree with the forward's to fp32 rounding (``~1e-7 |s|``), so for
huge scores (rows of ``|q| ~ 1e19``) the recomputed probabilities are that inexact, but finite.
With ``dO_r = w_r * dout`` and the round weights' gradient ``dlse_r = w_r (dout.O_r - dout.out)``,
the softmax gradient of a row of round ``r`` is ``ds_ij = p_ij (dp_ij - w_r * (dout . out))``,
so only ``delta = dout . out`` per position is precomputed
(``chunked_attention_bwd_preprocess_kernel``). ``chunked_attention_bwd_dkv_kernel`` (one program
per block of key rows and head_dim slice, key-major like flash attention's dK/dV pass, looping
over the query rows whose window holds them) writes dK (through the key normalisation in
shared-QK mode) and dV of each visiting row to its slot; ``chunked_attention_bwd_dq_kernel`` (one
program per block of query rows and head_dim slice) writes dQ, adding the key-role gradient in
shared-QK mode. The key normalisation's backward needs ``dk . x`` over all of head_dim, which a
slice does not hold: it is taken from the scores instead, ``cs * (dk . x) = sum_q ds_jq s_jq``.
Every (slot, column) is written by exactly one program, and the rounds are summed afterwards with a
torch reduction: no atomics, bit-identical gradients run to run. The per-slot gradient buffers are fp32
``[B, H, R * L, D]`` (dQ, dV, and dK for separate keys) whenever R > 1 or in shared-QK mode; local
attention writes the final gradients directly.

Tiling (``launch_config``): a program owns ``BLOCK_R`` rows of a chunk (the next power of two
>= max(16, C), at most 128; a longer chunk takes several programs) and walks the other side of its
``[rows, window]`` score tile in blocks of ``BLOCK_W`` rows (16 or 32); head rows are padded to
``BLOCK_D`` = the next power of two >= max(16, D) columns. Block rows beyond the chunk or the
window and columns beyond D are masked loads that read zeros, and such padding keys get the score
``-inf`` (probability exactly 0), unlike masked keys, which get the finite replacement values
above. The chunk length is a runtime argument (``do_not_specialize``): the model calls the op with
``chunk_length = L`` for short sequences, and that must not compile a kernel per length.

One warp per 16 rows: Triton lays the warps of chained dots all along M when the deciding
(last) dot has M >= N, so that every warp keeps only its 16 rows of the loop-invariant operands;
with warps along N (its choice when M < N, e.g. a ``[64, 128]`` accumulator) every warp holds the
whole K/V (Q/dO) tile, which spilled at head_dim 128. Hence the backward kernels accumulate in
head_dim slices of at most 64 columns (``BLOCK_DV``), one program per slice, each computing the
scores over all of head_dim: at head_dim 128 that doubles the backward's score work and halves
its accumulators. The dK/dV loop computes scores, P and dV before dP, dS and dK, which keeps fewer
``[rows, W]`` tiles live. ``tl.dot`` operands are loaded from memory in the orientation the dot
needs (``[D, W]`` for transposed keys/values/queries) instead of transposing register tiles.

Row, slot, window and dropout-counter arithmetic is int32 (the host checks ``R * L * D < 2**31``,
``R * L + W < 2**31`` and, with dropout, ``R * L * W < 2**31``); only the per-(batch, head) base
offsets are int64, so ``B * H * R * L * D`` may exceed 2**31. The kernels make no alignment
promises: the JIT's specialisation of strides and sizes that are multiples of 16 tells the
compiler when row gathers can vectorise (and odd lengths or head dims are then simply scalar).

Dropout on the probabilities uses Philox (``tl.rand``): one seed per call, drawn from torch's
default generator (``torch.manual_seed`` reproduces it), with the (batch, head) in the high word
of the 64-bit Philox key and the 32-bit counter ``t * W + j`` (query row ``t`` of the visiting
order, window column ``j``); the backward replays the same mask. The logsumexp (and the round
weights) are computed before dropout, as in the reference. ``dropout_keep_mask`` returns the mask
in the reference's probability layout (tests use it to replay the reference with the same mask).

Limits of the kernels (``unsupported_reason``: a ``ValueError`` on backend ``triton``, the PyTorch path
on ``auto``): head_dim <= 256, fp16 / bf16 / fp32 (bf16 not under the interpreter, which computes it
wrongly), the int32 sizes above. ``sorted_idx`` must be a permutation of ``[0, R * L)`` in each
(batch, head) row, as ``bucket_sort`` returns it; the op checks it before any launch
(``validation.check_permutation``: a ``ValueError`` for CPU tensors, an asynchronous device assert for
CUDA tensors, no host sync), and an out-of-range entry never makes the kernels access memory out of
bounds anyway. The AOT compile test
checks every kernel spill-free for head_dim 64 / 128 x chunk 64 / 128 (and 96 / 100) on sm_80 and
sm_90a; head_dim 256 compiles and is correct but spills a little (measured: the forward 128 B on
sm_80, dK/dV 96 B on sm_90a).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...backend import triton_interpreting
from ...kernel_registry import KernelSpec
from .reference import mask_values

__all__ = [
    "chunked_attention_triton",
    "dropout_keep_mask",
    "is_supported",
    "kernel_specs",
    "launch_config",
    "unsupported_reason",
]

# The kernels' scores are fp32, so they use the fp32 replacement values (see the module docstring).
MASK_VALUE, SELF_MASK_VALUE = mask_values(torch.float32)
NORM_EPS = 1e-6
# tl.dot operands need every dim >= 16 on the GPU: blocks are padded up to it
MIN_BLOCK = 16
MAX_HEAD_DIM = 256

_MASK_VALUE = tl.constexpr(MASK_VALUE)
_SELF_MASK_VALUE = tl.constexpr(SELF_MASK_VALUE)
_NORM_EPS = tl.constexpr(NORM_EPS)
# shared-QK key rows at least this large are rescaled by a power of two first (``_key_scale``):
# D * x^2 <= 256 * 2**118 stays below the fp32 maximum ~2**128 for smaller rows
_BIG_KEY = tl.constexpr(2.0**59)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Launch configuration (see ``launch_config``; compiled spill-free by the AOT test at head_dim 64 /
# 128 and chunk 64 / 128 on sm_80 and sm_90a).
_MAX_ROWS = 128
_ROWS_PER_WARP = 16
_MAX_BLOCK = 32
_MAX_DV = 64
_ATTN_STAGES = 1
_BLOCK_L = 64
_ROW_WARPS = 4


@triton.jit
def _load_rows(idx_ptr, o_t, m_t, num_rows, seq_len, HAS_IDX: tl.constexpr):
    """Visiting rows ``o_t`` (``m_t``: which are rows of the chunk / window at all): (slot =
    sorted_idx value, token position, validity).

    ``idx_ptr`` points at this (batch, head)'s index row; rows, slots and positions are int32
    (the host checks the sizes), only the per-(batch, head) bases are int64.
    """
    if HAS_IDX:
        b_idx = tl.load(idx_ptr + o_t, mask=m_t, other=0)  # [R]
        # an out-of-range index must not turn into an out-of-bounds access
        m_t = m_t & (b_idx >= 0) & (b_idx < num_rows)  # [R]
        b_slot = tl.where(m_t, b_idx, 0).to(tl.int32)  # [R]
    else:
        b_slot = tl.where(m_t, o_t, 0)  # [R]
    b_pos = b_slot % seq_len  # [R]
    return b_slot, b_pos, m_t


@triton.jit
def _load_tile(
    ptr, b_pos, m_rows, stride_l, i_d, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Columns ``i_d * BLOCK ...`` of rows ``b_pos`` of a ``[L, D]`` matrix with row stride
    ``stride_l``: ``[R, BLOCK]``, or ``[BLOCK, R]`` when ``TRANSPOSED``; columns ``>= HEAD_DIM``
    (padding up to the block) read as zeros.

    ``tl.dot`` operands are loaded in the orientation the dot needs: transposing a register
    tile instead costs a layout conversion and registers.
    """
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)  # [BD]
    if TRANSPOSED:
        p_x = ptr + b_pos[None, :] * stride_l + o_d[:, None]  # [BD, R]
        if HEAD_DIM % BLOCK == 0:
            b_x = tl.load(p_x, mask=m_rows[None, :], other=0.0)  # [BD, R]
        else:
            b_x = tl.load(p_x, mask=m_rows[None, :] & (o_d < HEAD_DIM)[:, None], other=0.0)  # [BD, R]
    else:
        p_x = ptr + b_pos[:, None] * stride_l + o_d[None, :]  # [R, BD]
        if HEAD_DIM % BLOCK == 0:
            b_x = tl.load(p_x, mask=m_rows[:, None], other=0.0)  # [R, BD]
        else:
            b_x = tl.load(p_x, mask=m_rows[:, None] & (o_d < HEAD_DIM)[None, :], other=0.0)  # [R, BD]
    return b_x


@triton.jit
def _store_rows(ptr, b_slot, m_rows, b_x, stride_l, i_d, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Store ``b_x [R, BLOCK]`` at rows ``b_slot`` (row stride ``stride_l``), columns
    ``i_d * BLOCK ...`` below ``HEAD_DIM``."""
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)  # [BD]
    p_x = ptr + b_slot[:, None] * stride_l + o_d[None, :]  # [R, BD]
    if HEAD_DIM % BLOCK == 0:
        tl.store(p_x, b_x.to(ptr.dtype.element_ty), mask=m_rows[:, None])
    else:
        tl.store(p_x, b_x.to(ptr.dtype.element_ty), mask=m_rows[:, None] & (o_d < HEAD_DIM)[None, :])


@triton.jit
def _key_scale(b_x, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Shared-QK key scale per row of ``x``: ``(cs, f, x * f)``, keys ``(x * f) * cs`` equal to
    ``x * rsqrt(mean(x^2) + eps) / sqrt(D)``.

    ``f`` is 1 except in rows with ``max|x| >= 2**59`` (never fp16), where the fp32 sum of squares,
    and the scores of raw rows against queries, could overflow (the reference then rescales too, see
    ``reference.key_scale``). There ``f = 2**-e`` puts ``max|x * f|`` into ``[1, 2)`` (a power of two:
    exact), and ``cs = 1 / sqrt(sum((x f)^2) + D eps f^2)`` is the rescaled row's scale, so that
    ``(x f) cs`` is the same key. For ``f = 1`` this is the plain ``1 / sqrt((sum(x^2) / D + eps) D)``,
    bit for bit. Padding columns are zeros, so the sums are over the real ``HEAD_DIM`` columns.
    """
    b_xf = b_x.to(tl.float32)  # [R, BD] or [BD, R]
    if b_x.dtype == tl.float16:
        # |x| <= 65504: D * x^2 < 2**41 never overflows, f = 1
        if TRANSPOSED:
            b_ss = tl.sum(b_xf * b_xf, 0)  # [R]
        else:
            b_ss = tl.sum(b_xf * b_xf, 1)  # [R]
        b_f = b_ss * 0.0 + 1.0  # [R]
    else:
        if TRANSPOSED:
            b_m = tl.max(tl.abs(b_xf), 0)  # [R]
        else:
            b_m = tl.max(tl.abs(b_xf), 1)  # [R]
        # 2**(127 - e) for the biased exponent e of max|x|: from the exponent bits
        b_e = (b_m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # [R]
        b_f = tl.where(b_m >= _BIG_KEY, ((254 - b_e) << 23).to(tl.float32, bitcast=True), 1.0)  # [R]
        if TRANSPOSED:
            b_xf = b_xf * b_f[None, :]  # [BD, R]
            b_ss = tl.sum(b_xf * b_xf, 0)  # [R]
        else:
            b_xf = b_xf * b_f[:, None]  # [R, BD]
            b_ss = tl.sum(b_xf * b_xf, 1)  # [R]
        b_x = b_xf.to(b_x.dtype)  # [R, BD] or [BD, R]
    b_cs = 1.0 / tl.sqrt((b_ss / HEAD_DIM + _NORM_EPS * (b_f * b_f)) * HEAD_DIM)  # [R]
    return b_cs, b_f, b_x


@triton.jit
def _window_start(i_n, num_before, num_chunks):
    """The first chunk ``i_n - num_before`` of a window, wrapped circularly into ``[0, N)``."""
    i_m = (i_n - num_before) % num_chunks
    return tl.where(i_m < 0, i_m + num_chunks, i_m)


@triton.jit
def _scores(
    b_a,
    b_bt,
    b_cs,
    b_pos_q,
    b_pos_k,
    m_q,
    m_k,
    mask_ptr,
    sm_scale,
    KEY_MAJOR: tl.constexpr,
    SHARED_QK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores with the reference's replacements, and where gradients flow (not replaced).

    ``KEY_MAJOR=False``: ``b_a`` query rows ``[Rq, D]``, ``b_bt`` key rows ``[D, Rk]`` → ``s [Rq, Rk]``;
    ``KEY_MAJOR=True``: ``b_a`` key rows, ``b_bt`` query rows ``[D, Rq]`` → ``s^T [Rk, Rq]``.
    ``m_k`` (and ``m_q`` if ``MASK_Q``) mark the rows that exist: block padding beyond the chunk
    or the window gets ``-inf`` (probability exactly 0), unlike masked keys, which get the
    reference's finite replacement values.
    """
    b_s = tl.dot(b_a, b_bt, input_precision=DOT_PRECISION)  # [Rq, Rk] or [Rk, Rq]
    m_kept = m_k  # [Rk]
    if HAS_MASK:
        b_keep = tl.load(mask_ptr + b_pos_k, mask=m_k, other=0)  # [Rk]
        m_kept = m_k & (b_keep != 0)  # [Rk]
    if KEY_MAJOR:
        b_pq, b_pk, m_kk, m_real = (
            b_pos_q[None, :],
            b_pos_k[:, None],
            m_kept[:, None],
            m_k[:, None],
        )  # [1, Rq], [Rk, 1] x3
        if MASK_Q:
            m_real = m_real & m_q[None, :]  # [Rk, Rq]
        if SHARED_QK:
            b_s = b_s * b_cs[:, None]  # [Rk, Rq]
    else:
        b_pq, b_pk, m_kk, m_real = (
            b_pos_q[:, None],
            b_pos_k[None, :],
            m_kept[None, :],
            m_k[None, :],
        )  # [Rq, 1], [1, Rk] x3
        if MASK_Q:
            m_real = m_real & m_q[:, None]  # [Rq, Rk]
        if SHARED_QK:
            b_s = b_s * b_cs[None, :]  # [Rq, Rk]
    if not SHARED_QK:
        b_s = b_s * sm_scale  # [Rq, Rk]
    if CAUSAL:
        m_vis = m_kk & (b_pq >= b_pk)  # [Rq, Rk]
    else:
        m_vis = m_kk & (b_pq >= 0)  # [Rq, Rk]
    b_s = tl.where(m_vis, b_s, _MASK_VALUE)  # [Rq, Rk]
    if SHARED_QK:
        b_s = tl.where(b_pq == b_pk, _SELF_MASK_VALUE, b_s)  # [Rq, Rk]
        m_vis = m_vis & (b_pq != b_pk)  # [Rq, Rk]
    b_s = tl.where(m_real, b_s, float("-inf"))  # [Rq, Rk]
    return b_s, m_vis & m_real


@triton.jit
def _keep_mask(seed, i_bh, dropout_p, o_rand):
    """Dropout keep mask for the Philox counters ``o_rand = t * W + j`` (query row ``t`` of the
    visiting order, window column ``j``; the host checks ``R * L * W < 2**31``). The (batch, head)
    goes into the high word of the 64-bit Philox key, so every (batch, head) has its own stream."""
    return tl.rand(seed + (i_bh << 32), o_rand) >= dropout_p  # [Rq, Rk] or [Rk, Rq]


@triton.jit(do_not_specialize=["chunk_length", "num_row_blocks", "num_before", "num_after"])
def chunked_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    mask_ptr,
    o_ptr,
    lse_ptr,
    seed_ptr,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
    chunk_length,
    num_row_blocks,
    num_before,
    num_after,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # the dropout seed is read on the device (drawn there by the host: no synchronisation, traceable)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    window = (num_before + 1 + num_after) * chunk_length
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_nr = i_p // (num_chunks * num_row_blocks), (i_p % (num_chunks * num_row_blocks)).to(tl.int32)
    i_n, i_r = i_nr // num_row_blocks, i_nr % num_row_blocks
    # per-(batch, head) bases in int64 (B * H * R * L * D may pass 2**31). No alignment hints: the
    # JIT's specialisation of strides and sizes divisible by 16 tells the compiler when rows are
    # aligned (and so vectorisable), and never when they are not (odd lengths and head dims)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_ptr = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_ptr = v_ptr + i_b * stride_vb + i_h * stride_vh
    idx_ptr = idx_ptr + i_bh * num_rows
    mask_ptr += i_b * seq_len
    o_ptr = o_ptr + i_b * stride_ob + i_h * stride_oh
    lse_ptr = lse_ptr + i_bh * num_rows
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    # rows i_r * BLOCK_R ... of query chunk i_n (the block may run past the chunk: masked)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    o_tq = i_n * chunk_length + o_r  # [R]
    b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, o_r < chunk_length, num_rows, seq_len, HAS_IDX)  # [R] each
    b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, 0, HEAD_DIM, BLOCK_D, False)  # [R, BD]

    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)  # [R]
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)  # [R]
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # [R, BD]
    # the window is `window` consecutive visiting rows from the first row of chunk i_n - before,
    # wrapping circularly over all rounds; walked in blocks of BLOCK_W (the last one masked). The
    # first block holds column 0, a real key, so every row's running max is finite from then on.
    t_start = _window_start(i_n, num_before, num_chunks) * chunk_length
    for i_w in range(0, tl.cdiv(window, BLOCK_W)):
        o_col = i_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [W]
        _, b_pos_k, m_k = _load_rows(
            idx_ptr, (t_start + o_col) % num_rows, o_col < window, num_rows, seq_len, HAS_IDX
        )  # [W] each
        b_kt = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, 0, HEAD_DIM, BLOCK_D, True)  # [BD, W]
        if SHARED_QK:
            # key rows rescaled (exactly) where their products could overflow: see _key_scale
            b_cs, _, b_kt = _key_scale(b_kt, HEAD_DIM, True)  # [W], [W], [BD, W]
        else:
            b_cs = sm_scale
        b_s, _ = _scores(
            b_q,
            b_kt,
            b_cs,
            b_pos_q,
            b_pos_k,
            m_q,
            m_k,
            mask_ptr,
            sm_scale,
            False,
            SHARED_QK,
            CAUSAL,
            HAS_MASK,
            False,
            DOT_PRECISION,
        )  # [R, W]

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [R]
        b_alpha = tl.exp2((b_m - b_m_new) * _LOG2E)  # [R]
        b_p = tl.exp2((b_s - b_m_new[:, None]) * _LOG2E)  # [R, W]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)  # [R]
        if HAS_DROPOUT:
            m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq[:, None] * window + o_col[None, :])  # [R, W]
            b_p = tl.where(m_keep, b_p * keep_scale, 0.0)  # [R, W]
        b_v = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, 0, HEAD_DIM, BLOCK_D, False)  # [W, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)  # [R, BD]
        b_m = b_m_new

    b_lse = b_m + tl.log2(b_l) * _LN2  # [R]
    # exp(m - lse) instead of 1 / l: the reference's exp(s - lse), also where lse rounds to m
    b_o = b_acc * tl.exp2((b_m - b_lse) * _LOG2E)[:, None]  # [R, BD]
    _store_rows(o_ptr, b_slot_q, m_q, b_o, stride_ol, 0, HEAD_DIM, BLOCK_D)
    tl.store(lse_ptr + b_slot_q, b_lse, mask=m_q)


@triton.jit
def chunked_attention_combine_fwd_kernel(
    o_rounds_ptr,
    lse_ptr,
    o_ptr,
    lse_total_ptr,
    seq_len,
    num_rounds,
    num_blocks,
    num_heads,
    stride_ob,
    stride_oh,
    stride_ol,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, (i_p % num_blocks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_rounds_ptr = o_rounds_ptr + i_bh * num_rounds * seq_len * HEAD_DIM
    lse_ptr = lse_ptr + i_bh * num_rounds * seq_len
    o_ptr = o_ptr + i_b * stride_ob + i_h * stride_oh
    lse_total_ptr = lse_total_ptr + i_bh * seq_len
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    m_l = o_l < seq_len  # [BL]

    # logsumexp over rounds as torch computes it: max, then log of the sum of exp(x - max)
    b_m = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_m = tl.maximum(b_m, tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0))  # [BL]
    b_sum = tl.zeros([BLOCK_L], dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_sum += tl.exp2((tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0) - b_m) * _LOG2E)  # [BL]
    b_lse_total = b_m + tl.log2(b_sum) * _LN2  # [BL]

    b_acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)  # [BL, BD]
    for i_r in range(0, num_rounds):
        b_w = tl.exp2((tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0) - b_lse_total) * _LOG2E)  # [BL]
        # the per-round buffer is contiguous [R * L, HEAD_DIM]: rows i_r * L + o_l
        b_o = _load_tile(
            o_rounds_ptr + i_r * seq_len * HEAD_DIM, o_l, m_l, HEAD_DIM, 0, HEAD_DIM, BLOCK_D, False
        )  # [BL, BD]
        b_acc += b_w[:, None] * b_o.to(tl.float32)  # [BL, BD]
    _store_rows(o_ptr, o_l, m_l, b_acc, stride_ol, 0, HEAD_DIM, BLOCK_D)
    tl.store(lse_total_ptr + o_l, b_lse_total, mask=m_l)


@triton.jit
def chunked_attention_bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    seq_len,
    num_blocks,
    num_heads,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_dob,
    stride_doh,
    stride_dol,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, (i_p % num_blocks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_ptr = o_ptr + i_b * stride_ob + i_h * stride_oh
    do_ptr = do_ptr + i_b * stride_dob + i_h * stride_doh
    delta_ptr = delta_ptr + i_bh * seq_len
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    m_l = o_l < seq_len  # [BL]
    b_o = _load_tile(o_ptr, o_l, m_l, stride_ol, 0, HEAD_DIM, BLOCK_D, False).to(tl.float32)  # [BL, BD]
    b_do = _load_tile(do_ptr, o_l, m_l, stride_dol, 0, HEAD_DIM, BLOCK_D, False).to(tl.float32)  # [BL, BD]
    tl.store(delta_ptr + o_l, tl.sum(b_o * b_do, 1), mask=m_l)


@triton.jit
def _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q):
    """Per query row: lse, the round weight ``w = exp(lse - LSE)`` and ``w * delta``."""
    b_lse = tl.load(lse_ptr + b_slot_q, mask=m_q, other=0.0)  # [R]
    b_w = tl.exp2((b_lse - tl.load(lse_total_ptr + b_pos_q, mask=m_q, other=0.0)) * _LOG2E)  # [R]
    b_wdelta = b_w * tl.load(delta_ptr + b_pos_q, mask=m_q, other=0.0)  # [R]
    return b_lse, b_w, b_wdelta


@triton.jit(do_not_specialize=["chunk_length", "num_row_blocks", "num_d_blocks", "num_before", "num_after"])
def chunked_attention_bwd_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    mask_ptr,
    do_ptr,
    lse_ptr,
    lse_total_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    seed_ptr,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
    chunk_length,
    num_row_blocks,
    num_d_blocks,
    num_before,
    num_after,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # the dropout seed is read on the device (drawn there by the host: no synchronisation, traceable)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    num_windows = num_before + 1 + num_after
    window = num_windows * chunk_length
    i_p = tl.program_id(0).to(tl.int64)
    # programs of one key block (its head_dim slices) are adjacent: they read the same query rows
    i_bh, i_mrd = (
        i_p // (num_chunks * num_row_blocks * num_d_blocks),
        (i_p % (num_chunks * num_row_blocks * num_d_blocks)).to(tl.int32),
    )
    i_m, i_r, i_d = (
        i_mrd // (num_row_blocks * num_d_blocks),
        (i_mrd // num_d_blocks) % num_row_blocks,
        i_mrd % num_d_blocks,
    )
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_ptr = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_ptr = v_ptr + i_b * stride_vb + i_h * stride_vh
    do_ptr = do_ptr + i_b * stride_dob + i_h * stride_doh
    idx_ptr = idx_ptr + i_bh * num_rows
    mask_ptr += i_b * seq_len
    lse_ptr = lse_ptr + i_bh * num_rows
    lse_total_ptr = lse_total_ptr + i_bh * seq_len
    delta_ptr = delta_ptr + i_bh * seq_len
    dk_ptr = dk_ptr + i_bh * num_rows * HEAD_DIM
    dv_ptr = dv_ptr + i_bh * num_rows * HEAD_DIM
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    # key-major, as flash attention's dK/dV pass: scores are computed transposed, s^T = k q^T.
    # This program owns rows i_r * BLOCK_R ... of key chunk i_m and accumulates columns
    # i_d * BLOCK_DV ... of their dK and dV (the scores need all columns; see launch_config).
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    b_slot_k, b_pos_k, m_k = _load_rows(
        idx_ptr, i_m * chunk_length + o_r, o_r < chunk_length, num_rows, seq_len, HAS_IDX
    )  # [R] each
    b_k = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, 0, HEAD_DIM, BLOCK_D, False)  # [R, BD]
    b_v = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, 0, HEAD_DIM, BLOCK_D, False)  # [R, BD]
    if SHARED_QK:
        # key rows rescaled (exactly) where their products could overflow: see _key_scale
        b_cs, b_f, b_k = _key_scale(b_k, HEAD_DIM, False)  # [R], [R], [R, BD]
    else:
        b_cs = sm_scale

    b_dk = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)  # [R, DV]
    b_dv = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)  # [R, DV]
    # shared QK: sum_q ds^T s^T per key row, i.e. cs * (dk . x) over all of head_dim
    b_dss = tl.zeros([BLOCK_R], dtype=tl.float32)  # [R]
    # The query rows whose window holds chunk i_m are the `window` consecutive visiting rows from
    # the first row of chunk i_m - after (wrapping): query row u of them lies in chunk
    # i_m - after + u // C and sees chunk i_m at window offset num_windows - 1 - u // C.
    t_start = _window_start(i_m, num_after, num_chunks) * chunk_length
    for i_w in range(0, tl.cdiv(window, BLOCK_W)):
        o_u = i_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [W]
        o_tq = (t_start + o_u) % num_rows  # [W]
        b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, o_u < window, num_rows, seq_len, HAS_IDX)  # [W] each
        b_lse, b_w, b_wdelta = _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q)  # [W] each
        # scores, P and dV first, then dP, dS and dK: fewer [R, W] tiles live at once (with dP
        # first, as before, the head_dim 128 build spilled on sm_80)
        b_qt = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, 0, HEAD_DIM, BLOCK_D, True)  # [BD, W]
        b_st, m_grad = _scores(
            b_k,
            b_qt,
            b_cs,
            b_pos_q,
            b_pos_k,
            m_q,
            m_k,
            mask_ptr,
            sm_scale,
            True,
            SHARED_QK,
            CAUSAL,
            HAS_MASK,
            True,
            DOT_PRECISION,
        )  # [R, W]
        # p <= 1 (lse >= every score of its row); a recomputed score may round past lse (by ~1e-7 |s|: far
        # more than 1 for huge scores), which must not overflow exp into inf * 0 = NaN gradients
        b_pt = tl.exp2(tl.minimum((b_st - b_lse[None, :]) * _LOG2E, 0.0))  # [R, W]
        if SHARED_QK:
            b_st = tl.where(m_grad, b_st, 0.0)  # [R, W]
        # dO of round r is w_r * dout: fold w into the probabilities
        if HAS_DROPOUT:
            # window column of key row o_r for query row u: (num_windows - 1 - u // C) * C + o_r
            o_col = (num_windows - 1 - o_u // chunk_length) * chunk_length  # [W]
            m_keep = _keep_mask(seed, i_bh, dropout_p, (o_tq * window + o_col)[None, :] + o_r[:, None])  # [R, W]
            b_pwt = tl.where(m_keep, b_pt * (b_w * keep_scale)[None, :], 0.0)  # [R, W]
        else:
            b_pwt = b_pt * b_w[None, :]  # [R, W]
        b_do = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, i_d, HEAD_DIM, BLOCK_DV, False)  # [W, DV]
        b_dv += tl.dot(b_pwt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)  # [R, DV]
        b_dot = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, 0, HEAD_DIM, BLOCK_D, True)  # [BD, W]
        b_dpt = tl.dot(b_v, b_dot, input_precision=DOT_PRECISION) * b_w[None, :]  # [R, W]
        if HAS_DROPOUT:
            b_dpt = tl.where(m_keep, b_dpt * keep_scale, 0.0)  # [R, W]
        b_dst = tl.where(m_grad, b_pt * (b_dpt - b_wdelta[None, :]), 0.0)  # [R, W]
        if SHARED_QK:
            b_dss += tl.sum(b_dst * b_st, 1)  # [R]
        b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, i_d, HEAD_DIM, BLOCK_DV, False)  # [W, DV]
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)  # [R, DV]

    if SHARED_QK:
        # back through k = x * cs, cs = rsqrt(mean(x^2) + eps) / sqrt(D):
        # dx = cs * (dk - cs^2 * x * (dk . x)), and cs * (dk . x) = sum_q ds^T s^T (b_dss), which
        # this program has for all of head_dim although it holds only a slice of dk
        # with rescaled rows (x' = x f, cs' = cs / f): dx = cs' f * (dk - cs' * x' * (dk . x) * cs), as
        # sum_q ds^T s^T is unchanged (same scores)
        if BLOCK_DV == BLOCK_D:
            b_x = b_k.to(tl.float32)  # [R, DV]
        else:
            b_x = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, i_d, HEAD_DIM, BLOCK_DV, False).to(tl.float32)  # [R, DV]
            b_x = b_x * b_f[:, None]  # [R, DV]
        b_dk = (b_cs * b_f)[:, None] * (b_dk - (b_cs * b_dss)[:, None] * b_x)  # [R, DV]
    else:
        b_dk = b_dk * sm_scale  # [R, DV]
    _store_rows(dk_ptr, b_slot_k, m_k, b_dk, HEAD_DIM, i_d, HEAD_DIM, BLOCK_DV)
    _store_rows(dv_ptr, b_slot_k, m_k, b_dv, HEAD_DIM, i_d, HEAD_DIM, BLOCK_DV)


@triton.jit(do_not_specialize=["chunk_length", "num_row_blocks", "num_d_blocks", "num_before", "num_after"])
def chunked_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    mask_ptr,
    do_ptr,
    lse_ptr,
    lse_total_ptr,
    delta_ptr,
    dq_ptr,
    seed_ptr,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
    chunk_length,
    num_row_blocks,
    num_d_blocks,
    num_before,
    num_after,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # the dropout seed is read on the device (drawn there by the host: no synchronisation, traceable)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    window = (num_before + 1 + num_after) * chunk_length
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_nrd = (
        i_p // (num_chunks * num_row_blocks * num_d_blocks),
        (i_p % (num_chunks * num_row_blocks * num_d_blocks)).to(tl.int32),
    )
    i_n, i_r, i_d = (
        i_nrd // (num_row_blocks * num_d_blocks),
        (i_nrd // num_d_blocks) % num_row_blocks,
        i_nrd % num_d_blocks,
    )
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_ptr = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_ptr = v_ptr + i_b * stride_vb + i_h * stride_vh
    do_ptr = do_ptr + i_b * stride_dob + i_h * stride_doh
    idx_ptr = idx_ptr + i_bh * num_rows
    mask_ptr += i_b * seq_len
    lse_ptr = lse_ptr + i_bh * num_rows
    lse_total_ptr = lse_total_ptr + i_bh * seq_len
    delta_ptr = delta_ptr + i_bh * seq_len
    dq_ptr = dq_ptr + i_bh * num_rows * HEAD_DIM
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    o_tq = i_n * chunk_length + o_r  # [R]
    b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, o_r < chunk_length, num_rows, seq_len, HAS_IDX)  # [R] each
    b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, 0, HEAD_DIM, BLOCK_D, False)  # [R, BD]
    b_do = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, 0, HEAD_DIM, BLOCK_D, False)  # [R, BD]
    b_lse, b_w, b_wdelta = _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q)  # [R] each
    # this program accumulates columns i_d * BLOCK_DV ... of dQ (the scores need all columns)
    b_dq = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)  # [R, DV]
    t_start = _window_start(i_n, num_before, num_chunks) * chunk_length
    for i_w in range(0, tl.cdiv(window, BLOCK_W)):
        o_col = i_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [W]
        _, b_pos_k, m_k = _load_rows(
            idx_ptr, (t_start + o_col) % num_rows, o_col < window, num_rows, seq_len, HAS_IDX
        )  # [W] each
        b_vt = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, 0, HEAD_DIM, BLOCK_D, True)  # [BD, W]
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION) * b_w[:, None]  # [R, W]
        if HAS_DROPOUT:
            m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq[:, None] * window + o_col[None, :])  # [R, W]
            b_dp = tl.where(m_keep, b_dp * keep_scale, 0.0)  # [R, W]
        b_kt = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, 0, HEAD_DIM, BLOCK_D, True)  # [BD, W]
        if SHARED_QK:
            # key rows rescaled (exactly) where their products could overflow: see _key_scale
            b_cs, b_f, b_kt = _key_scale(b_kt, HEAD_DIM, True)  # [W], [W], [BD, W]
        else:
            b_cs = sm_scale
        b_s, m_grad = _scores(
            b_q,
            b_kt,
            b_cs,
            b_pos_q,
            b_pos_k,
            m_q,
            m_k,
            mask_ptr,
            sm_scale,
            False,
            SHARED_QK,
            CAUSAL,
            HAS_MASK,
            False,
            DOT_PRECISION,
        )  # [R, W]
        # p <= 1: see the dK/dV kernel
        b_p = tl.exp2(tl.minimum((b_s - b_lse[:, None]) * _LOG2E, 0.0))  # [R, W]
        b_ds = tl.where(m_grad, b_p * (b_dp - b_wdelta[:, None]), 0.0)  # [R, W]
        if SHARED_QK:
            # the key is x cs = (x f) cs': the raw rows below carry cs' f
            b_ds = b_ds * (b_cs * b_f)[None, :]  # [R, W]
        else:
            b_ds = b_ds * sm_scale  # [R, W]
        b_k = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, i_d, HEAD_DIM, BLOCK_DV, False)  # [W, DV]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [R, DV]

    if SHARED_QK:
        # the dkv kernel already stored this row's key-role gradient here (same slot, earlier launch)
        b_dq += _load_tile(dq_ptr, b_slot_q, m_q, HEAD_DIM, i_d, HEAD_DIM, BLOCK_DV, False).to(tl.float32)  # [R, DV]
    _store_rows(dq_ptr, b_slot_q, m_q, b_dq, HEAD_DIM, i_d, HEAD_DIM, BLOCK_DV)


@triton.jit(do_not_specialize=["chunk_length", "num_row_blocks", "window"])
def chunked_attention_keep_mask_kernel(
    keep_ptr,
    seed_ptr,
    dropout_p,
    num_rows,
    num_chunks,
    chunk_length,
    num_row_blocks,
    window,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_nr = i_p // (num_chunks * num_row_blocks), (i_p % (num_chunks * num_row_blocks)).to(tl.int32)
    i_n, i_r = i_nr // num_row_blocks, i_nr % num_row_blocks
    keep_ptr = keep_ptr + i_bh * num_rows * window
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    o_tq = i_n * chunk_length + o_r  # [R]
    for i_w in range(0, tl.cdiv(window, BLOCK_W)):
        o_col = i_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [W]
        m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq[:, None] * window + o_col[None, :])  # [R, W]
        tl.store(
            keep_ptr + o_tq[:, None] * window + o_col[None, :],
            m_keep.to(tl.int8),
            mask=(o_r < chunk_length)[:, None] & (o_col < window)[None, :],
        )


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_dim(head_dim: int) -> int:
    return max(MIN_BLOCK, _next_pow2(head_dim))


def launch_config(kind: str, head_dim: int, chunk_length: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_W, BLOCK_DV, num_warps)`` of attention kernel ``kind`` (``"fwd"``, ``"dkv"``, ``"dq"``).

    Shared by the launches and ``kernel_specs``, so that the AOT compile test builds what runs.

    - ``BLOCK_R`` rows of a chunk per program (the next power of two >= the chunk, at most 128;
      longer chunks take several programs), with one warp per 16 rows. Triton lays the warps of
      chained dots all along M (``[num_warps, 1]``) when the deciding dot has M >= N, so each
      warp owns 16 rows and keeps only its rows of the loop-invariant operands; with warps along
      N instead, every warp would hold the whole K/V (or Q/dO) tile, which is what spilled.
    - ``BLOCK_W`` window rows per inner step: 32 in the forward with up to 4 warps, else 16 (the
      backward kernels hold more tiles per step; measured: 32 spills there).
    - ``BLOCK_DV``: the backward kernels accumulate dQ / dK / dV in head_dim slices of at most 64
      columns, one program per slice, each computing the scores over all of head_dim. At
      head_dim 128 this doubles the score work of the backward but keeps the accumulator dot at
      M >= N (the layout above) and halves the accumulators: without it dK/dV spilled.
    """
    if kind not in ("fwd", "dkv", "dq"):
        raise ValueError(f"kind must be 'fwd', 'dkv' or 'dq'; got {kind!r}")
    block_c = max(MIN_BLOCK, _next_pow2(chunk_length))
    block_d = _block_dim(head_dim)
    block_r = min(block_c, _MAX_ROWS)
    block_w = min(block_c, _MAX_BLOCK if kind == "fwd" and block_r <= 64 else MIN_BLOCK)
    block_dv = block_d if kind == "fwd" else min(block_d, _MAX_DV)
    return block_r, block_w, block_dv, block_r // _ROWS_PER_WARP


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products like torch's fp32 matmul, unless the user allowed TF32 for it
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def unsupported_reason(query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p=0.0):
    """Why the kernels cannot take this (valid) call, or ``None`` when they can: dtype, head_dim and the
    int32 sizes of the in-kernel arithmetic. The ``auto`` backend falls back to PyTorch instead; backend
    ``triton`` raises a ``ValueError`` with this reason."""
    if query.dtype not in _TL_DTYPES:
        return (
            "the Triton chunked attention kernels take float16, bfloat16 or float32 inputs; got query dtype "
            f"{query.dtype}"
        )
    if query.dtype == torch.bfloat16 and triton_interpreting():
        return (
            "bfloat16 inputs cannot run under the Triton interpreter (TRITON_INTERPRET=1): Triton 3.9's "
            "interpreter computes bf16 dots and casts wrongly; use float16/float32 or the 'torch' backend"
        )
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return (
            f"head_dim (query.shape[-1]) must be <= {MAX_HEAD_DIM} for the Triton chunked attention kernel "
            f"(a head row is one register tile); got {head_dim}. Use the 'torch' backend for larger heads."
        )
    # in-kernel row, slot, window-walk and dropout-counter arithmetic is int32 (only per-(batch, head)
    # bases are int64)
    num_rows = query.shape[2] if sorted_idx is None else sorted_idx.shape[-1]
    if num_rows * _block_dim(head_dim) >= 2**31:
        return (
            f"rounds * length * head_dim = {num_rows * head_dim} must be < 2**31 for the Triton kernel (query, "
            "sorted_idx)"
        )
    window = (num_chunks_before + 1 + num_chunks_after) * chunk_length
    if num_rows + window >= 2**31:
        return (
            f"rounds * length + window = {num_rows + window} must be < 2**31 for the Triton kernel "
            "(num_chunks_before, num_chunks_after, chunk_length)"
        )
    if float(dropout_p) > 0.0 and num_rows * window >= 2**31:
        return (
            f"with dropout, rounds * length * window = {num_rows * window} must be < 2**31 for the Triton kernel "
            "(num_chunks_before, num_chunks_after, chunk_length)"
        )
    return None


def is_supported(
    query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask=None, dropout_p=0.0
) -> bool:
    """Whether ``chunked_attention_triton`` accepts this valid call (see ``unsupported_reason``)."""
    return unsupported_reason(query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p) is None


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when the kernels can read it in place, else a contiguous copy.

    The kernels need unit stride along head_dim and row offsets within one (batch, head) that fit
    int32. Row gathers vectorise when the data pointer and the row / head / batch strides are
    16-byte aligned (the JIT sees that from the arguments); a tensor that misses only that is
    copied when the copy is aligned (head_dim * itemsize a multiple of 16), and read in place
    otherwise. The model's ``[B, L, H, D] -> [B, H, L, D]`` transposed views are read in place.

    The data pointer's alignment is read from the storage offset (PyTorch's allocators align storages
    to at least 64 bytes), so that this also runs on the fake tensors ``torch.compile`` traces with.
    """
    size = tensor.element_size()
    usable = tensor.stride(-1) == 1 and (tensor.dim() < 4 or tensor.shape[2] * tensor.stride(2) < 2**31)
    offset_aligned = (tensor.storage_offset() * size) % 16 == 0
    aligned = offset_aligned and all((stride * size) % 16 == 0 for stride in tensor.stride()[:-1])
    if usable and (aligned or (tensor.shape[-1] * size) % 16 != 0):
        return tensor
    tensor = tensor.contiguous()
    if (tensor.storage_offset() * size) % 16 != 0:
        tensor = tensor.clone()
    return tensor


def _strides(tensor: torch.Tensor, name: str) -> dict[str, int]:
    """``stride_<name>b/h/l`` launch arguments of a ``[B, H, L, D]`` tensor (unit stride along D)."""
    return {
        f"stride_{name}b": tensor.stride(0),
        f"stride_{name}h": tensor.stride(1),
        f"stride_{name}l": tensor.stride(2),
    }


class _Setup:
    """Launch parameters shared by the forward and the backward."""

    def __init__(
        self, query, key, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed_ptr
    ):
        batch_size, num_heads, seq_len, head_dim = query.shape
        self.batch_size, self.num_heads, self.seq_len, self.head_dim = batch_size, num_heads, seq_len, head_dim
        self.chunk_length = chunk_length
        self.num_rows = seq_len if sorted_idx is None else sorted_idx.shape[-1]
        self.num_rounds = self.num_rows // seq_len
        self.num_chunks = self.num_rows // chunk_length
        self.dropout_p = float(dropout_p)
        self.block_d = _block_dim(head_dim)
        self.constexprs = dict(
            HEAD_DIM=head_dim,
            BLOCK_D=self.block_d,
            SHARED_QK=key is None,
            HAS_IDX=sorted_idx is not None,
            CAUSAL=bool(causal),
            HAS_MASK=attention_mask is not None,
            HAS_DROPOUT=self.dropout_p > 0.0,
            DOT_PRECISION=_dot_precision(query.dtype),
        )
        self.scalars = dict(
            seed_ptr=seed_ptr,
            dropout_p=self.dropout_p,
            keep_scale=1.0 / (1.0 - self.dropout_p),
            sm_scale=1.0 / math.sqrt(head_dim),
            num_heads=num_heads,
            seq_len=seq_len,
            num_rows=self.num_rows,
            num_chunks=self.num_chunks,
            chunk_length=chunk_length,
            num_before=before,
            num_after=after,
        )

    def attn_launch(self, kind: str):
        """(grid, launch keyword arguments) of attention kernel ``kind``."""
        block_r, block_w, block_dv, num_warps = launch_config(kind, self.head_dim, self.chunk_length)
        num_row_blocks = triton.cdiv(self.chunk_length, block_r)
        kwargs = dict(
            **self.scalars,
            num_row_blocks=num_row_blocks,
            **self.constexprs,
            BLOCK_R=block_r,
            BLOCK_W=block_w,
            num_warps=num_warps,
            num_stages=_ATTN_STAGES,
        )
        num_d_blocks = 1
        if kind != "fwd":
            num_d_blocks = triton.cdiv(self.head_dim, block_dv)
            kwargs.update(num_d_blocks=num_d_blocks, BLOCK_DV=block_dv)
        grid = (self.batch_size * self.num_heads * self.num_chunks * num_row_blocks * num_d_blocks,)
        return grid, kwargs

    def row_grid(self):
        num_blocks = triton.cdiv(self.seq_len, _BLOCK_L)
        return (self.batch_size * self.num_heads * num_blocks,), num_blocks


def _forward(query, key, value, idx, mask, setup: _Setup):
    batch_size, num_heads, seq_len, head_dim = query.shape
    out = torch.empty_like(query)
    lse = torch.empty((batch_size, num_heads, setup.num_rows), dtype=torch.float32, device=query.device)
    # one round: rows go straight to the output; several: per-round outputs, combined below
    o_rounds = out if setup.num_rounds == 1 else query.new_empty((batch_size, num_heads, setup.num_rows, head_dim))
    grid, launch = setup.attn_launch("fwd")
    wrap_triton(chunked_attention_fwd_kernel)[grid](
        query,
        query if key is None else key,
        value,
        idx,
        mask,
        o_rounds,
        lse,
        **_strides(query, "q"),
        **_strides(query if key is None else key, "k"),
        **_strides(value, "v"),
        **_strides(o_rounds, "o"),
        **launch,
    )
    if setup.num_rounds == 1:
        return out, lse, lse
    lse_total = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    wrap_triton(chunked_attention_combine_fwd_kernel)[grid](
        o_rounds,
        lse,
        out,
        lse_total,
        seq_len,
        setup.num_rounds,
        num_blocks,
        num_heads,
        *out.stride()[:3],
        HEAD_DIM=head_dim,
        BLOCK_D=setup.block_d,
        BLOCK_L=_BLOCK_L,
        num_warps=_ROW_WARPS,
    )
    return out, lse, lse_total


def _backward(grad_out, query, key, value, idx, mask, out, lse, lse_total, setup: _Setup):
    batch_size, num_heads, seq_len, head_dim = query.shape
    grad_out = _aligned(grad_out)
    delta = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    wrap_triton(chunked_attention_bwd_preprocess_kernel)[grid](
        out,
        grad_out,
        delta,
        seq_len,
        num_blocks,
        num_heads,
        *out.stride()[:3],
        *grad_out.stride()[:3],
        HEAD_DIM=head_dim,
        BLOCK_D=setup.block_d,
        BLOCK_L=_BLOCK_L,
        num_warps=_ROW_WARPS,
    )

    shared_qk = key is None
    if shared_qk or setup.num_rounds > 1:
        # per-slot fp32 buffers, summed over rounds below (deterministic: one writer per slot)
        rows_shape = (batch_size, num_heads, setup.num_rows, head_dim)
        dq = torch.empty(rows_shape, dtype=torch.float32, device=query.device)
        dk = dq if shared_qk else torch.empty(rows_shape, dtype=torch.float32, device=query.device)
        dv = torch.empty(rows_shape, dtype=torch.float32, device=query.device)
    else:
        # local attention: one round, slot == position, the kernels write the final gradients
        # (contiguous [B, H, L, D]: the kernels index gradient rows by slot)
        dq, dk, dv = (torch.empty(query.shape, dtype=query.dtype, device=query.device) for _ in range(3))
    common = (query, query if shared_qk else key, value, idx, mask, grad_out, lse, lse_total, delta)
    strides = {
        **_strides(query, "q"),
        **_strides(query if shared_qk else key, "k"),
        **_strides(value, "v"),
        **_strides(grad_out, "do"),
    }
    # dkv first: in shared-QK mode the dq kernel adds the query-role gradient to the key-role one
    grid, launch = setup.attn_launch("dkv")
    wrap_triton(chunked_attention_bwd_dkv_kernel)[grid](*common, dk, dv, **strides, **launch)
    grid, launch = setup.attn_launch("dq")
    wrap_triton(chunked_attention_bwd_dq_kernel)[grid](*common, dq, **strides, **launch)

    def per_position(grad: torch.Tensor) -> torch.Tensor:
        if setup.num_rounds == 1:
            return grad.to(query.dtype)
        return grad.view(batch_size, num_heads, setup.num_rounds, seq_len, head_dim).sum(2).to(query.dtype)

    return per_position(dq), (None if shared_qk else per_position(dk)), per_position(dv)


def _index_and_mask(query, sorted_idx, attention_mask):
    """The kernels' int64 index and int8 key mask (1-element placeholders when absent)."""
    device = query.device
    if sorted_idx is None:
        idx = torch.zeros(1, dtype=torch.int64, device=device)
    else:
        idx = _aligned(sorted_idx.to(torch.int64))
    if attention_mask is None:
        mask = torch.zeros(1, dtype=torch.int8, device=device)
    else:
        mask = (attention_mask != 0).to(torch.int8).contiguous()
    return idx, mask


def _setup(query, key, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed):
    """``(setup, idx, mask)`` of one launch; ``seed`` None (no dropout): the kernels never read the seed pointer."""
    idx, mask = _index_and_mask(query, sorted_idx, attention_mask)
    seed_ptr = idx if seed is None else seed
    setup = _Setup(query, key, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed_ptr)
    return setup, idx, mask


@triton_op("reformer_kernels::chunked_attention_triton_fwd", mutates_args=())
def _triton_fwd_op(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, lse_total)``: the forward kernels as a registered operator (``torch.compile`` traces them
    through ``wrap_triton``); ``lse_total`` is empty for one hash round (then ``lse`` is the total).
    ``seed``: int64 ``[1]`` on the device, or None without dropout."""
    setup, idx, mask = _setup(
        query,
        key,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        dropout_p,
        seed,
    )
    out, lse, lse_total = _forward(query, key, value, idx, mask, setup)
    if setup.num_rounds == 1:
        # one tensor, not two outputs aliasing each other
        lse_total = lse.new_empty(0)
    return out, lse, lse_total


@triton_op("reformer_kernels::chunked_attention_triton_bwd", mutates_args=())
def _triton_bwd_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_total: torch.Tensor,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``chunked_attention_triton_fwd`` (``dk`` empty for shared QK)."""
    setup, idx, mask = _setup(
        query,
        key,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        dropout_p,
        seed,
    )
    if setup.num_rounds == 1:
        lse_total = lse
    dq, dk, dv = _backward(grad_out, query, key, value, idx, mask, out, lse, lse_total, setup)
    return dq, (query.new_empty(0) if dk is None else dk), dv


def _triton_fwd_setup_context(ctx, inputs, output):
    query, key, value, sorted_idx, attention_mask = inputs[:5]
    ctx.args = inputs[5:10]  # chunk_length, num_chunks_before, num_chunks_after, causal, dropout_p
    out, lse, lse_total = output
    ctx.mark_non_differentiable(lse, lse_total)
    # no zero tensors for the gradients of the non-differentiable outputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, value, sorted_idx, attention_mask, out, lse, lse_total, inputs[10])


def _triton_fwd_backward(ctx, grad_out, grad_lse, grad_lse_total):
    if grad_out is None:  # the output's gradient is undefined (grads are not materialised): so are the inputs'
        return (None,) * 11
    query, key, value, sorted_idx, attention_mask, out, lse, lse_total, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.reformer_kernels.chunked_attention_triton_bwd(
        grad_out, query, key, value, sorted_idx, attention_mask, out, lse, lse_total, *ctx.args, seed
    )
    return dq, (None if key is None else dk), dv, None, None, None, None, None, None, None, None


_triton_fwd_op.register_autograd(_triton_fwd_backward, setup_context=_triton_fwd_setup_context)


def _draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout seed, an int64 ``[1]`` tensor on ``device``: one draw from torch's default (CPU) generator, so
    ``torch.manual_seed`` reproduces it, copied to the device without reading it on the host (no
    synchronisation; traceable by ``torch.compile``)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(device)


def chunked_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Fused chunked attention (Triton); returns the output ``[B, H, L, D]``.

    Same semantics as ``chunked_attention_reference`` (see the module docstring for the numerics),
    differentiable with respect to query, key and value (registered operators
    ``reformer_kernels::chunked_attention_triton_fwd`` / ``_bwd``). Any ``chunk_length >= 1``; raises
    ``ValueError`` for head_dim > 256, bf16 under the interpreter or sizes past the kernels' int32
    arithmetic (``unsupported_reason`` tells in advance). ``check=False`` skips the validation a
    caller (the ``chunked_attention`` op) has already run: the op's ``check_chunked_attention_inputs``
    (including the permutation check of ``sorted_idx``) and ``unsupported_reason``.
    """
    if check:
        from . import check_chunked_attention_inputs

        check_chunked_attention_inputs(
            query,
            key,
            value,
            sorted_idx,
            chunk_length,
            num_chunks_before,
            num_chunks_after,
            causal,
            attention_mask,
            dropout_p,
        )
        reason = unsupported_reason(query, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, dropout_p)
        if reason is not None:
            raise ValueError(reason)
    if query.numel() == 0:
        from . import _empty_result

        return _empty_result(query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, False)[0]
    dropout_p = float(dropout_p)
    seed = _draw_seed(query.device) if dropout_p > 0.0 else None
    query, value = _aligned(query), _aligned(value)
    key = None if key is None else _aligned(key)
    out, _, _ = torch.ops.reformer_kernels.chunked_attention_triton_fwd(
        query,
        key,
        value,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        bool(causal),
        dropout_p,
        seed,
    )
    return out


def dropout_keep_mask(
    batch_size, num_heads, num_rows, chunk_length, num_chunks_before, num_chunks_after, dropout_p, seed, device="cpu"
):
    """The kernels' dropout keep mask, ``[B, H, R * L / c, c, c * (before + 1 + after)]`` bool.

    For tests: the layout of the reference's probabilities (visiting order); ``seed`` (an int or the int64
    tensor of ``_draw_seed``) is the value ``chunked_attention_triton`` draws from torch's default generator.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    window = (num_chunks_before + 1 + num_chunks_after) * chunk_length
    num_chunks = num_rows // chunk_length
    block_r, block_w, _, _ = launch_config("fwd", 16, chunk_length)
    num_row_blocks = triton.cdiv(chunk_length, block_r)
    keep = torch.empty((batch_size, num_heads, num_chunks, chunk_length, window), dtype=torch.int8, device=device)
    wrap_triton(chunked_attention_keep_mask_kernel)[(batch_size * num_heads * num_chunks * num_row_blocks,)](
        keep,
        seed,
        float(dropout_p),
        num_rows,
        num_chunks,
        chunk_length,
        num_row_blocks,
        window,
        BLOCK_R=block_r,
        BLOCK_W=block_w,
        num_warps=_ROW_WARPS,
    )
    return keep.to(torch.bool)


# (dtype, head_dim, chunk_length, modes) of the attention kernels compiled by the AOT test: head_dim
# 64 / 128 x chunk 64 / 128 in both modes (chunk 128 runs 8 warps, head_dim 128 splits the backward
# accumulators), a padded non-power-of-two shape, and bf16 at the default and the tightest shape.
SPEC_SHAPES = [
    *((torch.float16, d, c, ("lsh", "local")) for d in (64, 128) for c in (64, 128)),
    (torch.float16, 96, 100, ("lsh",)),
    (torch.bfloat16, 64, 64, ("lsh",)),
    (torch.bfloat16, 128, 128, ("lsh",)),
]
_SPEC_MODES = [
    # (tag, constexpr overrides): LSH attention with everything on, and causal local attention
    ("lsh", dict(SHARED_QK=True, HAS_IDX=True, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=True)),
    ("local", dict(SHARED_QK=False, HAS_IDX=False, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=False)),
]


def _spec_strides(*names):
    return {f"stride_{name}{axis}": "i32" for name in names for axis in "bhl"}


def _attention_specs(torch_dtype, head_dim: int, chunk: int, modes=("lsh", "local")) -> list[KernelSpec]:
    ty = _TL_DTYPES[torch_dtype]
    ptr = f"*{ty}"
    scalars = {
        "seed_ptr": "*i64",
        "dropout_p": "fp32",
        "keep_scale": "fp32",
        "sm_scale": "fp32",
        "num_heads": "i32",
        "seq_len": "i32",
        "num_rows": "i32",
        "num_chunks": "i32",
        "chunk_length": "i32",
        "num_row_blocks": "i32",
        "num_before": "i32",
        "num_after": "i32",
    }
    bwd_scalars = dict(scalars)
    bwd_scalars["num_d_blocks"] = "i32"
    common = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "idx_ptr": "*i64", "mask_ptr": "*i8"}
    side = {"do_ptr": ptr, "lse_ptr": "*fp32", "lse_total_ptr": "*fp32", "delta_ptr": "*fp32"}
    # row strides are multiples of 16 elements when head_dim is (the JIT specialises on that)
    hinted = tuple(_spec_strides("q", "k", "v", "o", "do")) if head_dim % 16 == 0 else ()
    specs = []
    for tag, overrides in _SPEC_MODES:
        if tag not in modes:
            continue
        grad_ty = "*fp32" if overrides["SHARED_QK"] else ptr
        kernels = {
            "fwd": (
                chunked_attention_fwd_kernel,
                {**common, "o_ptr": ptr, "lse_ptr": "*fp32", **scalars, **_spec_strides("q", "k", "v", "o")},
            ),
            "dkv": (
                chunked_attention_bwd_dkv_kernel,
                {
                    **common,
                    **side,
                    "dk_ptr": grad_ty,
                    "dv_ptr": grad_ty,
                    **bwd_scalars,
                    **_spec_strides("q", "k", "v", "do"),
                },
            ),
            "dq": (
                chunked_attention_bwd_dq_kernel,
                {**common, **side, "dq_ptr": grad_ty, **bwd_scalars, **_spec_strides("q", "k", "v", "do")},
            ),
        }
        for kind, (kernel, signature) in kernels.items():
            block_r, block_w, block_dv, num_warps = launch_config(kind, head_dim, chunk)
            constexprs = dict(
                HEAD_DIM=head_dim,
                BLOCK_D=_block_dim(head_dim),
                BLOCK_R=block_r,
                BLOCK_W=block_w,
                DOT_PRECISION=_dot_precision(torch_dtype),
                **overrides,
            )
            if kind != "fwd":
                constexprs["BLOCK_DV"] = block_dv
            specs.append(
                KernelSpec(
                    name=f"{kernel.__name__}[{tag},{ty},D{head_dim},C{chunk}]",
                    kernel=kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=num_warps,
                    num_stages=_ATTN_STAGES,
                    uses_mma=True,
                    divisible_by_16=tuple(name for name in signature if name in hinted),
                )
            )
    return specs


def _row_specs(torch_dtype, head_dim: int) -> list[KernelSpec]:
    ty = _TL_DTYPES[torch_dtype]
    ptr = f"*{ty}"
    hinted = lambda *names: tuple(_spec_strides(*names)) if head_dim % 16 == 0 else ()  # noqa: E731
    row = dict(HEAD_DIM=head_dim, BLOCK_D=_block_dim(head_dim), BLOCK_L=_BLOCK_L)
    return [
        KernelSpec(
            name=f"chunked_attention_combine_fwd_kernel[{ty},D{head_dim}]",
            kernel=chunked_attention_combine_fwd_kernel,
            signature={
                "o_rounds_ptr": ptr,
                "lse_ptr": "*fp32",
                "o_ptr": ptr,
                "lse_total_ptr": "*fp32",
                "seq_len": "i32",
                "num_rounds": "i32",
                "num_blocks": "i32",
                "num_heads": "i32",
                **_spec_strides("o"),
            },
            constexprs=row,
            num_warps=_ROW_WARPS,
            divisible_by_16=hinted("o"),
        ),
        KernelSpec(
            name=f"chunked_attention_bwd_preprocess_kernel[{ty},D{head_dim}]",
            kernel=chunked_attention_bwd_preprocess_kernel,
            signature={
                "o_ptr": ptr,
                "do_ptr": ptr,
                "delta_ptr": "*fp32",
                "seq_len": "i32",
                "num_blocks": "i32",
                "num_heads": "i32",
                **_spec_strides("o", "do"),
            },
            constexprs=row,
            num_warps=_ROW_WARPS,
            divisible_by_16=hinted("o", "do"),
        ),
    ]


def kernel_specs() -> list[KernelSpec]:
    """Every kernel as the host launches it: the attention kernels at each entry of
    ``SPEC_SHAPES``, the row kernels at each head_dim there, the dropout-mask kernel once."""
    specs: list[KernelSpec] = []
    for torch_dtype, head_dim, chunk, modes in SPEC_SHAPES:
        specs += _attention_specs(torch_dtype, head_dim, chunk, modes)
    for torch_dtype in (torch.float16, torch.bfloat16):
        for head_dim in sorted({d for dtype, d, _, _ in SPEC_SHAPES if dtype == torch_dtype}):
            specs += _row_specs(torch_dtype, head_dim)
    block_r, block_w, _, _ = launch_config("fwd", 16, 64)
    specs.append(
        KernelSpec(
            name="chunked_attention_keep_mask_kernel[C64]",
            kernel=chunked_attention_keep_mask_kernel,
            signature={
                "keep_ptr": "*i8",
                "seed_ptr": "*i64",
                "dropout_p": "fp32",
                "num_rows": "i32",
                "num_chunks": "i32",
                "chunk_length": "i32",
                "num_row_blocks": "i32",
                "window": "i32",
            },
            constexprs=dict(BLOCK_R=block_r, BLOCK_W=block_w),
            num_warps=_ROW_WARPS,
        )
    )
    return specs
