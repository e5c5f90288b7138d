"""Test-wide settings.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors. ``triton.jit``
decides at decoration time whether a kernel is interpreted, so ``TRITON_INTERPRET`` is set here,
before any kernel module is imported. On a CUDA machine run the suite with ``TRITON_INTERPRET=0``
to test the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA when present, else CPU (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    """Seed every test and make sure no test leaks a backend selection into the next."""
    import reformer_kernels

    torch.manual_seed(0)
    previous = reformer_kernels.get_backend()
    yield
    reformer_kernels.set_backend(previous)
