"""LSH hashing in Triton: one pass over the vectors for all rounds and all bucket factors.

Each program owns ``BLOCK_L`` positions of one (batch, head). It reads that ``[BLOCK_L, D]`` tile
of vectors once and keeps it on chip; for every round ``r`` and factor ``f_i`` it projects the
tile on that factor's ``f_i / 2`` rotation columns with ``tl.dot`` on tensor cores (fp16/bf16)
and takes ``argmax([xR, -xR])`` as a max and a min reduction: the bucket is the first index of the
max of ``xR`` or ``f_i/2 +`` the first index of the min of ``xR`` (``max(-xR) = -min(xR)``), the
positive half winning a tie because it comes first in the concatenation, exactly as
``torch.argmax`` returns the first maximum. Factor buckets are combined mixed-radix, least
significant first. Padded tokens get the extra bucket ``prod(factors)`` when the batch has
padding; whether it has any is a device scalar made by a tensor op in the host function (no host
synchronisation), and the per-round offset ``prod(factors) + (has_padding | increase_num_buckets)``
is formed in the kernel.

Rotation layout. The host function rearranges the (small) rotations ``[H, D, R, K]`` into
``[H, R, F, BLOCK_D, BLOCK_W]``: one zero-padded, contiguous, 16-byte aligned tile per (head,
round, factor), whose padding columns repeat the factor's last column. Repeated columns change
neither the max/min nor its first index, so the reductions need no masks and the tile loads are
vectorised.

Numerics follow the reference, which projects in the vectors' dtype with the rotations cast to
it: products of fp16 / bf16 values are exact in fp32 and accumulate in fp32, and the projection
is rounded to the input dtype before the argmax, as the reference's einsum output is, so only the
fp32 summation order differs. The Triton 3.9 interpreter computes bf16 ``tl.dot`` wrongly, so
under the interpreter (only) bf16 operands are upcast to fp32 first (``UPCAST``), which computes
the same exact products. fp32 inputs get exact fp32 products too, without TF32: a Triton fp32
``input_precision="ieee"`` dot keeps whole K slices of both operands in each thread's registers
and spilled (compiled for sm_80/sm_90a) at head_dim 128 for every BLOCK_L tried (16..64) and at
head_dim 64 above BLOCK_L=16, so the fp32 path (``FMA_LOOP``) accumulates one head-dim column
at a time on the FMA units; its columns are re-read from L1/L2 for each round and factor (DRAM
still reads each vector once).

NaN follows ``torch.argmax`` (see the reference): a projection row with NaN entries takes the index
of its first NaN column. NaN compares false, so the max/min reductions cannot find it; the kernel
marks the NaN columns before rounding (the bf16 integer rounding turns the canonical GPU NaN
``0x7FFFFFFF`` into ``-0.0``) and overrides the argmax of such rows with the first marked column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...backend import triton_interpreting
from ...kernel_registry import KernelSpec
from .reference import bucket_factors

_ROUND_NONE, _ROUND_FP16, _ROUND_BF16 = 0, 1, 2
# dtype -> (Triton type name, rounding of the projection, tl.dot input precision)
_DTYPES = {
    torch.float16: ("fp16", _ROUND_FP16, "ieee"),
    torch.bfloat16: ("bf16", _ROUND_BF16, "ieee"),
    torch.float32: ("fp32", _ROUND_NONE, "ieee"),
}
MAX_BLOCK_D = 256
MAX_BLOCK_W = 128
MAX_FACTORS = 4


@triton.jit
def lsh_hash_fwd_kernel(
    x_ptr,
    rot_ptr,
    keep_ptr,
    has_pad_ptr,
    out_ptr,
    H,
    L,
    D,
    R,
    total_buckets,
    increase_num_buckets,
    num_l_blocks,
    factor_0,
    factor_1,
    factor_2,
    factor_3,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_xd,
    stride_kb,
    NUM_FACTORS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ROUND: tl.constexpr,
    UPCAST: tl.constexpr,
    FMA_LOOP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # one flat grid axis: B*H*cdiv(L, BLOCK_L) can exceed the 65535 limit of the other axes
    i_p = tl.program_id(0).to(tl.int64)
    i_bh = i_p // num_l_blocks
    i_l = i_p % num_l_blocks
    i_b = i_bh // H
    i_h = i_bh % H

    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    o_w = tl.arange(0, BLOCK_W)  # [BW]
    m_l = o_l < L  # [BL]
    m_d = o_d < D  # [BD]

    p_x = x_ptr + i_b * stride_xb + i_h * stride_xh + o_l * stride_xl  # [BL]
    if not FMA_LOOP:
        # each vector is read once, for all rounds and factors
        b_x = tl.load(p_x[:, None] + o_d[None, :] * stride_xd, mask=m_l[:, None] & m_d[None, :], other=0.0)  # [BL, BD]
        if UPCAST:
            b_x = b_x.to(tl.float32)  # [BL, BD]

    if HAS_MASK:
        # a padded token exists only if the batch has padding, so no need to test has_pad here
        b_keep = tl.load(keep_ptr + i_b * stride_kb + o_l, mask=m_l, other=1) != 0  # [BL]
        has_pad = tl.load(has_pad_ptr).to(tl.int32)
        per_round = total_buckets + ((has_pad != 0) | (increase_num_buckets != 0)).to(tl.int32)
    else:
        per_round = total_buckets + increase_num_buckets

    o_rot = o_d[:, None] * BLOCK_W + o_w[None, :]  # [BD, BW]
    p_rot_h = rot_ptr + i_h * R * (NUM_FACTORS * BLOCK_D * BLOCK_W)
    p_out = out_ptr + i_bh * R * L + o_l  # [BL]
    for i_r in range(R):
        b_bucket = tl.zeros([BLOCK_L], dtype=tl.int32)  # [BL]
        radix = 1
        for i_f in tl.static_range(NUM_FACTORS):
            # the factors are scalar arguments: no device tensor built from a Python list (its
            # host-to-device copy from pageable memory would synchronise the stream)
            if i_f == 0:
                factor = factor_0
            elif i_f == 1:
                factor = factor_1
            elif i_f == 2:
                factor = factor_2
            else:
                factor = factor_3
            p_rot = p_rot_h + (i_r * NUM_FACTORS + i_f) * (BLOCK_D * BLOCK_W)
            if FMA_LOOP:
                # fp32: exact products on the FMA units, one head-dim column at a time (an fp32
                # "ieee" tl.dot spills, see the module docstring); the columns come from L1/L2
                # after the first round
                b_p = tl.zeros([BLOCK_L, BLOCK_W], dtype=tl.float32)  # [BL, BW]
                for i_d in range(D):
                    b_xd = tl.load(p_x + i_d * stride_xd, mask=m_l, other=0.0)  # [BL]
                    b_rd = tl.load(p_rot + i_d * BLOCK_W + o_w)  # [BW]
                    b_p += b_xd[:, None] * b_rd[None, :]  # [BL, BW]
            else:
                b_rot = tl.load(p_rot + o_rot)  # [BD, BW]
                if UPCAST:
                    b_rot = b_rot.to(tl.float32)  # [BD, BW]
                b_p = tl.dot(b_x, b_rot, input_precision=INPUT_PRECISION, out_dtype=tl.float32)  # [BL, BW]
            # NaN entries, as torch.argmax sees them (the largest value; the first one wins)
            b_first_nan = tl.min(tl.where(b_p != b_p, o_w[None, :], BLOCK_W), 1)  # [BL]
            # the reference's einsum returns the projection in the input dtype: round like it
            if ROUND == 1:
                b_p = b_p.to(tl.float16).to(tl.float32)  # [BL, BW]
            elif ROUND == 2:
                # round-to-nearest-even with integer ops: an fp32 -> bf16 cast is wrong under the
                # Triton 3.9 interpreter, this is right in both the interpreter and the compiler
                b_bits = b_p.to(tl.uint32, bitcast=True)  # [BL, BW]
                b_bits = ((b_bits + (0x7FFF + ((b_bits >> 16) & 1))) >> 16) << 16  # [BL, BW]
                b_p = b_bits.to(tl.float32, bitcast=True)  # [BL, BW]
            b_max = tl.max(b_p, 1)  # [BL]
            b_min = tl.min(b_p, 1)  # [BL]
            b_arg_max = tl.min(tl.where(b_p == b_max[:, None], o_w[None, :], BLOCK_W), 1)  # [BL]
            b_arg_min = tl.min(tl.where(b_p == b_min[:, None], o_w[None, :], BLOCK_W), 1)  # [BL]
            # argmax([xR, -xR]) with max(-xR) = -min(xR); the positive half comes first, so it wins a tie
            b_arg = tl.where(b_max >= -b_min, b_arg_max, factor // 2 + b_arg_min)  # [BL]
            # a row with NaN: its first NaN column (in the xR half, which comes first in the concatenation)
            b_arg = tl.where(b_first_nan < BLOCK_W, b_first_nan, b_arg)  # [BL]
            b_bucket += radix * b_arg  # [BL]
            radix = radix * factor

        if HAS_MASK:
            b_bucket = tl.where(b_keep, b_bucket, total_buckets)  # [BL]
        b_bucket += i_r * per_round  # [BL]
        tl.store(p_out + i_r * L, b_bucket, mask=m_l)


def _next_pow2(n: int) -> int:
    # tl.dot needs every dim >= 16 on the GPU
    return max(16, triton.next_power_of_2(n))


def launch_config(block_d: int, block_w: int, dtype: torch.dtype, num_factors: int) -> dict:
    """``BLOCK_L`` / ``num_warps`` / ``num_stages`` for a padded head dim, factor width and count.

    Shared with ``kernel_specs`` so that the AOT compile test builds what the host launches;
    chosen so that no shipped configuration spills (see ``python -m reformer_kernels.aot``).
    """
    if dtype == torch.float32:
        # the [BLOCK_L, BLOCK_W] fp32 accumulator of the FMA loop stays in registers
        return {"BLOCK_L": min(64, 4096 // block_w), "num_warps": 4, "num_stages": 1}
    # the operand tiles of tl.dot live in registers: fewer positions per program for larger tiles
    tile = block_d * block_w
    if tile <= 64 * 32:
        block_l = 128
    elif tile <= 128 * 128:
        block_l = 64 if num_factors <= 2 else 32
    else:
        block_l = 32 if num_factors <= 2 else 16
    return {"BLOCK_L": block_l, "num_warps": 8, "num_stages": 1}


def prepare_rotations(
    rotations: torch.Tensor, factors: Sequence[int], dtype: torch.dtype, block_d: int, block_w: int
) -> torch.Tensor:
    """``[H, D, R, K]`` rotations -> contiguous ``[H, R, F, block_d, block_w]`` in ``dtype``.

    Tile ``(h, r, i)`` holds factor ``i``'s ``factors[i] / 2`` columns, rows zero-padded to
    ``block_d`` and columns padded by repeating the factor's last column. Device ops only.
    """
    num_heads, head_dim, num_rounds, _ = rotations.shape
    rot = rotations.detach().to(dtype)
    tiles, start = [], 0
    for factor in factors:
        half = factor // 2
        cols = rot[..., start : start + half]  # [H, D, R, half]
        start += half
        tiles.append(torch.cat([cols, cols[..., -1:].expand(-1, -1, -1, block_w - half)], dim=-1))
    tiles = torch.stack(tiles, dim=3).permute(0, 2, 3, 1, 4)  # [H, R, F, D, BW]
    out = rot.new_zeros((num_heads, num_rounds, len(factors), block_d, block_w))
    out[:, :, :, :head_dim] = tiles
    return out


def unsupported_reason(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: int | Sequence[int]) -> str | None:
    """Why ``lsh_hash_triton`` cannot take these (valid) inputs, or ``None`` when it can: dtype,
    head_dim, factor sizes and count, and int32 bucket ids. The ``auto`` backend falls back to PyTorch
    instead; backend ``triton`` raises a ``ValueError`` with this reason."""
    factors = bucket_factors(num_buckets)
    head_dim = vectors.shape[-1]
    num_rounds = rotations.shape[2]
    if vectors.dtype not in _DTYPES:
        return f"the Triton LSH hash kernel takes float16, bfloat16 or float32 vectors; got {vectors.dtype}"
    if _next_pow2(head_dim) > MAX_BLOCK_D:
        return f"vectors head_dim must be <= {MAX_BLOCK_D} for the Triton kernel; got {head_dim}"
    if _next_pow2(max(factors) // 2) > MAX_BLOCK_W:
        return f"num_buckets factors must be <= {2 * MAX_BLOCK_W} for the Triton kernel; got {list(factors)}"
    if len(factors) > MAX_FACTORS:
        return f"num_buckets must have at most {MAX_FACTORS} factors for the Triton kernel; got {list(factors)}"
    total = 1
    for factor in factors:
        total *= factor
    if num_rounds * (total + 1) >= 2**31:
        return (
            "the Triton kernel writes int32 bucket ids: num_hashes * (prod(num_buckets) + 1) = "
            f"{num_rounds} * ({total} + 1) must be < 2**31 (num_buckets {list(factors)}, num_hashes = "
            f"rotations.shape[2] = {num_rounds}); the PyTorch path returns int64 ids"
        )
    return None


def is_supported(vectors: torch.Tensor, num_buckets: int | Sequence[int], num_rounds: int = 1) -> bool:
    """Whether ``lsh_hash_triton`` accepts these inputs (see ``unsupported_reason``)."""
    rotations = torch.empty((0, 0, num_rounds, 0), device="meta")
    return unsupported_reason(vectors, rotations, num_buckets) is None


def lsh_hash_triton(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    increase_num_buckets: bool = False,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Triton implementation of ``lsh_hash`` (same contract as ``lsh_hash_reference``).

    ``check=False`` skips the validation a caller (the ``lsh_hash`` op) has already run: the op's
    ``check_lsh_hash_inputs`` and the kernel's ``unsupported_reason`` (a ``ValueError``).
    """
    if check:
        from . import check_lsh_hash_inputs

        check_lsh_hash_inputs(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
        reason = unsupported_reason(vectors, rotations, num_buckets)
        if reason is not None:
            raise ValueError(reason)
    factors = list(bucket_factors(num_buckets))
    return torch.ops.reformer_kernels.lsh_hash_triton(vectors, rotations, factors, attention_mask, increase_num_buckets)


@triton_op("reformer_kernels::lsh_hash_triton", mutates_args=())
def _lsh_hash_triton_op(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    factors: list[int],
    attention_mask: torch.Tensor | None,
    increase_num_buckets: bool,
) -> torch.Tensor:
    """The kernel launch as a registered operator (``torch.compile`` traces the kernel through ``wrap_triton``)."""
    batch_size, num_heads, seq_len, head_dim = vectors.shape
    num_rounds = rotations.shape[2]
    block_d, block_w = _next_pow2(head_dim), _next_pow2(max(factors) // 2)
    total = 1
    for factor in factors:
        total *= factor

    out = torch.empty((batch_size, num_heads, num_rounds * seq_len), dtype=torch.int32, device=vectors.device)
    if out.numel() == 0:
        return out

    _, round_mode, precision = _DTYPES[vectors.dtype]
    vectors = vectors.detach()
    rot = prepare_rotations(rotations, factors, vectors.dtype, block_d, block_w)
    if attention_mask is not None:
        keep = (attention_mask != 0).to(torch.uint8).contiguous()  # [B, L]
        # a device scalar: the kernel reads it, the host never does (no synchronisation)
        has_pad = (keep == 0).any().to(torch.uint8).reshape(1)
        stride_kb = keep.stride(0)
    else:
        # unused when HAS_MASK is False: a placeholder pointer (not the output: no aliased kernel arguments)
        keep = has_pad = torch.zeros(1, dtype=torch.uint8, device=vectors.device)
        stride_kb = 0

    cfg = launch_config(block_d, block_w, vectors.dtype, len(factors))
    num_l_blocks = triton.cdiv(seq_len, cfg["BLOCK_L"])
    grid = (batch_size * num_heads * num_l_blocks,)
    wrap_triton(lsh_hash_fwd_kernel)[grid](
        vectors, rot, keep, has_pad, out,
        num_heads, seq_len, head_dim, num_rounds, total, int(bool(increase_num_buckets)), num_l_blocks,
        *(tuple(factors) + (1,) * (MAX_FACTORS - len(factors))),
        vectors.stride(0), vectors.stride(1), vectors.stride(2), vectors.stride(3),
        stride_kb,
        NUM_FACTORS=len(factors), BLOCK_L=cfg["BLOCK_L"], BLOCK_D=block_d, BLOCK_W=block_w,
        HAS_MASK=attention_mask is not None, ROUND=round_mode,
        UPCAST=vectors.dtype == torch.bfloat16 and triton_interpreting(),
        FMA_LOOP=vectors.dtype == torch.float32, INPUT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def make_spec(
    block_d: int, block_w: int, dtype: torch.dtype, num_factors: int, has_mask: bool, **overrides
) -> KernelSpec:
    """The ``KernelSpec`` the host function launches for these tile sizes (contiguous vectors)."""
    type_name, round_mode, precision = _DTYPES[dtype]
    cfg = launch_config(block_d, block_w, dtype, num_factors)
    cfg.update(overrides)
    signature = {
        "x_ptr": f"*{type_name}",
        "rot_ptr": f"*{type_name}",
        "keep_ptr": "*u8",
        "has_pad_ptr": "*u8",
        "out_ptr": "*i32",
    }
    for name in ("H", "L", "D", "R", "total_buckets", "increase_num_buckets", "num_l_blocks"):
        signature[name] = "i32"
    for i in range(MAX_FACTORS):
        signature[f"factor_{i}"] = "i32"
    for name in ("stride_xb", "stride_xh", "stride_xl", "stride_kb"):
        signature[name] = "i32"
    return KernelSpec(
        name=f"lsh_hash_fwd-{type_name}-D{block_d}-W{block_w}-F{num_factors}-{'mask' if has_mask else 'nomask'}",
        kernel=lsh_hash_fwd_kernel,
        signature=signature,
        constexprs={
            # a contiguous head dim: the JIT specialises an int argument equal to 1 as a constant
            "stride_xd": 1,
            "NUM_FACTORS": num_factors,
            "BLOCK_L": cfg["BLOCK_L"],
            "BLOCK_D": block_d,
            "BLOCK_W": block_w,
            "HAS_MASK": has_mask,
            "ROUND": round_mode,
            "UPCAST": False,
            "FMA_LOOP": dtype == torch.float32,
            "INPUT_PRECISION": precision,
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        # fp16/bf16 projections run on tensor cores
        uses_mma=dtype != torch.float32,
        divisible_by_16=("stride_xb", "stride_xh", "stride_xl") if block_d == 64 or block_d == 128 else (),
    )


def kernel_specs() -> list[KernelSpec]:
    """Shipped configurations. fp16: head_dim 64 with num_buckets 64 (no padding) and factorized
    (two and four factors), and the largest tile of each ``BLOCK_L`` class of ``launch_config``
    (head_dim x factor/2 = 128x128 and 256x128, with two and four factors). bf16 differs from fp16
    only in the rounding and MMA type: the common and the largest case. fp32 (FMA loop, registers
    set by the factor width only): the common and the largest case."""
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    return [
        make_spec(64, 32, f16, 1, False),
        make_spec(64, 32, f16, 2, True),
        make_spec(64, 32, f16, MAX_FACTORS, True),
        make_spec(128, 128, f16, 2, True),
        make_spec(128, 128, f16, MAX_FACTORS, True),
        make_spec(MAX_BLOCK_D, MAX_BLOCK_W, f16, 2, True),
        make_spec(MAX_BLOCK_D, MAX_BLOCK_W, f16, MAX_FACTORS, True),
        make_spec(64, 32, b16, 2, True),
        make_spec(MAX_BLOCK_D, MAX_BLOCK_W, b16, MAX_FACTORS, True),
        make_spec(64, 32, f32, 2, True),
        make_spec(MAX_BLOCK_D, MAX_BLOCK_W, f32, MAX_FACTORS, True),
    ]
