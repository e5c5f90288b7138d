"""Triton axial position embedding, optionally fused with the word embedding and training dropout.

Forward (``axial_pos_fwd_kernel``), one pass over the output: each program takes ``BLOCK_T``
tokens, decomposes each position in the mixed radix of ``axial_pos_shape``
(``i_a = (p // stride_a) % n_a``), gathers the factor rows ``W_a[i_a]`` (and the word row
``E[input_id]``), applies the dropout multipliers, adds in fp32 and writes
``out[t] = E[id_t] * keep_t / (1 - p) + concat_a W_a[i_a(t)] * mask[b, i_1(t)]``.
Up to ``MAX_AXES`` tables go to one launch as constexpr-gated arguments; more axes are split into
several launches writing disjoint column ranges, so any number of axes works.

Backward (``axial_pos_bwd_kernel``), no float atomics: the gradient of factor row ``r`` of axis
``a`` is the sum of ``grad_out[t, cols_a]`` over the tokens whose axis-``a`` digit is ``r``.
One program per (row, column block, split) sums its share in a fixed order:

- training layout (``position_ids=None`` and ``L == prod(n)``): the tokens of row ``r`` are the
  regular set ``b * L + hi * n_a * s_a + r * s_a + lo`` and are enumerated arithmetically;
- arbitrary positions (and the word embedding, keyed by token id): the tokens are stably sorted by
  key on the device and each row reads its contiguous segment of the sorted list.

Long rows are cut into ``SPLITS`` parts writing fp32 partials that are summed afterwards; the split
count depends only on the shapes, so the backward is bit-reproducible.

Dropout: the axial multipliers are transformers' dropout2d pattern (see ``fused.py``), passed as a
``[B, C]`` tensor; the word-embedding dropout is elementwise Philox (``tl.rand``) keyed by a seed
tensor and the element index ``t * hidden + column``, regenerated in the backward (no mask stored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...backend import triton_interpreting
from .fused import axial_dropout_mask, check_axial_inputs
from .reference import axial_strides

MAX_AXES = 4
# 8 elements per thread: with unaligned widths (no divisibility-16 specialisation, e.g. d = 5) a
# 32-token block needs ~255 registers and spills in the 4-axis dropout variant; 16 tokens do not
FWD_BLOCK_T = 16
FWD_BLOCK_D = 64
BWD_BLOCK_T = 16
BWD_BLOCK_D = 64
NUM_WARPS = 4
NUM_STAGES = 2
# a backward row is split only if each part keeps at least this many tokens ...
_SPLIT_MIN_TOKENS = 1024
# ... and only until the grid has about this many programs
_SPLIT_TARGET_PROGRAMS = 1024

# what multiplies the values (forward) / the incoming gradient (backward)
SCALE_NONE = 0
SCALE_AXIAL_TOKEN = 1  # dropout2d mask [B, n_1], one multiplier per token (two or more axes)
SCALE_AXIAL_CHANNEL = 2  # dropout2d mask [B, hidden], one per channel (a single axis)
SCALE_WORD_DROPOUT = 3  # Philox elementwise dropout of the word rows


@triton.jit
def _fwd_axis(
    p_out,
    p_w,
    p_word,
    p_mask,
    b_p,
    b_v,
    b_ms,
    o_t,
    o_b,
    m_t,
    n,
    s,
    d,
    c,
    D,
    mask_sb,
    seed,
    word_p,
    word_scale,
    HAS_WORD: tl.constexpr,
    AXIAL_MASK: tl.constexpr,
    WORD_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write columns ``[c, c + d)`` of ``BLOCK_T`` output rows from factor table ``p_w`` ``[n, d]``."""
    b_r = ((b_p // s) % n).to(tl.int64)  # [BT]
    for i_c in range(0, d, BLOCK_D):
        o_c = i_c + tl.arange(0, BLOCK_D)  # [BD]
        o_g = c + o_c  # [BD]
        m_tc = m_t[:, None] & (o_c < d)[None, :]  # [BT, BD]
        b_x = tl.load(p_w + b_r[:, None] * d + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)  # [BT, BD]
        if AXIAL_MASK == 1:
            b_x = b_x * b_ms[:, None]  # [BT, BD]
        if AXIAL_MASK == 2:
            b_m = tl.load(p_mask + o_b[:, None] * mask_sb + o_g[None, :], mask=m_tc, other=0.0)  # [BT, BD]
            b_x = b_x * b_m.to(tl.float32)  # [BT, BD]
        if HAS_WORD:
            b_e = tl.load(p_word + b_v[:, None] * D + o_g[None, :], mask=m_tc, other=0.0).to(tl.float32)  # [BT, BD]
            if WORD_DROPOUT:
                b_u = tl.rand(seed, o_t[:, None] * D + o_g[None, :])  # [BT, BD]
                b_e = tl.where(b_u >= word_p, b_e * word_scale, 0.0)  # [BT, BD]
            b_x = b_x + b_e  # [BT, BD]
        tl.store(p_out + o_t[:, None] * D + o_g[None, :], b_x.to(p_out.dtype.element_ty), mask=m_tc)


@triton.jit
def axial_pos_fwd_kernel(
    p_out,
    p_pos,
    p_ids,
    p_word,
    p_mask,
    p_seed,
    p_w0,
    p_w1,
    p_w2,
    p_w3,
    n0,
    n1,
    n2,
    n3,
    s0,
    s1,
    s2,
    s3,
    d0,
    d1,
    d2,
    d3,
    c0,
    c1,
    c2,
    c3,
    N_TOKENS,
    L,
    D,
    TOTAL,
    V,
    pos_sb,
    pos_sl,
    ids_sb,
    ids_sl,
    mask_sb,
    mask_n,
    mask_s,
    word_p,
    word_scale,
    NUM_AXES: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_WORD: tl.constexpr,
    AXIAL_MASK: tl.constexpr,
    WORD_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    m_t = o_t < N_TOKENS  # [BT]
    o_b = o_t // L  # [BT]
    o_l = o_t - o_b * L  # [BT]
    if HAS_POS:
        b_p = tl.load(p_pos + o_b * pos_sb + o_l * pos_sl, mask=m_t, other=0).to(tl.int64)  # [BT]
    else:
        b_p = o_l  # [BT]
    # Ids are validated on the host (ValueError / torch._assert_async); clamping here is the second
    # line of defence: a bad id reads a wrong row of the table, never memory outside it.
    b_p = tl.minimum(tl.maximum(b_p, 0), TOTAL - 1).to(tl.int32)  # [BT]
    b_ms = tl.full([BLOCK_T], 1.0, tl.float32)  # [BT]
    if AXIAL_MASK == 1:
        b_ms = tl.load(p_mask + o_b * mask_sb + (b_p // mask_s) % mask_n, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_v = o_t * 0  # [BT]
    if HAS_WORD:
        b_v = tl.load(p_ids + o_b * ids_sb + o_l * ids_sl, mask=m_t, other=0).to(tl.int64)  # [BT]
        b_v = tl.minimum(tl.maximum(b_v, 0), V - 1)  # [BT]
    seed = 0
    if WORD_DROPOUT:
        seed = tl.load(p_seed)
    _fwd_axis(
        p_out,
        p_w0,
        p_word,
        p_mask,
        b_p,
        b_v,
        b_ms,
        o_t,
        o_b,
        m_t,
        n0,
        s0,
        d0,
        c0,
        D,
        mask_sb,
        seed,
        word_p,
        word_scale,
        HAS_WORD,
        AXIAL_MASK,
        WORD_DROPOUT,
        BLOCK_D,
    )
    if NUM_AXES > 1:
        _fwd_axis(
            p_out,
            p_w1,
            p_word,
            p_mask,
            b_p,
            b_v,
            b_ms,
            o_t,
            o_b,
            m_t,
            n1,
            s1,
            d1,
            c1,
            D,
            mask_sb,
            seed,
            word_p,
            word_scale,
            HAS_WORD,
            AXIAL_MASK,
            WORD_DROPOUT,
            BLOCK_D,
        )
    if NUM_AXES > 2:
        _fwd_axis(
            p_out,
            p_w2,
            p_word,
            p_mask,
            b_p,
            b_v,
            b_ms,
            o_t,
            o_b,
            m_t,
            n2,
            s2,
            d2,
            c2,
            D,
            mask_sb,
            seed,
            word_p,
            word_scale,
            HAS_WORD,
            AXIAL_MASK,
            WORD_DROPOUT,
            BLOCK_D,
        )
    if NUM_AXES > 3:
        _fwd_axis(
            p_out,
            p_w3,
            p_word,
            p_mask,
            b_p,
            b_v,
            b_ms,
            o_t,
            o_b,
            m_t,
            n3,
            s3,
            d3,
            c3,
            D,
            mask_sb,
            seed,
            word_p,
            word_scale,
            HAS_WORD,
            AXIAL_MASK,
            WORD_DROPOUT,
            BLOCK_D,
        )


@triton.jit
def axial_pos_bwd_kernel(
    p_dw,
    p_do,
    p_tok,
    p_seg,
    p_pos,
    p_mask,
    p_seed,
    N_ROWS,
    d,
    c,
    n,
    s,
    PER,
    M_REG,
    SPLITS,
    L,
    D,
    TOTAL,
    pos_sb,
    pos_sl,
    mask_sb,
    mask_n,
    mask_s,
    word_p,
    word_scale,
    REGULAR: tl.constexpr,
    HAS_POS: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dw[i_s, r, :] = sum`` of ``grad_out[t, c:c+d] * scale_t`` over this split of row ``r``'s tokens."""
    i_r = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    i_s = tl.program_id(2).to(tl.int64)
    o_c = i_c * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_c = o_c < d  # [BD]
    o_g = c + o_c  # [BD]
    if REGULAR:
        start = i_r * 0
        count = i_r * 0 + M_REG
    else:
        start = tl.load(p_seg + i_r)
        count = tl.load(p_seg + i_r + 1) - start
    chunk = tl.cdiv(tl.cdiv(count, SPLITS), BLOCK_T) * BLOCK_T
    lo = i_s * chunk
    hi = tl.minimum(lo + chunk, count)
    seed = 0
    if SCALE == 3:
        seed = tl.load(p_seed)
    b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # [BT, BD]
    for i_m in range(lo, hi, BLOCK_T):
        o_m = i_m + tl.arange(0, BLOCK_T)  # [BT]
        m_m = o_m < hi  # [BT]
        if REGULAR:
            # the m-th token of row r, m enumerating (batch, higher digits, lower digits) in order
            o_b = o_m // PER  # [BT]
            o_q = o_m - o_b * PER  # [BT]
            o_hi = o_q // s  # [BT]
            o_l = o_hi * (n * s) + i_r * s + (o_q - o_hi * s)  # [BT]
            o_t = o_b * L + o_l  # [BT]
        else:
            o_t = tl.load(p_tok + start + o_m, mask=m_m, other=0)  # [BT]
            o_b = o_t // L  # [BT]
            o_l = o_t - o_b * L  # [BT]
        m_tc = m_m[:, None] & m_c[None, :]  # [BT, BD]
        b_g = tl.load(p_do + o_t[:, None] * D + o_g[None, :], mask=m_tc, other=0.0).to(tl.float32)  # [BT, BD]
        if SCALE == 1:
            if HAS_POS:
                b_p = tl.load(p_pos + o_b * pos_sb + o_l * pos_sl, mask=m_m, other=0).to(tl.int64)  # [BT]
            else:
                b_p = o_l  # [BT]
            b_p = tl.minimum(tl.maximum(b_p, 0), TOTAL - 1).to(tl.int32)  # [BT]
            b_ms = tl.load(p_mask + o_b * mask_sb + (b_p // mask_s) % mask_n, mask=m_m, other=0.0)  # [BT]
            b_g = b_g * b_ms.to(tl.float32)[:, None]  # [BT, BD]
        if SCALE == 2:
            b_m = tl.load(p_mask + o_b[:, None] * mask_sb + o_g[None, :], mask=m_tc, other=0.0)  # [BT, BD]
            b_g = b_g * b_m.to(tl.float32)  # [BT, BD]
        if SCALE == 3:
            b_u = tl.rand(seed, o_t[:, None] * D + o_g[None, :])  # [BT, BD]
            b_g = tl.where(b_u >= word_p, b_g * word_scale, 0.0)  # [BT, BD]
        b_acc += b_g  # [BT, BD]
    b_dw = tl.sum(b_acc, axis=0)  # [BD]
    tl.store(p_dw + (i_s * N_ROWS + i_r) * d + o_c, b_dw.to(p_dw.dtype.element_ty), mask=m_c)


# --------------------------------------------------------------------------------------------- host


class _Layout:
    """Shapes of one call: axial sizes/strides/widths/column offsets, batch, length."""

    def __init__(self, tables: Sequence[torch.Tensor], batch: int, length: int):
        self.sizes = [int(w.shape[0]) for w in tables]
        self.dims = [int(w.shape[1]) for w in tables]
        self.strides = axial_strides(self.sizes)
        self.cols = [sum(self.dims[:a]) for a in range(len(self.dims))]
        self.hidden = sum(self.dims)
        self.total = self.strides[0] * self.sizes[0]
        self.batch, self.length = batch, length
        self.tokens = batch * length
        # dropout2d multiplies per (b, i_1): mask index = (p // stride_1) % n_1
        self.mask_n = self.sizes[1] if len(self.sizes) > 1 else 1
        self.mask_s = self.strides[1] if len(self.sizes) > 1 else 1
        self.axial_mask_mode = SCALE_AXIAL_TOKEN if len(self.sizes) > 1 else SCALE_AXIAL_CHANNEL


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


def _ids_strides(ids: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if ids is None else (int(ids.stride(0)), int(ids.stride(1)))


def _forward(
    lay: _Layout,
    tables: list[torch.Tensor],
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
    word_seed: torch.Tensor | None,
    word_p: float,
) -> torch.Tensor:
    dtype, device = tables[0].dtype, tables[0].device
    out = torch.empty((lay.batch, lay.length, lay.hidden), dtype=dtype, device=device)
    if lay.tokens == 0:
        return out
    i64 = _dummy(device, torch.int64)
    pos = position_ids if position_ids is not None else i64
    ids = input_ids if input_ids is not None else i64
    word = word_weight if word_weight is not None else tables[0]
    mask = axial_mask if axial_mask is not None else tables[0]
    seed = word_seed if word_seed is not None else i64
    pos_sb, pos_sl = _ids_strides(position_ids)
    ids_sb, ids_sl = _ids_strides(input_ids)
    mask_sb = int(axial_mask.stride(0)) if axial_mask is not None else 0
    word_scale = 1.0 / (1.0 - word_p) if word_p < 1.0 else 0.0
    grid = (triton.cdiv(lay.tokens, FWD_BLOCK_T),)
    k = len(tables)
    for g in range(0, k, MAX_AXES):
        axes = list(range(g, min(g + MAX_AXES, k)))
        # absent slots repeat the group's first table; they are pruned by the NUM_AXES constexpr
        pad = axes + [axes[0]] * (MAX_AXES - len(axes))
        wrap_triton(axial_pos_fwd_kernel)[grid](
            out,
            pos,
            ids,
            word,
            mask,
            seed,
            *[tables[a] for a in pad],
            *[lay.sizes[a] for a in pad],
            *[lay.strides[a] for a in pad],
            *[lay.dims[a] for a in pad],
            *[lay.cols[a] for a in pad],
            lay.tokens,
            lay.length,
            lay.hidden,
            lay.total,
            int(word_weight.shape[0]) if word_weight is not None else 1,
            pos_sb,
            pos_sl,
            ids_sb,
            ids_sl,
            mask_sb,
            lay.mask_n,
            lay.mask_s,
            float(word_p),
            float(word_scale),
            NUM_AXES=len(axes),
            HAS_POS=position_ids is not None,
            HAS_WORD=word_weight is not None,
            AXIAL_MASK=lay.axial_mask_mode if axial_mask is not None else SCALE_NONE,
            WORD_DROPOUT=word_seed is not None,
            BLOCK_T=FWD_BLOCK_T,
            BLOCK_D=FWD_BLOCK_D,
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
    return out


def _num_splits(tokens_per_row: float, programs: int) -> int:
    """How many parts to cut each backward row into (a function of the shapes only)."""
    if tokens_per_row < 2 * _SPLIT_MIN_TOKENS:
        return 1
    by_work = int(tokens_per_row // _SPLIT_MIN_TOKENS)
    by_grid = max(1, _SPLIT_TARGET_PROGRAMS // max(programs, 1))
    return max(1, min(by_work, by_grid))


def _sorted_segments(keys: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices stably sorted by key, and each key's segment bounds ``[rows + 1]`` (no host sync)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(rows + 1, device=keys.device, dtype=sorted_keys.dtype))
    return order, bounds


def _segment_sum(
    lay: _Layout,
    grad: torch.Tensor,
    rows: int,
    width: int,
    col: int,
    *,
    size: int,
    stride: int,
    keys: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
    word_seed: torch.Tensor | None,
    word_p: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[rows, width]`` gradient: per row, the sum of its tokens' ``grad[:, col:col+width]``."""
    device = grad.device
    i64 = _dummy(device, torch.int64)
    regular = keys is None
    if regular:
        order, bounds = i64, i64
        per = lay.total // size
        m_reg = lay.batch * per
        tokens_per_row = float(m_reg)
    else:
        order, bounds = _sorted_segments(keys, rows)
        per, m_reg = 1, 0
        tokens_per_row = lay.tokens / rows
    blocks = triton.cdiv(width, BWD_BLOCK_D)
    splits = _num_splits(tokens_per_row, rows * blocks) if lay.tokens > 0 else 1
    if splits == 1:
        out = torch.empty((rows, width), dtype=dtype, device=device)
    else:
        out = torch.empty((splits, rows, width), dtype=torch.float32, device=device)
    if word_seed is not None:
        scale_mode = SCALE_WORD_DROPOUT
    elif axial_mask is not None:
        scale_mode = lay.axial_mask_mode
    else:
        scale_mode = SCALE_NONE
    pos_sb, pos_sl = _ids_strides(position_ids)
    word_scale = 1.0 / (1.0 - word_p) if word_p < 1.0 else 0.0
    wrap_triton(axial_pos_bwd_kernel)[(rows, blocks, splits)](
        out,
        grad,
        order,
        bounds,
        position_ids if position_ids is not None else i64,
        axial_mask if axial_mask is not None else grad,
        word_seed if word_seed is not None else i64,
        rows,
        width,
        col,
        size,
        stride,
        per,
        m_reg,
        splits,
        lay.length,
        lay.hidden,
        lay.total,
        pos_sb,
        pos_sl,
        int(axial_mask.stride(0)) if axial_mask is not None else 0,
        lay.mask_n,
        lay.mask_s,
        float(word_p),
        float(word_scale),
        REGULAR=regular,
        HAS_POS=position_ids is not None,
        SCALE=scale_mode,
        BLOCK_T=BWD_BLOCK_T,
        BLOCK_D=BWD_BLOCK_D,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out if splits == 1 else out.sum(0).to(dtype)


@triton_op("reformer_kernels::axial_word_embedding_triton_fwd", mutates_args=())
def _triton_fwd_op(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: list[torch.Tensor],
    position_ids: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
    word_seed: torch.Tensor | None,
    word_p: float,
) -> torch.Tensor:
    """The fused forward kernel as a registered operator (``torch.compile`` traces it through ``wrap_triton``)."""
    batch, length = (input_ids if input_ids is not None else position_ids).shape
    lay = _Layout(tables, batch, length)
    return _forward(lay, tables, input_ids, word_weight, position_ids, axial_mask, word_seed, word_p)


@triton_op("reformer_kernels::axial_word_embedding_triton_bwd", mutates_args=())
def _triton_bwd_op(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    tables: list[torch.Tensor],
    position_ids: torch.Tensor | None,
    axial_mask: torch.Tensor | None,
    word_seed: torch.Tensor | None,
    word_p: float,
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    """``[d word_weight, d tables...]`` by segmented sums (deterministic); entries whose ``needs_grad`` is False (and
    the word gradient without ``input_ids``) are empty."""
    batch, length = (input_ids if input_ids is not None else position_ids).shape
    lay = _Layout(tables, batch, length)
    dtype = tables[0].dtype
    grad = grad_out.contiguous()
    dtables = []
    flat_pos = None
    regular = position_ids is None and lay.length == lay.total
    if not regular:
        if position_ids is not None:
            flat_pos = position_ids.reshape(-1).to(torch.int64)
        else:
            flat_pos = torch.arange(lay.length, device=grad.device).repeat(lay.batch)
    for a in range(len(lay.sizes)):
        if not needs_grad[1 + a]:
            dtables.append(grad.new_empty(0))
            continue
        keys = None if regular else (flat_pos // lay.strides[a]) % lay.sizes[a]
        dtables.append(
            _segment_sum(
                lay,
                grad,
                lay.sizes[a],
                lay.dims[a],
                lay.cols[a],
                size=lay.sizes[a],
                stride=lay.strides[a],
                keys=keys,
                position_ids=position_ids,
                axial_mask=axial_mask,
                word_seed=None,
                word_p=0.0,
                dtype=dtype,
            )
        )
    dword = grad.new_empty(0)
    if needs_grad[0] and input_ids is not None:
        dword = _segment_sum(
            lay,
            grad,
            int(word_weight.shape[0]),
            lay.hidden,
            0,
            size=1,
            stride=1,
            keys=input_ids.reshape(-1).to(torch.int64),
            position_ids=None,
            axial_mask=None,
            word_seed=word_seed,
            word_p=word_p,
            dtype=dtype,
        )
    return [dword, *dtables]


def _triton_fwd_setup_context(ctx, inputs, output):
    input_ids, word_weight, tables, position_ids, axial_mask, word_seed, word_p = inputs
    ctx.word_p = word_p
    ctx.save_for_backward(input_ids, word_weight, position_ids, axial_mask, word_seed, *tables)


def _triton_fwd_backward(ctx, grad_out):
    input_ids, word_weight, position_ids, axial_mask, word_seed, *tables = ctx.saved_tensors
    needs_grad = [ctx.needs_input_grad[1], *ctx.needs_input_grad[2]]  # the tables: one flag each
    grads = torch.ops.reformer_kernels.axial_word_embedding_triton_bwd(
        grad_out, input_ids, word_weight, tables, position_ids, axial_mask, word_seed, ctx.word_p, needs_grad
    )
    dword = grads[0] if needs_grad[0] and input_ids is not None else None
    dtables = [g if needs else None for g, needs in zip(grads[1:], needs_grad[1:])]
    return None, dword, dtables, None, None, None, None


_triton_fwd_op.register_autograd(_triton_fwd_backward, setup_context=_triton_fwd_setup_context)


def unsupported_reason(tables: Sequence[torch.Tensor]) -> str | None:
    """Why the kernels cannot take these (valid) tables, or ``None``: they compute in fp32 and store
    fp16, bf16 or fp32 (float64 would silently lose precision), and bf16 is wrong under the Triton 3.9
    interpreter. The ``auto`` backend falls back to PyTorch instead; backend ``triton`` raises a
    ``ValueError`` with this reason."""
    dtype = tables[0].dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return (
            "the Triton axial embedding kernels take float16, bfloat16 or float32 tables (fp32 arithmetic); "
            f"got {dtype}"
        )
    if dtype == torch.bfloat16 and triton_interpreting():
        return (
            "bfloat16 tables cannot run under the Triton interpreter (TRITON_INTERPRET=1): Triton 3.9's "
            "interpreter casts fp32 to bf16 wrongly; use float16/float32 or the 'torch' backend"
        )
    return None


def _axial_word_embedding(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None = None,
    *,
    axial_mask: torch.Tensor | None = None,
    word_seed: torch.Tensor | None = None,
    word_dropout_p: float = 0.0,
    check: bool = True,
) -> torch.Tensor:
    """The Triton op with explicit randomness (``axial_mask`` ``[B, C]``, ``word_seed`` int64 ``[1]``).

    ``check=False`` skips the argument checks a caller has already run (``check_axial_inputs``).
    """
    tables = list(axial_weights)
    if check:
        batch, length = check_axial_inputs(input_ids, word_weight, tables, position_ids, word_dropout_p)
        reason = unsupported_reason(tables)
        if reason is not None:
            raise ValueError(reason)
    else:
        batch, length = (input_ids if input_ids is not None else position_ids).shape
    device, dtype = tables[0].device, tables[0].dtype
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"axial embedding tables must be CUDA (or CPU under TRITON_INTERPRET=1) tensors; got {device}")
    hidden = sum(int(w.shape[1]) for w in tables)
    if axial_mask is not None:
        channels = int(tables[1].shape[0]) if len(tables) > 1 else hidden
        if not isinstance(axial_mask, torch.Tensor) or tuple(axial_mask.shape) != (batch, channels):
            raise ValueError(
                f"axial_mask must be a [{batch}, {channels}] tensor; got {getattr(axial_mask, 'shape', axial_mask)}"
            )
        if axial_mask.device != device:
            raise ValueError(f"axial_mask is on {axial_mask.device} but the tables are on {device}")
        axial_mask = axial_mask.to(dtype).contiguous()
    if word_seed is not None:
        if input_ids is None:
            raise ValueError("word_seed needs input_ids (it drives the word-embedding dropout)")
        if not isinstance(word_seed, torch.Tensor) or word_seed.numel() != 1 or word_seed.dtype != torch.int64:
            raise ValueError("word_seed must be a one-element int64 tensor")
        if word_seed.device != device:
            raise ValueError(f"word_seed is on {word_seed.device} but the tables are on {device}")
        word_seed = word_seed.reshape(1)
    tables = [w.contiguous() for w in tables]
    if word_weight is not None:
        word_weight = word_weight.contiguous()
    return torch.ops.reformer_kernels.axial_word_embedding_triton_fwd(
        input_ids, word_weight, tables, position_ids, axial_mask, word_seed, float(word_dropout_p)
    )


def axial_word_embedding_triton(
    input_ids: torch.Tensor | None,
    word_weight: torch.Tensor | None,
    axial_weights: Sequence[torch.Tensor],
    position_ids: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    check: bool = True,
) -> torch.Tensor:
    """Fused word + axial embedding with transformers' training dropout drawn from torch's RNG.

    The word-dropout seed is drawn first (``torch.randint`` on the device), then the axial
    dropout2d multipliers (:func:`axial_dropout_mask`) — the same order as transformers, though
    the word-dropout bits come from Triton's Philox and so differ from ``nn.functional.dropout``.
    """
    tables = list(axial_weights)
    if check:
        check_axial_inputs(input_ids, word_weight, tables, position_ids, dropout_p)
        reason = unsupported_reason(tables)
        if reason is not None:
            raise ValueError(reason)
    batch = (input_ids if input_ids is not None else position_ids).shape[0]
    device, dtype = tables[0].device, tables[0].dtype
    word_seed = axial_mask = None
    if dropout_p > 0:
        if input_ids is not None:
            word_seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
        hidden = sum(int(w.shape[1]) for w in tables)
        axial_mask = axial_dropout_mask(
            batch, [int(w.shape[0]) for w in tables], hidden, dropout_p, dtype=dtype, device=device
        )
    return _axial_word_embedding(
        input_ids,
        word_weight,
        tables,
        position_ids,
        axial_mask=axial_mask,
        word_seed=word_seed,
        word_dropout_p=float(dropout_p),
        check=False,
    )


def axial_position_embedding_triton(
    position_ids: torch.Tensor, weights: Sequence[torch.Tensor], *, check: bool = True
) -> torch.Tensor:
    """``[B, L, sum(d_a)]`` axial position embeddings (the ``axial_position_embedding`` op's Triton path)."""
    return _axial_word_embedding(None, None, weights, position_ids, check=check)


# ----------------------------------------------------------------------------------------- registry


def kernel_specs():
    """Every kernel at its default launch configuration, for fp16, bf16 and fp32 tables."""
    from ...kernel_registry import KernelSpec

    fwd_ints = (
        [f"n{a}" for a in range(MAX_AXES)]
        + [f"s{a}" for a in range(MAX_AXES)]
        + [f"d{a}" for a in range(MAX_AXES)]
        + [f"c{a}" for a in range(MAX_AXES)]
        + ["N_TOKENS", "L", "D", "TOTAL", "V", "pos_sb", "pos_sl", "ids_sb", "ids_sl", "mask_sb", "mask_n", "mask_s"]
    )
    bwd_ints = [
        "N_ROWS",
        "d",
        "c",
        "n",
        "s",
        "PER",
        "M_REG",
        "SPLITS",
        "L",
        "D",
        "TOTAL",
        "pos_sb",
        "pos_sl",
        "mask_sb",
        "mask_n",
        "mask_s",
    ]
    specs = []
    for tname in ("fp16", "bf16", "fp32"):
        ptr = f"*{tname}"
        fwd_sig = {"p_out": ptr, "p_pos": "*i64", "p_ids": "*i64", "p_word": ptr, "p_mask": ptr, "p_seed": "*i64"}
        fwd_sig.update({f"p_w{a}": ptr for a in range(MAX_AXES)})
        fwd_sig.update({name: "i32" for name in fwd_ints})
        fwd_sig.update({"word_p": "fp32", "word_scale": "fp32"})
        # the heaviest variant: 4 axes, positions, word rows, per-token axial mask, word dropout
        specs.append(
            KernelSpec(
                name=f"axial_pos_fwd_kernel-{tname}",
                kernel=axial_pos_fwd_kernel,
                signature=fwd_sig,
                constexprs={
                    "NUM_AXES": MAX_AXES,
                    "HAS_POS": True,
                    "HAS_WORD": True,
                    "AXIAL_MASK": SCALE_AXIAL_TOKEN,
                    "WORD_DROPOUT": True,
                    "BLOCK_T": FWD_BLOCK_T,
                    "BLOCK_D": FWD_BLOCK_D,
                },
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
            )
        )
        specs.append(
            KernelSpec(
                name=f"axial_pos_fwd_kernel-{tname}-2axes-nomask",
                kernel=axial_pos_fwd_kernel,
                signature=fwd_sig,
                constexprs={
                    "NUM_AXES": 2,
                    "HAS_POS": False,
                    "HAS_WORD": True,
                    "AXIAL_MASK": SCALE_NONE,
                    "WORD_DROPOUT": False,
                    "BLOCK_T": FWD_BLOCK_T,
                    "BLOCK_D": FWD_BLOCK_D,
                },
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
            )
        )
        # table gradients (training layout and arbitrary positions, with the dropout2d mask) and the
        # word gradient (Philox dropout); with splits > 1 the same code stores fp32 partials instead
        for regular, has_pos, scale, label in (
            (True, False, SCALE_AXIAL_TOKEN, "regular-mask"),
            (False, True, SCALE_AXIAL_TOKEN, "sorted-mask"),
            (False, False, SCALE_WORD_DROPOUT, "word-dropout"),
        ):
            bwd_sig = {
                "p_dw": ptr,
                "p_do": ptr,
                "p_tok": "*i64",
                "p_seg": "*i64",
                "p_pos": "*i64",
                "p_mask": ptr,
                "p_seed": "*i64",
            }
            bwd_sig.update({name: "i32" for name in bwd_ints})
            bwd_sig.update({"word_p": "fp32", "word_scale": "fp32"})
            specs.append(
                KernelSpec(
                    name=f"axial_pos_bwd_kernel-{tname}-{label}",
                    kernel=axial_pos_bwd_kernel,
                    signature=bwd_sig,
                    constexprs={
                        "REGULAR": regular,
                        "HAS_POS": has_pos,
                        "SCALE": scale,
                        "BLOCK_T": BWD_BLOCK_T,
                        "BLOCK_D": BWD_BLOCK_D,
                    },
                    num_warps=NUM_WARPS,
                    num_stages=NUM_STAGES,
                )
            )
    return specs
