"""One-query attention through an index in Triton: the whole decode op in one launch.

``decode_attention_fwd_kernel`` runs one program per (batch row, head). It loads the query row once, then
walks every hash round's ``T`` index entries in blocks of ``BLOCK_T``: the block's row numbers are read from
``index`` and the key and value rows are loaded *through them* (never gathered into a copy), the scores are
computed in registers in fp32 with the reference's replacements (see ``reference.py``), and an online softmax
keeps the running max, sum and output of the round. At the end of a round its ``lse`` and output join an
online logsumexp over the rounds, so a step is one launch whatever the number of rounds, and nothing but the
``[B, H, D]`` output is written.

Why a kernel: the work is tiny (``R * T`` rows of ``D`` read, e.g. 128 x 64 per head per round) and memory
bound; the PyTorch path takes about a dozen launches per call (gather of keys and of values into fresh
copies, key norm, two products, masks, logsumexp, exp, round weights), each a full read and write of a
small tensor, and on a GPU the launch latency of those is most of a decoding step's attention time. The
kernel reads each window row once and writes only the output. It uses no ``tl.dot`` (one query row: the
products are reductions over ``D`` and over the window), so it needs no tensor cores and no 16-row padding.

Numerics: natural-log max / logsumexp with ``exp2((x - m) * log2(e))`` (as ``chunked_attention``'s kernel,
so that ``lse`` rounds like torch's), the output normalised by ``exp(m - lse)`` (the reference's
``exp(s - lse)`` also for fully masked rows), fp32 accumulation, fp32 replacement values for every input
dtype. Rounds combine online (``lse_total`` and the output rescaled as each round arrives): equal to the
reference's ``softmax_r(lse_r)`` weights up to rounding.

Index entries outside ``[0, N)`` never make the kernel read out of bounds (the row loads are masked, reading
zeros); the host function checks the range unless the caller vouches for it (``validate=False``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...kernel_registry import KernelSpec
from ..chunked_attention.reference import mask_values

__all__ = ["decode_attention_triton", "kernel_specs", "unsupported_reason"]

MASK_VALUE, SELF_MASK_VALUE = mask_values(torch.float32)
NORM_EPS = 1e-6
MAX_HEAD_DIM = 256
_NUM_WARPS = 4
# a [BLOCK_T, BLOCK_D] tile of keys and one of values stay within ~4K elements each (no spills at D 256)
_TILE_ELEMENTS = 4096

_MASK_VALUE = tl.constexpr(MASK_VALUE)
_SELF_MASK_VALUE = tl.constexpr(SELF_MASK_VALUE)
_NORM_EPS = tl.constexpr(NORM_EPS)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TL_INDEX = {torch.int32: "i32", torch.int64: "i64"}


@triton.jit(do_not_specialize=["num_rows", "window", "num_rounds"])
def decode_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    key_start_ptr,
    self_idx_ptr,
    o_ptr,
    sm_scale,
    num_heads,
    num_rows,
    num_rounds,
    window,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ib,
    stride_ih,
    stride_ir,
    stride_it,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SHARED_QK: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    HAS_SELF: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    q_ptr = q_ptr + i_b * stride_qb + i_h * stride_qh
    k_ptr = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_ptr = v_ptr + i_b * stride_vb + i_h * stride_vh
    idx_ptr = idx_ptr + i_b * stride_ib + i_h * stride_ih
    o_ptr = o_ptr + i_b * stride_ob + i_h * stride_oh

    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < HEAD_DIM  # [BD]
    b_q = tl.load(q_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    if HAS_KEY_START:
        key_start = tl.load(key_start_ptr + i_b)
    if HAS_SELF:
        self_idx = tl.load(self_idx_ptr + i_b)

    # logsumexp and output of the rounds seen so far (online over rounds)
    b_lse_all = tl.full([1], float("-inf"), dtype=tl.float32)  # [1]
    b_out = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    for i_r in range(0, num_rounds):
        b_m = tl.full([1], float("-inf"), dtype=tl.float32)  # [1]
        b_l = tl.zeros([1], dtype=tl.float32)  # [1]
        b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
        # the first block holds entry 0, a real entry, so the running max is finite from then on
        for i_t in range(0, tl.cdiv(window, BLOCK_T)):
            o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
            m_t = o_t < window  # [BT]
            b_idx = tl.load(idx_ptr + i_r * stride_ir + o_t * stride_it, mask=m_t, other=0)  # [BT]
            # an out-of-range row must not turn into an out-of-bounds read
            m_row = m_t & (b_idx >= 0) & (b_idx < num_rows)  # [BT]
            # row offsets within one (batch, head) are int32 (the host checks rows * stride < 2**31)
            b_row = tl.where(m_row, b_idx, 0).to(tl.int32)  # [BT]
            m_tile = m_row[:, None] & m_d[None, :]  # [BT, BD]
            b_k = tl.load(k_ptr + (b_row * stride_kn)[:, None] + o_d[None, :], mask=m_tile, other=0.0).to(
                tl.float32
            )  # [BT, BD]
            b_s = tl.sum(b_k * b_q[None, :], 1)  # [BT]
            if SHARED_QK:
                # key = x * rsqrt(mean(x^2) + eps) / sqrt(D): padding columns are zeros
                b_ss = tl.sum(b_k * b_k, 1)  # [BT]
                b_s = b_s / tl.sqrt((b_ss / HEAD_DIM + _NORM_EPS) * HEAD_DIM)  # [BT]
            else:
                b_s = b_s * sm_scale  # [BT]
            if HAS_KEY_START:
                b_s = tl.where(o_t < key_start, _MASK_VALUE, b_s)  # [BT]
            if HAS_SELF:
                b_s = tl.where(m_row & (b_row == self_idx), _SELF_MASK_VALUE, b_s)  # [BT]
            # block padding beyond the window: probability exactly 0
            b_s = tl.where(m_t, b_s, float("-inf"))  # [BT]
            b_m_new = tl.maximum(b_m, tl.max(b_s, 0))  # [1]
            b_alpha = tl.exp2((b_m - b_m_new) * _LOG2E)  # [1]
            b_p = tl.exp2((b_s - b_m_new) * _LOG2E)  # [BT]
            b_v = tl.load(v_ptr + (b_row * stride_vn)[:, None] + o_d[None, :], mask=m_tile, other=0.0).to(
                tl.float32
            )  # [BT, BD]
            b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, 0)  # [BD]
            b_l = b_l * b_alpha + tl.sum(b_p, 0)  # [1]
            b_m = b_m_new
        b_lse = b_m + tl.log2(b_l) * _LN2  # [1]
        # exp(m - lse) instead of 1 / l: the reference's exp(s - lse), also where lse rounds to m
        b_acc = b_acc * tl.exp2((b_m - b_lse) * _LOG2E)  # [BD]
        b_top = tl.maximum(b_lse_all, b_lse)  # [1]
        b_lse_new = b_top + tl.log2(tl.exp2((b_lse_all - b_top) * _LOG2E) + tl.exp2((b_lse - b_top) * _LOG2E)) * _LN2
        b_out = b_out * tl.exp2((b_lse_all - b_lse_new) * _LOG2E) + b_acc * tl.exp2((b_lse - b_lse_new) * _LOG2E)
        b_lse_all = b_lse_new
    tl.store(o_ptr + o_d, b_out.to(o_ptr.dtype.element_ty), mask=m_d)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_config(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_T)``: a head row padded to a power of two >= 16, window blocks of ~4K elements."""
    block_d = max(16, _next_pow2(head_dim))
    return block_d, max(16, min(64, _TILE_ELEMENTS // block_d))


def _check_triton_inputs(query, key, value, index) -> None:
    if query.dtype not in _TL_DTYPES:
        raise TypeError(
            f"query dtype must be one of float16, bfloat16, float32 for the Triton decode kernel; got {query.dtype}"
        )
    if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim (query.shape[-1]) must be in [1, {MAX_HEAD_DIM}] for the Triton decode kernel; got "
            f"{query.shape[-1]}. Use the 'torch' backend for larger heads."
        )
    if index is not None and index.dtype not in _TL_INDEX:
        raise TypeError(f"index must be int32 or int64 for the Triton decode kernel; got {index.dtype}")
    # in-kernel row offsets within one (batch, head) are int32
    span = max(key.shape[2] * key.stride(2), value.shape[2] * value.stride(2))
    if span >= 2**31:
        raise ValueError(
            f"rows * row stride = {span} of key/value must be < 2**31 for the Triton decode kernel (its row offsets "
            "are int32)"
        )


def unsupported_reason(query, key, value, index) -> str | None:
    """Why ``decode_attention_triton`` cannot take these (valid) inputs, or ``None`` when it can. The ``auto``
    backend falls back to PyTorch instead; backend ``triton`` raises a ``ValueError`` with this reason."""
    try:
        _check_triton_inputs(query, key, value, index)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def _unit_last(tensor: torch.Tensor) -> torch.Tensor:
    # the kernel reads head rows with unit stride; the cache's buffers and the model's views already have it
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def decode_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    shared_qk: bool,
    key_start: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused decode attention (inputs validated by ``decode_attention``); returns ``[B, H, D]``. A registered
    operator, ``reformer_kernels::decode_attention_triton`` (inference: no autograd formula)."""
    _check_triton_inputs(query, key, value, index)
    query, key, value = _unit_last(query), _unit_last(key), _unit_last(value)
    return torch.ops.reformer_kernels.decode_attention_triton(
        query, key, value, index, bool(shared_qk), key_start, self_index
    )


@triton_op("reformer_kernels::decode_attention_triton", mutates_args=())
def _decode_attention_triton_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: torch.Tensor,
    shared_qk: bool,
    key_start: torch.Tensor | None,
    self_index: torch.Tensor | None,
) -> torch.Tensor:
    batch_size, num_heads, head_dim = query.shape
    num_rows = key.shape[2]
    num_rounds, window = index.shape[2:]
    out = torch.empty((batch_size, num_heads, head_dim), dtype=query.dtype, device=query.device)
    block_d, block_t = launch_config(head_dim)
    # absent optional inputs: a placeholder pointer the kernel never reads
    placeholder = index
    wrap_triton(decode_attention_fwd_kernel)[(batch_size * num_heads,)](
        query,
        key,
        value,
        index,
        # [B] int64, contiguous (the cache passes expanded views of one slot number)
        placeholder if key_start is None else key_start.to(torch.int64).contiguous(),
        placeholder if self_index is None else self_index.to(torch.int64).contiguous(),
        out,
        head_dim**-0.5,
        num_heads,
        num_rows,
        num_rounds,
        window,
        *query.stride()[:2],
        *key.stride()[:3],
        *value.stride()[:3],
        *index.stride(),
        *out.stride()[:2],
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        SHARED_QK=shared_qk,
        HAS_KEY_START=key_start is not None,
        HAS_SELF=self_index is not None,
        num_warps=_NUM_WARPS,
    )
    return out


# (dtype, head_dim, index dtype, mode) as the cache launches the kernel: LSH steps read the cache's int32
# window positions with the self mask (and key_start for rows still within a chunk); local steps an int64
# range with key_start.
_SPEC_MODES = {
    "lsh": (torch.int32, dict(SHARED_QK=True, HAS_KEY_START=True, HAS_SELF=True)),
    "local": (torch.int64, dict(SHARED_QK=False, HAS_KEY_START=True, HAS_SELF=False)),
}
SPEC_SHAPES = [(dtype, head_dim) for dtype in (torch.float32, torch.float16, torch.bfloat16) for head_dim in (64, 128)]


def kernel_specs() -> list[KernelSpec]:
    specs = []
    for torch_dtype, head_dim in SPEC_SHAPES:
        ty = _TL_DTYPES[torch_dtype]
        block_d, block_t = launch_config(head_dim)
        for tag, (index_dtype, flags) in _SPEC_MODES.items():
            strides = [
                "stride_qb",
                "stride_qh",
                "stride_kb",
                "stride_kh",
                "stride_kn",
                "stride_vb",
                "stride_vh",
                "stride_vn",
                "stride_ib",
                "stride_ih",
                "stride_ir",
                "stride_ob",
                "stride_oh",
            ]
            signature = {
                "q_ptr": f"*{ty}",
                "k_ptr": f"*{ty}",
                "v_ptr": f"*{ty}",
                "idx_ptr": f"*{_TL_INDEX[index_dtype]}",
                "key_start_ptr": "*i64",
                "self_idx_ptr": "*i64",
                "o_ptr": f"*{ty}",
                "sm_scale": "fp32",
                "num_heads": "i32",
                "num_rows": "i32",
                "num_rounds": "i32",
                "window": "i32",
                **{name: "i32" for name in strides},
            }
            specs.append(
                KernelSpec(
                    name=f"decode_attention_fwd_kernel[{tag},{ty},D{head_dim}]",
                    kernel=decode_attention_fwd_kernel,
                    signature=signature,
                    # the window index is contiguous along T (the JIT specialises a unit stride)
                    constexprs=dict(
                        stride_it=1,
                        HEAD_DIM=head_dim,
                        BLOCK_D=block_d,
                        BLOCK_T=block_t,
                        **flags,
                    ),
                    num_warps=_NUM_WARPS,
                    num_stages=1,
                    # row strides of head_dim 64 / 128 buffers are multiples of 16 elements
                    divisible_by_16=("stride_qh", "stride_kn", "stride_vn", "stride_oh", "stride_kh", "stride_vh"),
                )
            )
    return specs
