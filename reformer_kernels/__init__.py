"""reformer-kernels: the Reformer's hot paths as PyTorch reference ops and Triton kernels."""

import os

# PyTorch's CPU allocator backs tensors of >= 2 MB with transparent huge pages when THP_MEM_ALLOC_ENABLE=1
# (read at the first CPU allocation, so it takes effect when this package is imported before tensors are
# created). Long-sequence activations are tens of MB, freshly mapped memory on most calls, and their 4 KB
# page faults cost more than the arithmetic: filling a new 32 MB tensor takes 7.1 ms with 4 KB pages
# (8,192 faults) and 1.5 ms with huge pages on the 2-core CI machine. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .backend import backend, get_backend, set_backend, triton_available  # noqa: E402
from .ops import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash  # noqa: E402
from .patch import patch_transformers, unpatch_transformers  # noqa: E402

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
