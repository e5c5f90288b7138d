"""Axial position embedding op: ``axial_position_embedding(position_ids, weights)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backend import use_triton
from .reference import axial_position_embedding_reference, axial_strides

__all__ = ["axial_position_embedding", "axial_position_embedding_reference", "axial_strides"]


def axial_position_embedding(position_ids: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, L, sum(d_a)]`` embeddings of ``position_ids`` from factor tables ``[n_a, d_a]``."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        raise ValueError(f"position_ids must be a [batch, length] tensor; got {getattr(position_ids, 'shape', type(position_ids))}")
    if position_ids.is_floating_point():
        raise TypeError(f"position_ids must be an integer tensor; got {position_ids.dtype}")
    if len(weights) == 0 or any(w.dim() != 2 for w in weights):
        raise ValueError("weights must be a non-empty list of 2-D [axis_size, axis_dim] tables")
    if use_triton(position_ids, *weights):
        from .triton import axial_position_embedding_triton

        return axial_position_embedding_triton(position_ids, list(weights))
    return axial_position_embedding_reference(position_ids, weights)
