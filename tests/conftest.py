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

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests (tests/ops/test_properties.py) skip without hypothesis
    settings = None
if settings is not None:
    # Property-test profiles, chosen with REFORMER_HYPOTHESIS_PROFILE (default "ci"). "ci": a bounded,
    # derandomized run (the same examples every time: a failure reproduces as is, and its blob is
    # printed), within the CI time budget (the Triton interpreter is slow). "thorough": ten times the
    # examples, randomized (run it locally or on a schedule; failures print a @reproduce_failure blob).
    # Tests scale their own example counts by max_examples / 10 (test_properties.examples).
    _slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci",
        max_examples=10,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=_slow,
    )
    settings.register_profile("thorough", max_examples=100, deadline=None, print_blob=True, suppress_health_check=_slow)
    settings.load_profile(os.environ.get("REFORMER_HYPOTHESIS_PROFILE", "ci"))

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
