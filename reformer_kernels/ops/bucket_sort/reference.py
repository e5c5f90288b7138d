"""Stable bucket sort in PyTorch: the specification of the sort op.

Sorting the bucket ids of all rounds ``[B, H, R*L]`` stably gives, per (batch, head), the order
in which LSH attention visits tokens: by bucket, then by position. Because bucket ids carry a
per-round offset, rounds stay in round order. The undo index is the inverse permutation.
"""

from __future__ import annotations

import torch


def bucket_sort_reference(buckets: torch.Tensor, num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of bucket ids along the last dimension.

    Args:
        buckets: ``[B, H, N]`` integer bucket ids (``N = R * L``).
        num_bins: upper bound (exclusive) on the ids; unused here, needed by the counting sort.

    Returns:
        ``(sorted_idx, undo_idx)``, both ``[B, H, N]`` int64: ``buckets.gather(-1, sorted_idx)`` is
        sorted, ties in position order, and ``sorted_idx.gather(-1, undo_idx) == arange(N)``.
    """
    sorted_idx = torch.sort(buckets, dim=-1, stable=True).indices  # [B, H, N]
    positions = torch.arange(buckets.shape[-1], device=buckets.device).expand_as(sorted_idx)
    undo_idx = torch.empty_like(sorted_idx).scatter_(-1, sorted_idx, positions)  # [B, H, N]
    return sorted_idx, undo_idx
