"""LSH hashing op: ``lsh_hash(vectors, rotations, num_buckets, attention_mask=None)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backend import use_triton
from .reference import bucket_factors, lsh_hash_reference, num_buckets_product, rotation_size

__all__ = ["lsh_hash", "lsh_hash_reference", "bucket_factors", "rotation_size", "num_buckets_product"]


def _check_inputs(vectors, rotations, num_buckets, attention_mask):
    factors = bucket_factors(num_buckets)
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 4:
        raise ValueError(
            f"vectors must be a [batch, heads, length, head_dim] tensor; got {getattr(vectors, 'shape', type(vectors))}"
        )
    if not vectors.is_floating_point():
        raise TypeError(f"vectors must be floating point; got {vectors.dtype}")
    batch_size, num_heads, seq_len, head_dim = vectors.shape
    expected = (num_heads, head_dim, rotations.shape[2] if rotations.dim() == 4 else -1, sum(factors) // 2)
    if rotations.dim() != 4 or tuple(rotations.shape) != expected:
        raise ValueError(
            f"rotations must have shape [heads, head_dim, rounds, sum(num_buckets)/2] = {expected}; got "
            f"{tuple(rotations.shape)}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, seq_len):
        raise ValueError(
            f"attention_mask must have shape [batch, length] = {(batch_size, seq_len)}; got "
            f"{tuple(attention_mask.shape)}"
        )


def _triton_supports(vectors, num_buckets) -> bool:
    from .triton import is_supported

    return is_supported(vectors, num_buckets)


def lsh_hash(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    increase_num_buckets: bool = False,
) -> torch.Tensor:
    """Bucket ids ``[B, H, R*L]`` (int32, offset per round); see ``reference.lsh_hash_reference``.

    Runs the Triton kernel when ``use_triton`` selects it, otherwise on CPU
    ``torch_fast.lsh_hash_fast`` (bit-identical to the reference, blocked and without the
    ``cat([x, -x])``). Other devices keep the reference: the fast path's bitwise identity rests on
    its blocked GEMMs rounding like the full one, which was verified for MKL on CPU only.
    """
    _check_inputs(vectors, rotations, num_buckets, attention_mask)
    if use_triton(vectors, supported=lambda: _triton_supports(vectors, num_buckets)):
        from .triton import lsh_hash_triton

        return lsh_hash_triton(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
    if vectors.device.type != "cpu":
        return lsh_hash_reference(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
    from .torch_fast import lsh_hash_fast

    return lsh_hash_fast(vectors, rotations, num_buckets, attention_mask, increase_num_buckets)
