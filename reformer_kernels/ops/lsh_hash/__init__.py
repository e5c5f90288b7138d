"""LSH hashing op: ``lsh_hash(vectors, rotations, num_buckets, attention_mask=None)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backend import use_triton
from ...validation import check_bool, check_float_tensor, check_mask, check_same_device, check_tensor
from .._dispatch import call
from . import torch_fast
from .reference import bucket_factors, bucket_id_dtype, lsh_hash_reference, num_buckets_product, rotation_size

__all__ = [
    "bucket_factors",
    "bucket_id_dtype",
    "check_lsh_hash_inputs",
    "lsh_hash",
    "lsh_hash_reference",
    "num_buckets_product",
    "random_rotations",
    "rotation_size",
]


# ------------------------------------------------------------------------------------------------
# registered operators (torch.library): what torch.compile sees instead of the Python implementations
# ------------------------------------------------------------------------------------------------


def _lsh_hash_impl(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: list[int],
    attention_mask: torch.Tensor | None,
    increase_num_buckets: bool,
) -> torch.Tensor:
    """The PyTorch path: ``torch_fast.lsh_hash_fast`` on CPU, the reference elsewhere (see ``lsh_hash``). Bucket
    ids are integers: the op is not differentiable (its outputs never require grad)."""
    if vectors.device.type != "cpu":
        return lsh_hash_reference(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
    return torch_fast.lsh_hash_fast(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)


_lsh_hash_op = torch.library.custom_op("reformer_kernels::lsh_hash", _lsh_hash_impl, mutates_args=())


@_lsh_hash_op.register_fake
def _(vectors, rotations, num_buckets, attention_mask, increase_num_buckets):
    batch_size, num_heads, seq_len, _ = vectors.shape
    num_rounds = rotations.shape[2]
    shape = (batch_size, num_heads, num_rounds * seq_len)
    return vectors.new_empty(shape, dtype=bucket_id_dtype(num_rounds, num_buckets))


@torch.library.custom_op("reformer_kernels::random_rotations", mutates_args=())
def _random_rotations_op(shape: list[int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.randn(shape)`` from a private generator seeded with ``seed`` (``random_rotations``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@_random_rotations_op.register_fake
def _(shape, seed, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype)


def random_rotations(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random rotations drawn from a private ``torch.Generator`` seeded with ``seed``: the numbers
    ``torch.manual_seed(seed); torch.randn(shape, device=device, dtype=dtype)`` gives, without touching the global
    RNG. A registered op, so that ``torch.compile`` traces it without a graph break (a ``Generator`` object cannot
    be traced)."""
    return torch.ops.reformer_kernels.random_rotations(list(shape), int(seed), torch.device(device), dtype)


def check_lsh_hash_inputs(
    vectors, rotations, num_buckets, attention_mask=None, increase_num_buckets=False
) -> tuple[int, ...]:
    """The op's validation, the same for every backend; returns the bucket factors.

    ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, size or device, each
    naming the argument. Reads no tensor values.
    """
    check_tensor(vectors, "vectors", dim=4, shape_doc="[batch, heads, length, head_dim]")
    check_float_tensor(vectors, "vectors")
    factors = bucket_factors(num_buckets)
    batch_size, num_heads, seq_len, head_dim = vectors.shape
    if head_dim < 1:
        raise ValueError(f"vectors head_dim (vectors.shape[-1]) must be >= 1; got {head_dim}")
    check_tensor(rotations, "rotations", dim=4, shape_doc="[heads, head_dim, rounds, sum(num_buckets)/2]")
    check_float_tensor(rotations, "rotations")
    expected = (num_heads, head_dim, rotations.shape[2], sum(factors) // 2)
    if tuple(rotations.shape) != expected:
        raise ValueError(
            f"rotations must have shape [heads, head_dim, rounds, sum(num_buckets)/2] = {expected}; got "
            f"{tuple(rotations.shape)}"
        )
    check_same_device(rotations, "rotations", vectors.device, "vectors")
    check_mask(attention_mask, "attention_mask", (batch_size, seq_len), vectors.device, "vectors")
    check_bool(increase_num_buckets, "increase_num_buckets")
    return factors


def _triton_unsupported(vectors, rotations, num_buckets) -> str | None:
    from .triton import unsupported_reason

    return unsupported_reason(vectors, rotations, num_buckets)


def lsh_hash(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    increase_num_buckets: bool = False,
) -> torch.Tensor:
    """Bucket ids ``[B, H, R*L]`` (int32, or int64 when ``R * (prod(num_buckets) + 1) >= 2**31``; offset
    per round); see ``reference.lsh_hash_reference``.

    Runs the Triton kernel when ``use_triton`` selects it, otherwise on CPU
    ``torch_fast.lsh_hash_fast`` (bit-identical to the reference, blocked and without the
    ``cat([x, -x])``). Other devices keep the reference: the fast path's bitwise identity rests on
    its blocked GEMMs rounding like the full one, which was verified for MKL on CPU only. Both run as
    registered operators (``reformer_kernels::lsh_hash``, ``reformer_kernels::lsh_hash_triton``), which
    ``torch.compile`` traces as single nodes.
    """
    check_lsh_hash_inputs(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
    if use_triton(vectors, unsupported=lambda: _triton_unsupported(vectors, rotations, num_buckets)):
        from .triton import lsh_hash_triton

        return lsh_hash_triton(vectors, rotations, num_buckets, attention_mask, increase_num_buckets, check=False)
    factors = list(bucket_factors(num_buckets))
    op = torch.ops.reformer_kernels.lsh_hash
    return call(op, _lsh_hash_impl, vectors, rotations, factors, attention_mask, increase_num_buckets)
