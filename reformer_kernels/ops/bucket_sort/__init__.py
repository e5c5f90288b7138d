"""Stable bucket sort op: ``bucket_sort(buckets, num_bins) -> (sorted_idx, undo_idx)``."""

from __future__ import annotations

import torch

from ...backend import use_triton
from ...validation import check_index_dtype, check_index_range, check_int, check_tensor
from .._dispatch import call
from .reference import bucket_sort_reference

__all__ = ["bucket_sort", "bucket_sort_reference", "check_bucket_sort_inputs"]


def _bucket_sort_impl(buckets: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path (``torch.sort(stable=True)``) as a registered operator; integer outputs, not
    differentiable."""
    return bucket_sort_reference(buckets, num_bins)


_bucket_sort_op = torch.library.custom_op("reformer_kernels::bucket_sort", _bucket_sort_impl, mutates_args=())


@_bucket_sort_op.register_fake
def _(buckets, num_bins):
    sorted_idx = buckets.new_empty(buckets.shape, dtype=torch.int64)
    return sorted_idx, torch.empty_like(sorted_idx)


def check_bucket_sort_inputs(buckets, num_bins) -> None:
    """The op's validation, the same for every backend: ``buckets`` an int32/int64 ``[B, H, N]`` tensor
    (``TypeError`` / ``ValueError``), ``num_bins`` an int >= 1, and ``0 <= buckets < num_bins``
    (``validation.check_index_range``: a ``ValueError`` on CPU, an asynchronous device assert on CUDA)."""
    check_tensor(buckets, "buckets", dim=3, shape_doc="[batch, heads, rounds*length]")
    check_index_dtype(buckets, "buckets")
    num_bins = check_int(num_bins, "num_bins", minimum=1)
    check_index_range(buckets, num_bins, f"buckets (num_bins = {num_bins})")


def _triton_unsupported(buckets, num_bins) -> str | None:
    from .triton import unsupported_reason

    return unsupported_reason(buckets, num_bins)


def bucket_sort(buckets: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of ``[B, H, N]`` int32/int64 bucket ids in ``[0, num_bins)``; returns int64 (sorted, undo)."""
    check_bucket_sort_inputs(buckets, num_bins)
    num_bins = int(num_bins)
    if use_triton(buckets, unsupported=lambda: _triton_unsupported(buckets, num_bins)):
        from .triton import bucket_sort_triton

        return bucket_sort_triton(buckets, num_bins, check=False)
    return call(torch.ops.reformer_kernels.bucket_sort, _bucket_sort_impl, buckets, num_bins)
