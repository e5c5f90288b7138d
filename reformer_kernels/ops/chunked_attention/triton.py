"""Chunked LSH / local attention in Triton: fused forward, round combine and backward.

The visiting order (``sorted_idx``: LSH buckets, all hash rounds one after another; ``None``: the
identity order of local attention) is a sequence of ``R * L`` rows cut into ``N = R * L / C``
chunks of ``C`` rows. One program owns one query chunk of one (batch, head) and reads its
``C`` query rows and the ``C * (before + 1 + after)`` key/value rows of its window (wrapping
circularly over the ``N`` chunks) *through the sorted index*: row ``t`` is token
``sorted_idx[t] % L``. Nothing is gathered, chunked or materialised in memory; scores live in
registers only.

Forward (``chunked_attention_fwd_kernel``), per query row ``i`` and window key ``j``::

    s_ij = q_i . x_j * rsqrt(mean(x_j^2) + 1e-6) / sqrt(D)    shared QK (x = query rows)
    s_ij = q_i . k_j / sqrt(D)                                 separate keys (local)
    s_ij = -1e9  where key j is padding or (causal and p_j > p_i)
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

Backward: probabilities are recomputed from the saved ``lse`` (no score matrix is stored).
With ``dO_r = w_r * dout`` and the round weights' gradient ``dlse_r = w_r (dout.O_r - dout.out)``,
the softmax gradient of a row of round ``r`` is ``ds_ij = p_ij (dp_ij - w_r * (dout . out))``,
so only ``delta = dout . out`` per position is precomputed
(``chunked_attention_bwd_preprocess_kernel``). ``chunked_attention_bwd_dkv_kernel`` (one program
per key chunk, key-major like flash attention's dK/dV pass, looping over the query chunks whose
window holds it) writes dK (through the key normalisation in shared-QK mode) and dV of each
visiting row to its slot; ``chunked_attention_bwd_dq_kernel`` (one program per query chunk)
writes dQ, adding the key-role gradient in shared-QK mode. Every slot is written by exactly one
program, and the rounds are summed afterwards with a torch reduction: no atomics, bit-identical
gradients run to run. The per-slot gradient buffers are fp32 ``[B, H, R * L, D]`` (dQ, dV, and
dK for separate keys) whenever R > 1 or in shared-QK mode; local attention writes the final
gradients directly.

Tiling: a program owns one chunk (``C`` rows) and walks the other side of its ``[C, window]``
score tile in sub-blocks of ``BLOCK`` rows (``min(C, 32)``). ``tl.dot`` operands are loaded from
memory in the orientation the dot needs (``[D, BLOCK]`` for transposed keys/values/queries)
instead of ``tl.trans`` of a register tile, which made every warp hold the whole tile and spill.
Row, slot and dropout-counter arithmetic is int32 (the host checks ``R * L * D < 2**31`` and,
with dropout, ``R * L * window < 2**31``); only the per-(batch, head) base offsets are int64, so
``B * H * R * L * D`` may exceed 2**31. The host hands the kernels 16-byte aligned tensors and
the kernels tell the compiler so (``tl.multiple_of``), which vectorises the row gathers.

Dropout on the probabilities uses Philox (``tl.rand``): one seed per call, drawn from torch's
default generator (``torch.manual_seed`` reproduces it), with the (batch, head) in the high word
of the 64-bit Philox key and the 32-bit counter ``t * W + j`` (query row ``t`` of the visiting
order, window column ``j``); the backward replays the same mask. The logsumexp (and the round
weights) are computed before dropout, as in the reference. ``dropout_keep_mask`` returns the mask
in the reference's probability layout (tests use it to replay the reference with the same mask).

Limits of the kernels (checked by ``chunked_attention_triton`` with a ``ValueError``): head_dim
and chunk_length must be powers of two in [16, 256] (``tl.dot`` operands need dims >= 16 on the
GPU). ``sorted_idx`` must be a permutation of ``[0, R * L)`` in each (batch, head) row, as
``bucket_sort`` returns it; this is not checked (it would synchronise the device), but an
out-of-range entry never makes the kernels access memory out of bounds. The default launch
configuration is compiled spill-free for head_dim 64 / chunk 64 (and 32 / 32); the backward
kernels spill registers at head_dim 128 or chunk 128 (correct, slower).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...kernel_registry import KernelSpec
from .reference import mask_values

__all__ = ["chunked_attention_triton", "kernel_specs", "dropout_keep_mask"]

# The kernels' scores are fp32, so they use the fp32 replacement values (see the module docstring).
MASK_VALUE, SELF_MASK_VALUE = mask_values(torch.float32)
NORM_EPS = 1e-6
MIN_DIM, MAX_DIM = 16, 256

_MASK_VALUE = tl.constexpr(MASK_VALUE)
_SELF_MASK_VALUE = tl.constexpr(SELF_MASK_VALUE)
_NORM_EPS = tl.constexpr(NORM_EPS)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Launch configuration of the attention kernels (checked spill-free at head_dim 64 / chunk 64 by
# the AOT compile test). A program owns one chunk; the other side of its [chunk, window] score
# tile is walked in sub-blocks of at most _MAX_BLOCK rows, which bounds the registers held by
# scores, probabilities and the dropout mask. 8 warps do not help: a 64-row MMA tile is
# replicated over the extra warps.
_MAX_BLOCK = 32
_ATTN_WARPS = 4
_ATTN_STAGES = 1
_BLOCK_L = 64
_ROW_WARPS = 4


@triton.jit
def _load_rows(idx_ptr, o_t, num_rows, seq_len, HAS_IDX: tl.constexpr):
    """Visiting rows ``o_t``: (slot = sorted_idx value, token position, validity).

    ``idx_ptr`` points at this (batch, head)'s index row; rows, slots and positions are int32
    (the host checks ``R * L * D < 2**31``), only the per-(batch, head) bases are int64.
    """
    if HAS_IDX:
        b_idx = tl.load(idx_ptr + o_t)  # [C]
        # an out-of-range index must not turn into an out-of-bounds access
        m_t = (b_idx >= 0) & (b_idx < num_rows)  # [C]
        b_slot = tl.where(m_t, b_idx, 0).to(tl.int32)  # [C]
    else:
        m_t = o_t < num_rows  # [C]
        b_slot = o_t  # [C]
    b_pos = b_slot % seq_len  # [C]
    return b_slot, b_pos, m_t


@triton.jit
def _load_tile(ptr, b_pos, m_rows, stride_l, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows ``b_pos`` of a ``[L, D]`` matrix with row stride ``stride_l``: ``[C, D]``, or ``[D, C]``
    when ``TRANSPOSED``.

    ``tl.dot`` operands are loaded in the orientation the dot needs: transposing a register
    tile instead makes every warp hold the whole tile and spills.
    """
    o_d = tl.arange(0, HEAD_DIM)  # [D]
    if TRANSPOSED:
        return tl.load(ptr + b_pos[None, :] * stride_l + o_d[:, None], mask=m_rows[None, :], other=0.0)  # [D, C]
    else:
        return tl.load(ptr + b_pos[:, None] * stride_l + o_d[None, :], mask=m_rows[:, None], other=0.0)  # [C, D]


@triton.jit
def _key_scale(b_x, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Shared-QK key scale ``rsqrt(mean(x^2) + eps) / sqrt(D)`` per row of ``x`` (keys are ``x * scale``)."""
    b_xf = b_x.to(tl.float32)  # [C, D] or [D, C]
    if TRANSPOSED:
        b_ss = tl.sum(b_xf * b_xf, 0)  # [C]
    else:
        b_ss = tl.sum(b_xf * b_xf, 1)  # [C]
    return 1.0 / tl.sqrt((b_ss / HEAD_DIM + _NORM_EPS) * HEAD_DIM)  # [C]


@triton.jit
def _scores(
    b_a,
    b_bt,
    b_cs,
    b_pos_q,
    b_pos_k,
    m_k,
    mask_ptr,
    sm_scale,
    KEY_MAJOR: tl.constexpr,
    SHARED_QK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores with the reference's replacements, and where gradients flow (not replaced).

    ``KEY_MAJOR=False``: ``b_a`` query rows ``[C, D]``, ``b_bt`` key rows ``[D, C]`` → ``s [Cq, Ck]``;
    ``KEY_MAJOR=True``: ``b_a`` key rows, ``b_bt`` query rows ``[D, C]`` → ``s^T [Ck, Cq]``.
    """
    b_s = tl.dot(b_a, b_bt, input_precision=DOT_PRECISION)  # [C, C]
    if HAS_MASK:
        b_keep = tl.load(mask_ptr + b_pos_k, mask=m_k, other=0)  # [C]
        m_k = m_k & (b_keep != 0)  # [C]
    if KEY_MAJOR:
        b_pq, b_pk, m_kk = b_pos_q[None, :], b_pos_k[:, None], m_k[:, None]  # [1, C], [C, 1], [C, 1]
        if SHARED_QK:
            b_s = b_s * b_cs[:, None]  # [C, C]
    else:
        b_pq, b_pk, m_kk = b_pos_q[:, None], b_pos_k[None, :], m_k[None, :]  # [C, 1], [1, C], [1, C]
        if SHARED_QK:
            b_s = b_s * b_cs[None, :]  # [C, C]
    if not SHARED_QK:
        b_s = b_s * sm_scale  # [C, C]
    if CAUSAL:
        m_vis = m_kk & (b_pq >= b_pk)  # [C, C]
    else:
        m_vis = m_kk & (b_pq >= 0)  # [C, C]
    b_s = tl.where(m_vis, b_s, _MASK_VALUE)  # [C, C]
    if SHARED_QK:
        b_s = tl.where(b_pq == b_pk, _SELF_MASK_VALUE, b_s)  # [C, C]
        m_vis = m_vis & (b_pq != b_pk)  # [C, C]
    return b_s, m_vis


@triton.jit
def _keep_mask(seed, i_bh, dropout_p, o_tq, o_col, window, KEY_MAJOR: tl.constexpr):
    """Dropout keep mask of query rows ``o_tq`` against window columns ``o_col`` (transposed if KEY_MAJOR).

    32-bit Philox counters ``t * W + j`` (the host checks ``R * L * W < 2**31``); the (batch, head)
    goes into the high word of the 64-bit Philox key, so every (batch, head) has its own stream.
    """
    if KEY_MAJOR:
        o_rand = o_tq[None, :] * window + o_col[:, None]  # [Ck, Cq]
    else:
        o_rand = o_tq[:, None] * window + o_col[None, :]  # [Cq, Ck]
    return tl.rand(seed + (i_bh << 32), o_rand) >= dropout_p  # [C, C]


@triton.jit(do_not_specialize=["num_before", "num_after"])
def chunked_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    mask_ptr,
    o_ptr,
    lse_ptr,
    seed,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
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
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_windows = num_before + 1 + num_after
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_n = i_p // num_chunks, (i_p % num_chunks).to(tl.int32)
    # per-(batch, head) bases in int64 (B * H * R * L * D may pass 2**31); the host hands over
    # 16-byte aligned tensors, so the bases are too and row loads vectorise
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = tl.multiple_of(q_ptr + i_b * stride_qb + i_h * stride_qh, 16)
    k_ptr = tl.multiple_of(k_ptr + i_b * stride_kb + i_h * stride_kh, 16)
    v_ptr = tl.multiple_of(v_ptr + i_b * stride_vb + i_h * stride_vh, 16)
    idx_ptr = tl.multiple_of(idx_ptr + i_bh * num_rows, 16)
    mask_ptr += i_b * seq_len
    o_ptr = tl.multiple_of(o_ptr + i_b * stride_ob + i_h * stride_oh, 16)
    lse_ptr = tl.multiple_of(lse_ptr + i_bh * num_rows, 16)
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    o_tq = i_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, num_rows, seq_len, HAS_IDX)  # [C] each
    b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, HEAD_DIM, False)  # [C, D]

    b_m = tl.full([CHUNK], float("-inf"), dtype=tl.float32)  # [C]
    b_l = tl.zeros([CHUNK], dtype=tl.float32)  # [C]
    b_acc = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    # window key blocks of BLOCK rows: chunk i_o of the window, sub-block i_s of that chunk
    for i_w in range(0, num_windows * (CHUNK // BLOCK)):
        i_o, i_s = i_w // (CHUNK // BLOCK), i_w % (CHUNK // BLOCK)
        # window chunk, wrapping circularly over all rounds
        i_m = (i_n + i_o - num_before) % num_chunks
        i_m = tl.where(i_m < 0, i_m + num_chunks, i_m)
        o_tk = i_m * CHUNK + i_s * BLOCK + tl.arange(0, BLOCK)  # [BK]
        _, b_pos_k, m_k = _load_rows(idx_ptr, o_tk, num_rows, seq_len, HAS_IDX)  # [BK] each
        b_kt = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, HEAD_DIM, True)  # [D, BK]
        if SHARED_QK:
            b_cs = _key_scale(b_kt, HEAD_DIM, True)  # [BK]
        else:
            b_cs = sm_scale
        b_s, _ = _scores(b_q, b_kt, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, sm_scale, False, SHARED_QK, CAUSAL, HAS_MASK,
                         DOT_PRECISION)  # [C, BK]

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [C]
        b_alpha = tl.exp2((b_m - b_m_new) * _LOG2E)  # [C]
        b_p = tl.exp2((b_s - b_m_new[:, None]) * _LOG2E)  # [C, BK]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)  # [C]
        if HAS_DROPOUT:
            o_col = i_w * BLOCK + tl.arange(0, BLOCK)  # [BK]
            m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq, o_col, num_windows * CHUNK, False)  # [C, BK]
            b_p = tl.where(m_keep, b_p * keep_scale, 0.0)  # [C, BK]
        b_v = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, HEAD_DIM, False)  # [BK, D]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)  # [C, D]
        b_m = b_m_new

    b_lse = b_m + tl.log2(b_l) * _LN2  # [C]
    # exp(m - lse) instead of 1 / l: the reference's exp(s - lse), also where lse rounds to m
    b_o = b_acc * tl.exp2((b_m - b_lse) * _LOG2E)[:, None]  # [C, D]
    o_d = tl.arange(0, HEAD_DIM)  # [D]
    tl.store(o_ptr + b_slot_q[:, None] * stride_ol + o_d[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_q[:, None])
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
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, (i_p % num_blocks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_rounds_ptr = tl.multiple_of(o_rounds_ptr + i_bh * num_rounds * seq_len * HEAD_DIM, 16)
    lse_ptr = tl.multiple_of(lse_ptr + i_bh * num_rounds * seq_len, 16)
    o_ptr = tl.multiple_of(o_ptr + i_b * stride_ob + i_h * stride_oh, 16)
    lse_total_ptr = tl.multiple_of(lse_total_ptr + i_bh * seq_len, 16)
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.arange(0, HEAD_DIM)  # [D]
    m_l = o_l < seq_len  # [BL]

    # logsumexp over rounds as torch computes it: max, then log of the sum of exp(x - max)
    b_m = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_m = tl.maximum(b_m, tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0))  # [BL]
    b_sum = tl.zeros([BLOCK_L], dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_sum += tl.exp2((tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0) - b_m) * _LOG2E)  # [BL]
    b_lse_total = b_m + tl.log2(b_sum) * _LN2  # [BL]

    b_acc = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)  # [BL, D]
    for i_r in range(0, num_rounds):
        b_w = tl.exp2((tl.load(lse_ptr + i_r * seq_len + o_l, mask=m_l, other=0.0) - b_lse_total) * _LOG2E)  # [BL]
        p_o = o_rounds_ptr + (i_r * seq_len + o_l[:, None]) * HEAD_DIM + o_d[None, :]  # [BL, D]
        b_acc += b_w[:, None] * tl.load(p_o, mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
    tl.store(o_ptr + o_l[:, None] * stride_ol + o_d[None, :], b_acc.to(o_ptr.dtype.element_ty), mask=m_l[:, None])
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
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, (i_p % num_blocks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_ptr = tl.multiple_of(o_ptr + i_b * stride_ob + i_h * stride_oh, 16)
    do_ptr = tl.multiple_of(do_ptr + i_b * stride_dob + i_h * stride_doh, 16)
    delta_ptr = tl.multiple_of(delta_ptr + i_bh * seq_len, 16)
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.arange(0, HEAD_DIM)  # [D]
    m_l = o_l < seq_len  # [BL]
    b_o = tl.load(o_ptr + o_l[:, None] * stride_ol + o_d[None, :], mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
    b_do = tl.load(do_ptr + o_l[:, None] * stride_dol + o_d[None, :], mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
    tl.store(delta_ptr + o_l, tl.sum(b_o * b_do, 1), mask=m_l)


@triton.jit
def _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q):
    """Per query row: lse, the round weight ``w = exp(lse - LSE)`` and ``w * delta``."""
    b_lse = tl.load(lse_ptr + b_slot_q, mask=m_q, other=0.0)  # [C]
    b_w = tl.exp2((b_lse - tl.load(lse_total_ptr + b_pos_q, mask=m_q, other=0.0)) * _LOG2E)  # [C]
    b_wdelta = b_w * tl.load(delta_ptr + b_pos_q, mask=m_q, other=0.0)  # [C]
    return b_lse, b_w, b_wdelta


@triton.jit(do_not_specialize=["num_before", "num_after"])
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
    seed,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
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
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_windows = num_before + 1 + num_after
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_m = i_p // num_chunks, (i_p % num_chunks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = tl.multiple_of(q_ptr + i_b * stride_qb + i_h * stride_qh, 16)
    k_ptr = tl.multiple_of(k_ptr + i_b * stride_kb + i_h * stride_kh, 16)
    v_ptr = tl.multiple_of(v_ptr + i_b * stride_vb + i_h * stride_vh, 16)
    do_ptr = tl.multiple_of(do_ptr + i_b * stride_dob + i_h * stride_doh, 16)
    idx_ptr = tl.multiple_of(idx_ptr + i_bh * num_rows, 16)
    mask_ptr += i_b * seq_len
    lse_ptr = tl.multiple_of(lse_ptr + i_bh * num_rows, 16)
    lse_total_ptr = tl.multiple_of(lse_total_ptr + i_bh * seq_len, 16)
    delta_ptr = tl.multiple_of(delta_ptr + i_bh * seq_len, 16)
    dk_ptr = tl.multiple_of(dk_ptr + i_bh * num_rows * HEAD_DIM, 16)
    dv_ptr = tl.multiple_of(dv_ptr + i_bh * num_rows * HEAD_DIM, 16)
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    # key-major, as flash attention's dK/dV pass: scores are computed transposed, s^T = k q^T
    o_tk = i_m * CHUNK + tl.arange(0, CHUNK)  # [C]
    b_slot_k, b_pos_k, m_k = _load_rows(idx_ptr, o_tk, num_rows, seq_len, HAS_IDX)  # [C] each
    b_k = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, HEAD_DIM, False)  # [C, D]
    b_v = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, HEAD_DIM, False)  # [C, D]
    if SHARED_QK:
        b_cs = _key_scale(b_k, HEAD_DIM, False)  # [C]
    else:
        b_cs = sm_scale

    b_dk = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    b_dv = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    # query blocks of BLOCK rows: the query chunk that sees this key chunk at window offset i_o,
    # sub-block i_s of it
    for i_w in range(0, num_windows * (CHUNK // BLOCK)):
        i_o, i_s = i_w // (CHUNK // BLOCK), i_w % (CHUNK // BLOCK)
        i_n = (i_m - i_o + num_before) % num_chunks
        i_n = tl.where(i_n < 0, i_n + num_chunks, i_n)
        o_tq = i_n * CHUNK + i_s * BLOCK + tl.arange(0, BLOCK)  # [BQ]
        b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, num_rows, seq_len, HAS_IDX)  # [BQ] each
        b_lse, b_w, b_wdelta = _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q)  # [BQ] each
        # dp^T first, so that the score mask is consumed as soon as it is made
        b_dot = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, HEAD_DIM, True)  # [D, BQ]
        b_dpt = tl.dot(b_v, b_dot, input_precision=DOT_PRECISION) * b_w[None, :]  # [C, BQ]
        if HAS_DROPOUT:
            o_col = i_o * CHUNK + tl.arange(0, CHUNK)  # [C]
            m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq, o_col, num_windows * CHUNK, True)  # [C, BQ]
            b_dpt = tl.where(m_keep, b_dpt * keep_scale, 0.0)  # [C, BQ]
        b_qt = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, HEAD_DIM, True)  # [D, BQ]
        b_st, m_grad = _scores(b_k, b_qt, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, sm_scale, True, SHARED_QK, CAUSAL, HAS_MASK,
                               DOT_PRECISION)  # [C, BQ]
        b_pt = tl.exp2((b_st - b_lse[None, :]) * _LOG2E)  # [C, BQ]
        b_dst = tl.where(m_grad, b_pt * (b_dpt - b_wdelta[None, :]), 0.0)  # [C, BQ]
        # dO of round r is w_r * dout: fold w into the probabilities
        if HAS_DROPOUT:
            b_pwt = tl.where(m_keep, b_pt * (b_w * keep_scale)[None, :], 0.0)  # [C, BQ]
        else:
            b_pwt = b_pt * b_w[None, :]  # [C, BQ]
        b_do = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, HEAD_DIM, False)  # [BQ, D]
        b_dv += tl.dot(b_pwt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)  # [C, D]
        b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, HEAD_DIM, False)  # [BQ, D]
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)  # [C, D]

    if SHARED_QK:
        # back through k = x * cs, cs = rsqrt(mean(x^2) + eps) / sqrt(D):
        # dx = cs * (dk - cs^2 * x * (dk . x))
        b_kf = b_k.to(tl.float32)  # [C, D]
        b_dkx = tl.sum(b_dk * b_kf, 1)  # [C]
        b_dk = b_cs[:, None] * (b_dk - (b_cs * b_cs * b_dkx)[:, None] * b_kf)  # [C, D]
    else:
        b_dk = b_dk * sm_scale  # [C, D]
    o_rows = b_slot_k[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [C, D]
    tl.store(dk_ptr + o_rows, b_dk.to(dk_ptr.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv_ptr + o_rows, b_dv.to(dv_ptr.dtype.element_ty), mask=m_k[:, None])


@triton.jit(do_not_specialize=["num_before", "num_after"])
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
    seed,
    dropout_p,
    keep_scale,
    sm_scale,
    num_heads,
    seq_len,
    num_rows,
    num_chunks,
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
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_windows = num_before + 1 + num_after
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_n = i_p // num_chunks, (i_p % num_chunks).to(tl.int32)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = tl.multiple_of(q_ptr + i_b * stride_qb + i_h * stride_qh, 16)
    k_ptr = tl.multiple_of(k_ptr + i_b * stride_kb + i_h * stride_kh, 16)
    v_ptr = tl.multiple_of(v_ptr + i_b * stride_vb + i_h * stride_vh, 16)
    do_ptr = tl.multiple_of(do_ptr + i_b * stride_dob + i_h * stride_doh, 16)
    idx_ptr = tl.multiple_of(idx_ptr + i_bh * num_rows, 16)
    mask_ptr += i_b * seq_len
    lse_ptr = tl.multiple_of(lse_ptr + i_bh * num_rows, 16)
    lse_total_ptr = tl.multiple_of(lse_total_ptr + i_bh * seq_len, 16)
    delta_ptr = tl.multiple_of(delta_ptr + i_bh * seq_len, 16)
    dq_ptr = tl.multiple_of(dq_ptr + i_bh * num_rows * HEAD_DIM, 16)
    if SHARED_QK:
        k_ptr = q_ptr
        stride_kl = stride_ql

    o_tq = i_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, o_tq, num_rows, seq_len, HAS_IDX)  # [C] each
    b_q = _load_tile(q_ptr, b_pos_q, m_q, stride_ql, HEAD_DIM, False)  # [C, D]
    b_do = _load_tile(do_ptr, b_pos_q, m_q, stride_dol, HEAD_DIM, False)  # [C, D]
    b_lse, b_w, b_wdelta = _load_query_stats(lse_ptr, lse_total_ptr, delta_ptr, b_slot_q, b_pos_q, m_q)  # [C] each
    b_dq = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    for i_w in range(0, num_windows * (CHUNK // BLOCK)):
        i_o, i_s = i_w // (CHUNK // BLOCK), i_w % (CHUNK // BLOCK)
        i_m = (i_n + i_o - num_before) % num_chunks
        i_m = tl.where(i_m < 0, i_m + num_chunks, i_m)
        o_tk = i_m * CHUNK + i_s * BLOCK + tl.arange(0, BLOCK)  # [BK]
        _, b_pos_k, m_k = _load_rows(idx_ptr, o_tk, num_rows, seq_len, HAS_IDX)  # [BK] each
        b_vt = _load_tile(v_ptr, b_pos_k, m_k, stride_vl, HEAD_DIM, True)  # [D, BK]
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION) * b_w[:, None]  # [C, BK]
        if HAS_DROPOUT:
            o_col = i_w * BLOCK + tl.arange(0, BLOCK)  # [BK]
            m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq, o_col, num_windows * CHUNK, False)  # [C, BK]
            b_dp = tl.where(m_keep, b_dp * keep_scale, 0.0)  # [C, BK]
        b_kt = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, HEAD_DIM, True)  # [D, BK]
        if SHARED_QK:
            b_cs = _key_scale(b_kt, HEAD_DIM, True)  # [BK]
        else:
            b_cs = sm_scale
        b_s, m_grad = _scores(b_q, b_kt, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, sm_scale, False, SHARED_QK, CAUSAL, HAS_MASK,
                              DOT_PRECISION)  # [C, BK]
        b_p = tl.exp2((b_s - b_lse[:, None]) * _LOG2E)  # [C, BK]
        b_ds = tl.where(m_grad, b_p * (b_dp - b_wdelta[:, None]), 0.0)  # [C, BK]
        if SHARED_QK:
            b_ds = b_ds * b_cs[None, :]  # [C, BK]
        else:
            b_ds = b_ds * sm_scale  # [C, BK]
        b_k = _load_tile(k_ptr, b_pos_k, m_k, stride_kl, HEAD_DIM, False)  # [BK, D]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [C, D]

    p_dq = dq_ptr + b_slot_q[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [C, D]
    if SHARED_QK:
        # the dkv kernel already stored this row's key-role gradient here (same slot, earlier launch)
        b_dq += tl.load(p_dq, mask=m_q[:, None], other=0.0).to(tl.float32)  # [C, D]
    tl.store(p_dq, b_dq.to(dq_ptr.dtype.element_ty), mask=m_q[:, None])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _is_pow2_in_range(n: int) -> bool:
    return MIN_DIM <= n <= MAX_DIM and n & (n - 1) == 0


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products like torch's fp32 matmul, unless the user allowed TF32 for it
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_triton_inputs(query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, dropout_p):
    if query.dtype not in _TL_DTYPES:
        raise TypeError(f"query dtype must be one of float16, bfloat16, float32 for the Triton kernel; got {query.dtype}")
    head_dim = query.shape[-1]
    if not _is_pow2_in_range(head_dim):
        raise ValueError(
            f"head_dim (query.shape[-1]) must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the Triton chunked "
            f"attention kernel (tl.dot operand limits); got {head_dim}. Use the 'torch' backend for other sizes."
        )
    if not _is_pow2_in_range(chunk_length):
        raise ValueError(
            f"chunk_length must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the Triton chunked attention kernel "
            f"(tl.dot operand limits); got {chunk_length}. Use the 'torch' backend for other sizes."
        )
    for name, number in (("num_chunks_before", num_chunks_before), ("num_chunks_after", num_chunks_after)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"{name} must be a non-negative int; got {number!r}")
    device = query.device
    for name, tensor in (("key", key), ("value", value), ("sorted_idx", sorted_idx), ("attention_mask", attention_mask)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {device}")
    if sorted_idx is not None and sorted_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sorted_idx must be int32 or int64; got {sorted_idx.dtype}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    # in-kernel row, slot and dropout-counter arithmetic is int32 (only per-(batch, head) bases are int64)
    num_rows = query.shape[2] if sorted_idx is None else sorted_idx.shape[-1]
    if num_rows * head_dim >= 2**31:
        raise ValueError(f"rounds * length * head_dim = {num_rows * head_dim} must be < 2**31 for the Triton kernel (query, sorted_idx)")
    window = (num_chunks_before + 1 + num_chunks_after) * chunk_length
    if float(dropout_p) > 0.0 and num_rows * window >= 2**31:
        raise ValueError(
            f"with dropout, rounds * length * window = {num_rows * window} must be < 2**31 for the Triton kernel "
            "(num_chunks_before, num_chunks_after, chunk_length)"
        )


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when the kernels can read it in place, else a contiguous copy.

    In place means: unit stride along head_dim, 16-byte aligned data pointer and row / head /
    batch strides (the kernels promise the compiler aligned row starts, so that row gathers
    vectorise), and row offsets within one (batch, head) that fit int32. The model's
    ``[B, L, H, D] -> [B, H, L, D]`` transposed views qualify, so they are not copied.
    """
    size = tensor.element_size()
    in_place = (
        tensor.stride(-1) == 1
        and tensor.data_ptr() % 16 == 0
        and all((stride * size) % 16 == 0 for stride in tensor.stride()[:-1])
        and (tensor.dim() < 4 or tensor.shape[2] * tensor.stride(2) < 2**31)
    )
    if in_place:
        return tensor
    tensor = tensor.contiguous()
    if tensor.data_ptr() % 16 != 0:
        tensor = tensor.clone()
    return tensor


def _strides(tensor: torch.Tensor, name: str) -> dict[str, int]:
    """``stride_<name>b/h/l`` launch arguments of a ``[B, H, L, D]`` tensor (unit stride along D)."""
    return {f"stride_{name}b": tensor.stride(0), f"stride_{name}h": tensor.stride(1), f"stride_{name}l": tensor.stride(2)}


class _Setup:
    """Launch parameters shared by the forward and the backward."""

    def __init__(self, query, key, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed):
        batch_size, num_heads, seq_len, head_dim = query.shape
        self.batch_size, self.num_heads, self.seq_len, self.head_dim = batch_size, num_heads, seq_len, head_dim
        self.num_rows = seq_len if sorted_idx is None else sorted_idx.shape[-1]
        self.num_rounds = self.num_rows // seq_len
        self.num_chunks = self.num_rows // chunk_length
        self.dropout_p = float(dropout_p)
        self.seed = seed
        self.constexprs = dict(
            HEAD_DIM=head_dim,
            CHUNK=chunk_length,
            BLOCK=min(chunk_length, _MAX_BLOCK),
            SHARED_QK=key is None,
            HAS_IDX=sorted_idx is not None,
            CAUSAL=bool(causal),
            HAS_MASK=attention_mask is not None,
            HAS_DROPOUT=self.dropout_p > 0.0,
            DOT_PRECISION=_dot_precision(query.dtype),
        )
        self.scalars = dict(
            seed=seed,
            dropout_p=self.dropout_p,
            keep_scale=1.0 / (1.0 - self.dropout_p),
            sm_scale=1.0 / math.sqrt(head_dim),
            num_heads=num_heads,
            seq_len=seq_len,
            num_rows=self.num_rows,
            num_chunks=self.num_chunks,
            num_before=before,
            num_after=after,
        )
        self.num_warps = _ATTN_WARPS

    @property
    def attn_grid(self):
        return (self.batch_size * self.num_heads * self.num_chunks,)

    def row_grid(self):
        num_blocks = triton.cdiv(self.seq_len, _BLOCK_L)
        return (self.batch_size * self.num_heads * num_blocks,), num_blocks


def _forward(query, key, value, idx, mask, setup: _Setup):
    batch_size, num_heads, seq_len, head_dim = query.shape
    out = torch.empty_like(query)
    lse = torch.empty((batch_size, num_heads, setup.num_rows), dtype=torch.float32, device=query.device)
    # one round: rows go straight to the output; several: per-round outputs, combined below
    o_rounds = out if setup.num_rounds == 1 else query.new_empty((batch_size, num_heads, setup.num_rows, head_dim))
    chunked_attention_fwd_kernel[setup.attn_grid](
        query, query if key is None else key, value, idx, mask, o_rounds, lse, **setup.scalars,
        **_strides(query, "q"), **_strides(query if key is None else key, "k"), **_strides(value, "v"), **_strides(o_rounds, "o"),
        **setup.constexprs, num_warps=setup.num_warps, num_stages=_ATTN_STAGES,
    )
    if setup.num_rounds == 1:
        return out, lse, lse
    lse_total = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    chunked_attention_combine_fwd_kernel[grid](
        o_rounds, lse, out, lse_total, seq_len, setup.num_rounds, num_blocks, num_heads, *out.stride()[:3], HEAD_DIM=head_dim,
        BLOCK_L=_BLOCK_L, num_warps=_ROW_WARPS,
    )
    return out, lse, lse_total


def _backward(grad_out, query, key, value, idx, mask, out, lse, lse_total, setup: _Setup):
    batch_size, num_heads, seq_len, head_dim = query.shape
    grad_out = _aligned(grad_out)
    delta = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    chunked_attention_bwd_preprocess_kernel[grid](
        out, grad_out, delta, seq_len, num_blocks, num_heads, *out.stride()[:3], *grad_out.stride()[:3], HEAD_DIM=head_dim,
        BLOCK_L=_BLOCK_L, num_warps=_ROW_WARPS,
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
    strides = {**_strides(query, "q"), **_strides(query if shared_qk else key, "k"), **_strides(value, "v"), **_strides(grad_out, "do")}
    launch = dict(**setup.scalars, **strides, **setup.constexprs, num_warps=setup.num_warps, num_stages=_ATTN_STAGES)
    # dkv first: in shared-QK mode the dq kernel adds the query-role gradient to the key-role one
    chunked_attention_bwd_dkv_kernel[setup.attn_grid](*common, dk, dv, **launch)
    chunked_attention_bwd_dq_kernel[setup.attn_grid](*common, dq, **launch)

    def per_position(grad: torch.Tensor) -> torch.Tensor:
        if setup.num_rounds == 1:
            return grad.to(query.dtype)
        return grad.view(batch_size, num_heads, setup.num_rounds, seq_len, head_dim).sum(2).to(query.dtype)

    return per_position(dq), (None if shared_qk else per_position(dk)), per_position(dv)


class _ChunkedAttention(torch.autograd.Function):
    """Private autograd wrapper; use ``chunked_attention`` (the public op) instead."""

    @staticmethod
    def forward(ctx, query, key, value, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed):
        setup = _Setup(query, key, sorted_idx, attention_mask, chunk_length, before, after, causal, dropout_p, seed)
        idx, mask = _index_and_mask(query, sorted_idx, attention_mask)
        out, lse, lse_total = _forward(query, key, value, idx, mask, setup)
        ctx.setup = setup
        ctx.shared_qk = key is None
        ctx.save_for_backward(query, key, value, idx, mask, out, lse, lse_total)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, idx, mask, out, lse, lse_total = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, query, None if ctx.shared_qk else key, value, idx, mask, out, lse, lse_total, ctx.setup)
        return dq, dk, dv, None, None, None, None, None, None, None, None


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


def _draw_seed() -> int:
    """The dropout seed: one draw from torch's default (CPU) generator, so ``torch.manual_seed``
    reproduces it, and no device synchronisation."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


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
) -> torch.Tensor:
    """Fused chunked attention (Triton); returns the output ``[B, H, L, D]``.

    Same semantics as ``chunked_attention_reference`` (see the module docstring for the numerics),
    differentiable with respect to query, key and value. Raises ``ValueError`` for head_dim or
    chunk_length that the kernels do not support (powers of two in [16, 256]).
    """
    _check_triton_inputs(query, key, value, sorted_idx, chunk_length, num_chunks_before, num_chunks_after, attention_mask, dropout_p)
    dropout_p = float(dropout_p)
    seed = _draw_seed() if dropout_p > 0.0 else 0
    query, value = _aligned(query), _aligned(value)
    key = None if key is None else _aligned(key)
    return _ChunkedAttention.apply(
        query, key, value, sorted_idx, attention_mask, chunk_length, num_chunks_before, num_chunks_after, bool(causal), dropout_p, seed
    )


@triton.jit
def chunked_attention_keep_mask_kernel(
    keep_ptr,
    seed,
    dropout_p,
    num_rows,
    num_chunks,
    CHUNK: tl.constexpr,
    WINDOW: tl.constexpr,
    NUM_WINDOW_CHUNKS: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_n = i_p // num_chunks, (i_p % num_chunks).to(tl.int32)
    keep_ptr = tl.multiple_of(keep_ptr + i_bh * num_rows * WINDOW, 16)
    o_tq = i_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    for i_o in range(0, NUM_WINDOW_CHUNKS):
        o_col = i_o * CHUNK + tl.arange(0, CHUNK)  # [C]
        m_keep = _keep_mask(seed, i_bh, dropout_p, o_tq, o_col, WINDOW, False)  # [C, C]
        tl.store(keep_ptr + o_tq[:, None] * WINDOW + o_col[None, :], m_keep.to(tl.int8))


def dropout_keep_mask(batch_size, num_heads, num_rows, chunk_length, num_chunks_before, num_chunks_after, dropout_p, seed, device="cpu"):
    """The kernels' dropout keep mask, ``[B, H, R * L / c, c, c * (before + 1 + after)]`` bool.

    For tests: the layout of the reference's probabilities (visiting order); ``seed`` is the value
    ``chunked_attention_triton`` draws from torch's default generator.
    """
    num_windows = num_chunks_before + 1 + num_chunks_after
    window = num_windows * chunk_length
    num_chunks = num_rows // chunk_length
    keep = torch.empty((batch_size, num_heads, num_chunks, chunk_length, window), dtype=torch.int8, device=device)
    chunked_attention_keep_mask_kernel[(batch_size * num_heads * num_chunks,)](
        keep, seed, float(dropout_p), num_rows, num_chunks, CHUNK=chunk_length, WINDOW=window, NUM_WINDOW_CHUNKS=num_windows
    )
    return keep.to(torch.bool)


def kernel_specs() -> list[KernelSpec]:
    """Every kernel at its default configuration (head_dim 64, chunk 64) for fp16 and bf16."""
    head_dim, chunk = 64, 64
    specs: list[KernelSpec] = []
    # (tag, constexpr overrides): LSH attention with everything on, and causal local attention
    modes = [
        ("lsh", dict(SHARED_QK=True, HAS_IDX=True, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=True)),
        ("local", dict(SHARED_QK=False, HAS_IDX=False, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=False)),
    ]
    def strides(*names):
        return {f"stride_{name}{axis}": "i32" for name in names for axis in "bhl"}

    for torch_dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        ptr = f"*{ty}"
        scalars = {"seed": "i32", "dropout_p": "fp32", "keep_scale": "fp32", "sm_scale": "fp32", "num_heads": "i32",
                   "seq_len": "i32", "num_rows": "i32", "num_chunks": "i32", "num_before": "i32", "num_after": "i32"}
        for tag, overrides in modes:
            constexprs = dict(HEAD_DIM=head_dim, CHUNK=chunk, BLOCK=min(chunk, _MAX_BLOCK), DOT_PRECISION=_dot_precision(torch_dtype),
                              **overrides)
            common = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "idx_ptr": "*i64", "mask_ptr": "*i8"}
            side = {"do_ptr": ptr, "lse_ptr": "*fp32", "lse_total_ptr": "*fp32", "delta_ptr": "*fp32"}
            grad_ty = "*fp32" if overrides["SHARED_QK"] else ptr
            signatures = {
                chunked_attention_fwd_kernel: {**common, "o_ptr": ptr, "lse_ptr": "*fp32", **scalars, **strides("q", "k", "v", "o")},
                chunked_attention_bwd_dkv_kernel: {**common, **side, "dk_ptr": grad_ty, "dv_ptr": grad_ty, **scalars,
                                                   **strides("q", "k", "v", "do")},
                chunked_attention_bwd_dq_kernel: {**common, **side, "dq_ptr": grad_ty, **scalars, **strides("q", "k", "v", "do")},
            }
            for kernel, signature in signatures.items():
                specs.append(KernelSpec(
                    name=f"{kernel.__name__}[{tag},{ty},D{head_dim},C{chunk}]", kernel=kernel, signature=signature,
                    constexprs=constexprs, num_warps=_ATTN_WARPS, num_stages=_ATTN_STAGES, uses_mma=True,
                    divisible_by_16=tuple(name for name in signature if name.startswith("stride_")),
                ))
        specs.append(KernelSpec(
            name=f"chunked_attention_combine_fwd_kernel[{ty},D{head_dim}]", kernel=chunked_attention_combine_fwd_kernel,
            signature={"o_rounds_ptr": ptr, "lse_ptr": "*fp32", "o_ptr": ptr, "lse_total_ptr": "*fp32", "seq_len": "i32",
                       "num_rounds": "i32", "num_blocks": "i32", "num_heads": "i32", **strides("o")},
            constexprs=dict(HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L), num_warps=_ROW_WARPS, divisible_by_16=tuple(strides("o")),
        ))
        if ty == "fp16":
            specs.append(KernelSpec(
                name=f"chunked_attention_keep_mask_kernel[C{chunk}]", kernel=chunked_attention_keep_mask_kernel,
                signature={"keep_ptr": "*i8", "seed": "i32", "dropout_p": "fp32", "num_rows": "i32", "num_chunks": "i32"},
                constexprs=dict(CHUNK=chunk, WINDOW=2 * chunk, NUM_WINDOW_CHUNKS=2), num_warps=_ROW_WARPS,
            ))
        specs.append(KernelSpec(
            name=f"chunked_attention_bwd_preprocess_kernel[{ty},D{head_dim}]", kernel=chunked_attention_bwd_preprocess_kernel,
            signature={"o_ptr": ptr, "do_ptr": ptr, "delta_ptr": "*fp32", "seq_len": "i32", "num_blocks": "i32",
                       "num_heads": "i32", **strides("o", "do")},
            constexprs=dict(HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L), num_warps=_ROW_WARPS, divisible_by_16=tuple(strides("o", "do")),
        ))
    return specs
