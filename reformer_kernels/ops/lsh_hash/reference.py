"""LSH hashing in PyTorch: the specification of the hash op.

Angular LSH (Andoni et al. 2015, as in the Reformer paper): project each vector on random
rotations ``R`` and take ``argmax([xR, -xR])``. With factorized buckets ``[b0, b1, ...]`` the
rotation columns are split into groups of ``b_i / 2``; the bucket is the mixed-radix number of
the per-group argmaxes (least significant first). Padded tokens (``attention_mask == 0``) go to
one extra bucket ``num_buckets`` when the batch contains padding. Round ``r`` adds the offset
``r * num_buckets_total`` so rounds never share a bucket id.

Bucket ids are int32, or int64 when ``rounds * (prod(num_buckets) + 1) >= 2**31`` (they would not
fit in int32; ``bucket_id_dtype``).

NaN (the same on every backend): ``torch.argmax`` treats NaN as the largest value and returns the
first one, so a projection row with NaN entries takes the index of its first NaN column (in the
``xR`` half, which comes first). A vector with a NaN coordinate has NaN in every projection and
hashes to bucket 0 of every factor (plus the round offset); a NaN in a rotation column sends every
vector to that column. Infinite projections compare as usual (``+inf`` of ``xR`` before ``+inf`` of
``-xR``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def bucket_factors(num_buckets: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise ``num_buckets`` (an int or a list of factors) to a tuple of even factors."""
    # the common valid cases (an int, or a list of ints: transformers' factorised buckets) without the checks
    # below, whose abstract-class isinstance tests cost microseconds (called several times per decoding step)
    if type(num_buckets) is int and num_buckets >= 2 and num_buckets % 2 == 0:
        return (num_buckets,)
    if type(num_buckets) in (list, tuple) and num_buckets and all(_even_int(f) for f in num_buckets):
        return tuple(num_buckets)
    if isinstance(num_buckets, numbers.Integral) and not isinstance(num_buckets, bool):
        factors = (int(num_buckets),)
    elif isinstance(num_buckets, (list, tuple)):
        factors = tuple(num_buckets)
    else:
        raise TypeError(f"num_buckets must be an int or a list of ints; got {num_buckets!r}")
    if len(factors) == 0:
        raise ValueError("num_buckets must be an int or a non-empty list of ints")
    for factor in factors:
        if not isinstance(factor, numbers.Integral) or isinstance(factor, bool):
            raise TypeError(f"num_buckets factors must be ints; got {factor!r}")
        if factor < 2 or factor % 2 != 0:
            raise ValueError(f"num_buckets factors must be even and >= 2; got {factor}")
    return tuple(int(factor) for factor in factors)


def _even_int(factor) -> bool:
    return type(factor) is int and factor >= 2 and factor % 2 == 0


def rotation_size(num_buckets: int | Sequence[int]) -> int:
    """Number of rotation columns needed (sum of factors / 2)."""
    return sum(bucket_factors(num_buckets)) // 2


def num_buckets_product(num_buckets: int | Sequence[int]) -> int:
    product = 1
    for factor in bucket_factors(num_buckets):
        product *= factor
    return product


def bucket_id_dtype(num_rounds: int, num_buckets: int | Sequence[int]) -> torch.dtype:
    """int32, or int64 when the largest id bound ``rounds * (prod(num_buckets) + 1)`` passes int32."""
    return torch.int64 if num_rounds * (num_buckets_product(num_buckets) + 1) >= 2**31 else torch.int32


def factor_buckets(rotated: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Bucket ids ``[...]`` (int64, without round offsets) of the projections ``rotated [..., sum(factors) / 2]``:
    ``argmax(cat([x, -x]))`` over each factor's group of columns, combined in mixed radix (the first factor least
    significant)."""
    buckets = None
    column, radix = 0, 1
    for factor in factors:
        half = rotated if len(factors) == 1 else rotated[..., column : column + factor // 2]  # [..., f/2]
        column += factor // 2
        factor_bucket = torch.argmax(torch.cat([half, -half], dim=-1), dim=-1)  # [...]
        buckets = factor_bucket if buckets is None else buckets.add_(factor_bucket, alpha=radix)
        radix *= factor
    return buckets


def lsh_hash_reference(
    vectors: torch.Tensor,
    rotations: torch.Tensor,
    num_buckets: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    increase_num_buckets: bool = False,
) -> torch.Tensor:
    """Hash ``vectors`` into buckets for every round.

    Args:
        vectors: ``[B, H, L, D]`` (gradients are not tracked).
        rotations: ``[H, D, R, sum(factors) / 2]`` random rotations, R = number of hash rounds.
        num_buckets: int or list of even factors.
        attention_mask: optional ``[B, L]``; zeros mark padding. If any position of the batch is
            padding, padded tokens get the extra bucket ``prod(factors)`` and the per-round offset
            becomes ``prod(factors) + 1``.
        increase_num_buckets: use the offset ``prod(factors) + 1`` even without padding (decoding
            with a cache whose buckets were computed with a pad bucket).

    Returns:
        ``[B, H, R * L]`` bucket ids, round-major, offset per round: int32, or int64 when
        ``R * (prod(factors) + 1) >= 2**31`` (``bucket_id_dtype``).
    """
    factors = bucket_factors(num_buckets)
    batch_size, num_heads, seq_len, _ = vectors.shape
    num_rounds = rotations.shape[2]
    vectors = vectors.detach()

    # [B, H, R, L, sum(f)/2]
    rotated = torch.einsum("bhld,hdrk->bhrlk", vectors, rotations.to(vectors.dtype))
    buckets = factor_buckets(rotated, factors)  # [B, H, R, L]
    total = num_buckets_product(factors)

    # the extra pad bucket, decided on the device (no host synchronisation)
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)  # [B, L]
        has_padding = (~keep).any()
        pad_bucket = torch.full_like(buckets, total)
        buckets = torch.where(keep[:, None, None, :] | ~has_padding, buckets, pad_bucket)
        buckets_per_round = total + (has_padding | increase_num_buckets).to(buckets.dtype)
    else:
        buckets_per_round = torch.tensor(total + int(increase_num_buckets), device=buckets.device)

    offsets = torch.arange(num_rounds, device=buckets.device).view(1, 1, -1, 1) * buckets_per_round
    ids = (buckets + offsets).reshape(batch_size, num_heads, num_rounds * seq_len)
    return ids.to(bucket_id_dtype(num_rounds, factors))
