"""One functional op per hot path; each dispatches between its PyTorch reference and Triton kernel."""

from .axial_pos import axial_position_embedding
from .bucket_sort import bucket_sort
from .chunked_attention import chunked_attention
from .lsh_hash import lsh_hash

__all__ = ["axial_position_embedding", "bucket_sort", "chunked_attention", "lsh_hash"]
