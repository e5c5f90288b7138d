"""reformer-kernels: the Reformer's hot paths as PyTorch reference ops and Triton kernels."""

from .backend import backend, get_backend, set_backend, triton_available
from .ops import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash
from .patch import patch_transformers, unpatch_transformers

__version__ = "0.1.0"

__all__ = [
    "axial_position_embedding",
    "backend",
    "bucket_sort",
    "chunked_attention",
    "get_backend",
    "lsh_hash",
    "patch_transformers",
    "set_backend",
    "triton_available",
    "unpatch_transformers",
]
