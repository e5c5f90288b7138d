"""Stable bucket sort op: ``bucket_sort(buckets, num_bins) -> (sorted_idx, undo_idx)``."""

from __future__ import annotations

import torch

from ...backend import use_triton
from .reference import bucket_sort_reference

__all__ = ["bucket_sort", "bucket_sort_reference"]


def bucket_sort(buckets: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of ``[B, H, N]`` bucket ids in ``[0, num_bins)``; returns int64 (sorted, undo)."""
    if not isinstance(buckets, torch.Tensor) or buckets.dim() != 3:
        raise ValueError(
            f"buckets must be a [batch, heads, rounds*length] tensor; got {getattr(buckets, 'shape', type(buckets))}"
        )
    if buckets.is_floating_point() or buckets.dtype == torch.bool:
        raise TypeError(f"buckets must be an integer tensor; got {buckets.dtype}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int; got {num_bins!r}")
    if use_triton(buckets):
        from .triton import bucket_sort_triton

        return bucket_sort_triton(buckets, num_bins)
    return bucket_sort_reference(buckets, num_bins)
