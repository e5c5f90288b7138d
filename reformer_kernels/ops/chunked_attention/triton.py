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
per key chunk, looping over the query chunks whose window holds it) writes dK (through the key
normalisation in shared-QK mode) and dV of each visiting row to its slot;
``chunked_attention_bwd_dq_kernel`` (one program per query chunk) writes dQ, adding the key-role
gradient in shared-QK mode. Every slot is written by exactly one program, and the rounds are
summed afterwards with a torch reduction: no atomics, bit-identical gradients run to run.

Dropout on the probabilities uses Philox (``tl.rand``) keyed by a seed drawn from torch's
default generator and by the offset ``((b * H + h) * R * L + t) * W + j`` (query row ``t`` of the
visiting order, window column ``j``); the backward replays the same mask. The logsumexp (and the
round weights) are computed before dropout, as in the reference.

Limits of the kernels (checked by ``chunked_attention_triton`` with a ``ValueError``): head_dim
and chunk_length must be powers of two in [16, 256] (``tl.dot`` operands need dims >= 16 on the
GPU). ``sorted_idx`` must be a permutation of ``[0, R * L)`` in each (batch, head) row, as
``bucket_sort`` returns it; this is not checked (it would synchronise the device), but an
out-of-range entry never makes the kernels access memory out of bounds.
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
# default launch configuration of the attention kernels, by head_dim (checked spill-free for
# head_dim 64 / chunk 64 by the AOT compile test); the combine kernels use BLOCK_L rows
_ATTN_WARPS = {16: 4, 32: 4, 64: 4, 128: 8, 256: 8}
_ATTN_STAGES = 1
_BLOCK_L = 64
_ROW_WARPS = 4


@triton.jit
def _load_rows(idx_ptr, i_bh, i_c, num_rows, seq_len, CHUNK: tl.constexpr, HAS_IDX: tl.constexpr):
    """Visiting rows of chunk ``i_c``: (slot = sorted_idx value, token position, validity)."""
    o_t = i_c * CHUNK + tl.arange(0, CHUNK).to(tl.int64)  # [C]
    if HAS_IDX:
        b_slot = tl.load(idx_ptr + i_bh * num_rows + o_t)  # [C]
    else:
        b_slot = o_t  # [C]
    # an out-of-range index must not turn into an out-of-bounds access
    m_t = (b_slot >= 0) & (b_slot < num_rows)  # [C]
    b_slot = tl.where(m_t, b_slot, 0)  # [C]
    b_pos = b_slot % seq_len  # [C]
    return o_t, b_slot, b_pos, m_t


@triton.jit
def _scores(
    b_q,
    b_k,
    b_cs,
    b_pos_q,
    b_pos_k,
    m_k,
    mask_ptr,
    i_b,
    seq_len,
    sm_scale,
    SHARED_QK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of a query chunk against a key chunk with the reference's replacements.

    Returns the scores and the mask of the entries that were *not* replaced (where gradients flow).
    """
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [C, C]
    if SHARED_QK:
        b_s = b_s * b_cs[None, :]  # [C, C]
    else:
        b_s = b_s * sm_scale  # [C, C]
    m_vis = m_k[None, :] & (b_pos_q[:, None] >= 0)  # [C, C]
    if HAS_MASK:
        b_keep = tl.load(mask_ptr + i_b * seq_len + b_pos_k, mask=m_k, other=0)  # [C]
        m_vis = m_vis & (b_keep != 0)[None, :]  # [C, C]
    if CAUSAL:
        m_vis = m_vis & (b_pos_q[:, None] >= b_pos_k[None, :])  # [C, C]
    b_s = tl.where(m_vis, b_s, _MASK_VALUE)  # [C, C]
    if SHARED_QK:
        m_self = b_pos_q[:, None] == b_pos_k[None, :]  # [C, C]
        b_s = tl.where(m_self, _SELF_MASK_VALUE, b_s)  # [C, C]
        m_vis = m_vis & (b_pos_q[:, None] != b_pos_k[None, :])  # [C, C]
    return b_s, m_vis


@triton.jit
def _load_keys(q_ptr, k_ptr, v_ptr, i_bh, b_pos_k, m_k, seq_len, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
               SHARED_QK: tl.constexpr):
    """Key rows (raw: the query rows in shared-QK mode), their column scale and the value rows."""
    o_d = tl.arange(0, HEAD_DIM)
    o_rows = i_bh * seq_len * HEAD_DIM + b_pos_k[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
    if SHARED_QK:
        b_k = tl.load(q_ptr + o_rows, mask=m_k[:, None], other=0.0)  # [C, D]
        b_kf = b_k.to(tl.float32)  # [C, D]
        # k = x * rsqrt(mean(x^2) + eps) / sqrt(D), applied to the score columns
        b_cs = 1.0 / tl.sqrt((tl.sum(b_kf * b_kf, 1) / HEAD_DIM + _NORM_EPS) * HEAD_DIM)  # [C]
    else:
        b_k = tl.load(k_ptr + o_rows, mask=m_k[:, None], other=0.0)  # [C, D]
        b_cs = tl.zeros([CHUNK], dtype=tl.float32)  # [C]
    b_v = tl.load(v_ptr + o_rows, mask=m_k[:, None], other=0.0)  # [C, D]
    return b_k, b_cs, b_v


@triton.jit
def _keep_mask(seed, dropout_p, i_bh, num_rows, o_tq, i_o, CHUNK: tl.constexpr, WINDOW: tl.constexpr):
    """Dropout keep mask of query rows ``o_tq`` against window chunk ``i_o`` (Philox)."""
    o_col = i_o * CHUNK + tl.arange(0, CHUNK)  # [C]
    o_rand = (i_bh * num_rows + o_tq)[:, None] * WINDOW + o_col[None, :]  # [C, C]
    return tl.rand(seed, o_rand) >= dropout_p  # [C, C]


@triton.jit
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
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_BEFORE: tl.constexpr,
    NUM_AFTER: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    WINDOW: tl.constexpr = (NUM_BEFORE + 1 + NUM_AFTER) * CHUNK
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_n = i_p // num_chunks, i_p % num_chunks
    i_b = i_bh // num_heads
    o_d = tl.arange(0, HEAD_DIM)

    o_tq, b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, i_bh, i_n, num_rows, seq_len, CHUNK, HAS_IDX)
    p_q = q_ptr + i_bh * seq_len * HEAD_DIM + b_pos_q[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [C, D]

    b_m = tl.full([CHUNK], float("-inf"), dtype=tl.float32)  # [C]
    b_l = tl.zeros([CHUNK], dtype=tl.float32)  # [C]
    b_acc = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    for i_o in range(0, NUM_BEFORE + 1 + NUM_AFTER):
        # window chunk, wrapping circularly over all rounds
        i_m = (i_n + i_o - NUM_BEFORE) % num_chunks
        i_m = tl.where(i_m < 0, i_m + num_chunks, i_m)
        _, _, b_pos_k, m_k = _load_rows(idx_ptr, i_bh, i_m, num_rows, seq_len, CHUNK, HAS_IDX)
        b_k, b_cs, b_v = _load_keys(q_ptr, k_ptr, v_ptr, i_bh, b_pos_k, m_k, seq_len, CHUNK, HEAD_DIM, SHARED_QK)
        b_s, _ = _scores(b_q, b_k, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, i_b, seq_len, sm_scale,
                         SHARED_QK, CAUSAL, HAS_MASK, DOT_PRECISION)  # [C, C]

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [C]
        b_alpha = tl.exp2((b_m - b_m_new) * _LOG2E)  # [C]
        b_p = tl.exp2((b_s - b_m_new[:, None]) * _LOG2E)  # [C, C]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)  # [C]
        if HAS_DROPOUT:
            m_keep = _keep_mask(seed, dropout_p, i_bh, num_rows, o_tq, i_o, CHUNK, WINDOW)  # [C, C]
            b_p = tl.where(m_keep, b_p * keep_scale, 0.0)  # [C, C]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)  # [C, D]
        b_m = b_m_new

    b_lse = b_m + tl.log2(b_l) * _LN2  # [C]
    # exp(m - lse) instead of 1 / l: the reference's exp(s - lse), also where lse rounds to m
    b_o = b_acc * tl.exp2((b_m - b_lse) * _LOG2E)[:, None]  # [C, D]
    p_o = o_ptr + i_bh * num_rows * HEAD_DIM + b_slot_q[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
    tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_q[:, None])
    tl.store(lse_ptr + i_bh * num_rows + b_slot_q, b_lse, mask=m_q)


@triton.jit
def chunked_attention_combine_fwd_kernel(
    o_rounds_ptr,
    lse_ptr,
    o_ptr,
    lse_total_ptr,
    seq_len,
    num_rounds,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, i_p % num_blocks
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.arange(0, HEAD_DIM)
    m_l = o_l < seq_len  # [BL]
    p_lse = lse_ptr + i_bh * num_rounds * seq_len + o_l  # [BL]

    # logsumexp over rounds as torch computes it: max, then log of the sum of exp(x - max)
    b_m = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_m = tl.maximum(b_m, tl.load(p_lse + i_r * seq_len, mask=m_l, other=0.0))  # [BL]
    b_sum = tl.zeros([BLOCK_L], dtype=tl.float32)  # [BL]
    for i_r in range(0, num_rounds):
        b_sum += tl.exp2((tl.load(p_lse + i_r * seq_len, mask=m_l, other=0.0) - b_m) * _LOG2E)  # [BL]
    b_lse_total = b_m + tl.log2(b_sum) * _LN2  # [BL]

    b_acc = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)  # [BL, D]
    p_o = o_rounds_ptr + i_bh * num_rounds * seq_len * HEAD_DIM + o_l[:, None] * HEAD_DIM + o_d[None, :]  # [BL, D]
    for i_r in range(0, num_rounds):
        b_w = tl.exp2((tl.load(p_lse + i_r * seq_len, mask=m_l, other=0.0) - b_lse_total) * _LOG2E)  # [BL]
        b_o = tl.load(p_o + i_r * seq_len * HEAD_DIM, mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
        b_acc += b_w[:, None] * b_o  # [BL, D]
    p_out = o_ptr + i_bh * seq_len * HEAD_DIM + o_l[:, None] * HEAD_DIM + o_d[None, :]  # [BL, D]
    tl.store(p_out, b_acc.to(o_ptr.dtype.element_ty), mask=m_l[:, None])
    tl.store(lse_total_ptr + i_bh * seq_len + o_l, b_lse_total, mask=m_l)


@triton.jit
def chunked_attention_bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    seq_len,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_l = i_p // num_blocks, i_p % num_blocks
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.arange(0, HEAD_DIM)
    m_l = o_l < seq_len  # [BL]
    o_rows = i_bh * seq_len * HEAD_DIM + o_l[:, None] * HEAD_DIM + o_d[None, :]  # [BL, D]
    b_o = tl.load(o_ptr + o_rows, mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
    b_do = tl.load(do_ptr + o_rows, mask=m_l[:, None], other=0.0).to(tl.float32)  # [BL, D]
    tl.store(delta_ptr + i_bh * seq_len + o_l, tl.sum(b_o * b_do, 1), mask=m_l)


@triton.jit
def _load_query_side(q_ptr, do_ptr, lse_ptr, lse_total_ptr, delta_ptr, i_bh, b_slot_q, b_pos_q, m_q, seq_len, num_rows,
                     HEAD_DIM: tl.constexpr):
    """Query rows, output-gradient rows, lse and the round weight ``w`` and ``w * delta`` per row."""
    o_d = tl.arange(0, HEAD_DIM)
    o_rows = i_bh * seq_len * HEAD_DIM + b_pos_q[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
    b_q = tl.load(q_ptr + o_rows, mask=m_q[:, None], other=0.0)  # [C, D]
    b_do = tl.load(do_ptr + o_rows, mask=m_q[:, None], other=0.0)  # [C, D]
    b_lse = tl.load(lse_ptr + i_bh * num_rows + b_slot_q, mask=m_q, other=0.0)  # [C]
    b_lse_total = tl.load(lse_total_ptr + i_bh * seq_len + b_pos_q, mask=m_q, other=0.0)  # [C]
    b_w = tl.exp2((b_lse - b_lse_total) * _LOG2E)  # [C]
    b_wdelta = b_w * tl.load(delta_ptr + i_bh * seq_len + b_pos_q, mask=m_q, other=0.0)  # [C]
    return b_q, b_do, b_lse, b_w, b_wdelta


@triton.jit
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
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_BEFORE: tl.constexpr,
    NUM_AFTER: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    WINDOW: tl.constexpr = (NUM_BEFORE + 1 + NUM_AFTER) * CHUNK
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_m = i_p // num_chunks, i_p % num_chunks
    i_b = i_bh // num_heads
    o_d = tl.arange(0, HEAD_DIM)

    _, b_slot_k, b_pos_k, m_k = _load_rows(idx_ptr, i_bh, i_m, num_rows, seq_len, CHUNK, HAS_IDX)
    b_k, b_cs, b_v = _load_keys(q_ptr, k_ptr, v_ptr, i_bh, b_pos_k, m_k, seq_len, CHUNK, HEAD_DIM, SHARED_QK)

    b_dk = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    b_dv = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    for i_o in range(0, NUM_BEFORE + 1 + NUM_AFTER):
        # the query chunk whose window holds this key chunk at offset i_o
        i_n = (i_m - i_o + NUM_BEFORE) % num_chunks
        i_n = tl.where(i_n < 0, i_n + num_chunks, i_n)
        o_tq, b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, i_bh, i_n, num_rows, seq_len, CHUNK, HAS_IDX)
        b_q, b_do, b_lse, b_w, b_wdelta = _load_query_side(q_ptr, do_ptr, lse_ptr, lse_total_ptr, delta_ptr, i_bh, b_slot_q,
                                                           b_pos_q, m_q, seq_len, num_rows, HEAD_DIM)
        b_s, m_grad = _scores(b_q, b_k, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, i_b, seq_len, sm_scale,
                              SHARED_QK, CAUSAL, HAS_MASK, DOT_PRECISION)  # [C, C]
        b_p = tl.exp2((b_s - b_lse[:, None]) * _LOG2E)  # [C, C]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) * b_w[:, None]  # [C, C]
        if HAS_DROPOUT:
            m_keep = _keep_mask(seed, dropout_p, i_bh, num_rows, o_tq, i_o, CHUNK, WINDOW)  # [C, C]
            b_pd = tl.where(m_keep, b_p * keep_scale, 0.0)  # [C, C]
            b_dp = tl.where(m_keep, b_dp * keep_scale, 0.0)  # [C, C]
        else:
            b_pd = b_p  # [C, C]
        # dO of round r is w_r * dout: fold w into the probabilities
        b_pw = b_pd * b_w[:, None]  # [C, C]
        b_dv += tl.dot(tl.trans(b_pw.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)  # [C, D]
        b_ds = tl.where(m_grad, b_p * (b_dp - b_wdelta[:, None]), 0.0)  # [C, C]
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION)  # [C, D]

    if SHARED_QK:
        # back through k = x * cs, cs = rsqrt(mean(x^2) + eps) / sqrt(D):
        # dx = cs * (dk - cs^2 * x * (dk . x))
        b_kf = b_k.to(tl.float32)  # [C, D]
        b_dot = tl.sum(b_dk * b_kf, 1)  # [C]
        b_dk = b_cs[:, None] * (b_dk - (b_cs * b_cs * b_dot)[:, None] * b_kf)  # [C, D]
    else:
        b_dk = b_dk * sm_scale  # [C, D]
    o_rows = i_bh * num_rows * HEAD_DIM + b_slot_k[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
    tl.store(dk_ptr + o_rows, b_dk.to(dk_ptr.dtype.element_ty), mask=m_k[:, None])
    tl.store(dv_ptr + o_rows, b_dv.to(dv_ptr.dtype.element_ty), mask=m_k[:, None])


@triton.jit
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
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_BEFORE: tl.constexpr,
    NUM_AFTER: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    WINDOW: tl.constexpr = (NUM_BEFORE + 1 + NUM_AFTER) * CHUNK
    i_p = tl.program_id(0).to(tl.int64)
    i_bh, i_n = i_p // num_chunks, i_p % num_chunks
    i_b = i_bh // num_heads
    o_d = tl.arange(0, HEAD_DIM)

    o_tq, b_slot_q, b_pos_q, m_q = _load_rows(idx_ptr, i_bh, i_n, num_rows, seq_len, CHUNK, HAS_IDX)
    b_q, b_do, b_lse, b_w, b_wdelta = _load_query_side(q_ptr, do_ptr, lse_ptr, lse_total_ptr, delta_ptr, i_bh, b_slot_q,
                                                       b_pos_q, m_q, seq_len, num_rows, HEAD_DIM)
    b_dq = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)  # [C, D]
    for i_o in range(0, NUM_BEFORE + 1 + NUM_AFTER):
        i_m = (i_n + i_o - NUM_BEFORE) % num_chunks
        i_m = tl.where(i_m < 0, i_m + num_chunks, i_m)
        _, _, b_pos_k, m_k = _load_rows(idx_ptr, i_bh, i_m, num_rows, seq_len, CHUNK, HAS_IDX)
        b_k, b_cs, b_v = _load_keys(q_ptr, k_ptr, v_ptr, i_bh, b_pos_k, m_k, seq_len, CHUNK, HEAD_DIM, SHARED_QK)
        b_s, m_grad = _scores(b_q, b_k, b_cs, b_pos_q, b_pos_k, m_k, mask_ptr, i_b, seq_len, sm_scale,
                              SHARED_QK, CAUSAL, HAS_MASK, DOT_PRECISION)  # [C, C]
        b_p = tl.exp2((b_s - b_lse[:, None]) * _LOG2E)  # [C, C]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) * b_w[:, None]  # [C, C]
        if HAS_DROPOUT:
            m_keep = _keep_mask(seed, dropout_p, i_bh, num_rows, o_tq, i_o, CHUNK, WINDOW)  # [C, C]
            b_dp = tl.where(m_keep, b_dp * keep_scale, 0.0)  # [C, C]
        b_ds = tl.where(m_grad, b_p * (b_dp - b_wdelta[:, None]), 0.0)  # [C, C]
        if SHARED_QK:
            b_ds = b_ds * b_cs[None, :]  # [C, C]
        else:
            b_ds = b_ds * sm_scale  # [C, C]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [C, D]

    p_dq = dq_ptr + i_bh * num_rows * HEAD_DIM + b_slot_q[:, None] * HEAD_DIM + o_d[None, :]  # [C, D]
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
            NUM_BEFORE=before,
            NUM_AFTER=after,
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
        )
        self.num_warps = _ATTN_WARPS[head_dim]

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
        query, query if key is None else key, value, idx, mask, o_rounds, lse, **setup.scalars, **setup.constexprs,
        num_warps=setup.num_warps, num_stages=_ATTN_STAGES,
    )
    if setup.num_rounds == 1:
        return out, lse, lse
    lse_total = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    chunked_attention_combine_fwd_kernel[grid](
        o_rounds, lse, out, lse_total, seq_len, setup.num_rounds, num_blocks, HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L,
        num_warps=_ROW_WARPS,
    )
    return out, lse, lse_total


def _backward(grad_out, query, key, value, idx, mask, out, lse, lse_total, setup: _Setup):
    batch_size, num_heads, seq_len, head_dim = query.shape
    grad_out = grad_out.contiguous()
    delta = torch.empty((batch_size, num_heads, seq_len), dtype=torch.float32, device=query.device)
    grid, num_blocks = setup.row_grid()
    chunked_attention_bwd_preprocess_kernel[grid](out, grad_out, delta, seq_len, num_blocks, HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L,
                                                  num_warps=_ROW_WARPS)

    shared_qk = key is None
    if shared_qk or setup.num_rounds > 1:
        # per-slot fp32 buffers, summed over rounds below (deterministic: one writer per slot)
        rows_shape = (batch_size, num_heads, setup.num_rows, head_dim)
        dq = torch.empty(rows_shape, dtype=torch.float32, device=query.device)
        dk = dq if shared_qk else torch.empty(rows_shape, dtype=torch.float32, device=query.device)
        dv = torch.empty(rows_shape, dtype=torch.float32, device=query.device)
    else:
        # local attention: one round, slot == position, the kernels write the final gradients
        dq, dk, dv = torch.empty_like(query), torch.empty_like(query), torch.empty_like(value)
    common = (query, query if shared_qk else key, value, idx, mask, grad_out, lse, lse_total, delta)
    launch = dict(**setup.scalars, **setup.constexprs, num_warps=setup.num_warps, num_stages=_ATTN_STAGES)
    # dkv first: in shared-QK mode the dq kernel adds the query-role gradient to the key-role one
    chunked_attention_bwd_dkv_kernel[setup.attn_grid](*common, dk, dv, **launch)
    chunked_attention_bwd_dq_kernel[setup.attn_grid](*common, dq, **launch)

    def per_position(grad: torch.Tensor) -> torch.Tensor:
        if grad.dtype == query.dtype and setup.num_rounds == 1:
            return grad
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
        idx = sorted_idx.to(torch.int64).contiguous()
    if attention_mask is None:
        mask = torch.zeros(1, dtype=torch.int8, device=device)
    else:
        mask = (attention_mask != 0).to(torch.int8).contiguous()
    return idx, mask


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
    # the dropout seed comes from torch's default generator, so torch.manual_seed reproduces it
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item()) if dropout_p > 0.0 else 0
    query, value = query.contiguous(), value.contiguous()
    key = None if key is None else key.contiguous()
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
    i_bh, i_n = i_p // num_chunks, i_p % num_chunks
    o_tq = i_n * CHUNK + tl.arange(0, CHUNK).to(tl.int64)  # [C]
    for i_o in range(0, NUM_WINDOW_CHUNKS):
        m_keep = _keep_mask(seed, dropout_p, i_bh, num_rows, o_tq, i_o, CHUNK, WINDOW)  # [C, C]
        o_col = i_o * CHUNK + tl.arange(0, CHUNK)  # [C]
        p_keep = keep_ptr + (i_bh * num_rows + o_tq)[:, None] * WINDOW + o_col[None, :]  # [C, C]
        tl.store(p_keep, m_keep.to(tl.int8))


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
        ("lsh", dict(SHARED_QK=True, HAS_IDX=True, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=True, NUM_BEFORE=1, NUM_AFTER=0)),
        ("local", dict(SHARED_QK=False, HAS_IDX=False, CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=False, NUM_BEFORE=1, NUM_AFTER=0)),
    ]
    for torch_dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        ptr = f"*{ty}"
        scalars = {"seed": "i32", "dropout_p": "fp32", "keep_scale": "fp32", "sm_scale": "fp32", "num_heads": "i32",
                   "seq_len": "i32", "num_rows": "i32", "num_chunks": "i32"}
        for tag, overrides in modes:
            constexprs = dict(HEAD_DIM=head_dim, CHUNK=chunk, DOT_PRECISION=_dot_precision(torch_dtype), **overrides)
            common = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "idx_ptr": "*i64", "mask_ptr": "*i8"}
            side = {"do_ptr": ptr, "lse_ptr": "*fp32", "lse_total_ptr": "*fp32", "delta_ptr": "*fp32"}
            grad_ty = "*fp32" if overrides["SHARED_QK"] else ptr
            signatures = {
                chunked_attention_fwd_kernel: {**common, "o_ptr": ptr, "lse_ptr": "*fp32", **scalars},
                chunked_attention_bwd_dkv_kernel: {**common, **side, "dk_ptr": grad_ty, "dv_ptr": grad_ty, **scalars},
                chunked_attention_bwd_dq_kernel: {**common, **side, "dq_ptr": grad_ty, **scalars},
            }
            for kernel, signature in signatures.items():
                specs.append(KernelSpec(
                    name=f"{kernel.__name__}[{tag},{ty},D{head_dim},C{chunk}]", kernel=kernel, signature=signature,
                    constexprs=constexprs, num_warps=_ATTN_WARPS[head_dim], num_stages=_ATTN_STAGES, uses_mma=True,
                ))
        specs.append(KernelSpec(
            name=f"chunked_attention_combine_fwd_kernel[{ty},D{head_dim}]", kernel=chunked_attention_combine_fwd_kernel,
            signature={"o_rounds_ptr": ptr, "lse_ptr": "*fp32", "o_ptr": ptr, "lse_total_ptr": "*fp32", "seq_len": "i32",
                       "num_rounds": "i32", "num_blocks": "i32"},
            constexprs=dict(HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L), num_warps=_ROW_WARPS,
        ))
        specs.append(KernelSpec(
            name=f"chunked_attention_bwd_preprocess_kernel[{ty},D{head_dim}]", kernel=chunked_attention_bwd_preprocess_kernel,
            signature={"o_ptr": ptr, "do_ptr": ptr, "delta_ptr": "*fp32", "seq_len": "i32", "num_blocks": "i32"},
            constexprs=dict(HEAD_DIM=head_dim, BLOCK_L=_BLOCK_L), num_warps=_ROW_WARPS,
        ))
    return specs
