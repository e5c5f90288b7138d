"""Benchmark-suite settings.

The suites run in the normal test run with ``--benchmark-disable`` (pyproject's addopts): each
benchmark body then runs once at tiny sizes and its correctness assertions still hold, so the
benchmarks cannot rot. For real numbers:

    REFORMER_BENCH_LEN=16384 python -m pytest benchmarks --benchmark-enable --benchmark-group-by=func

Sizes: ``REFORMER_BENCH_LEN`` (default 256), ``REFORMER_BENCH_PRESET`` (default ``small``: the
issue-#6 CPU model), ``REFORMER_BENCH_HASHES`` (default: the preset's). Implementations: this
package's PyTorch path (``torch``), its Triton kernels (``triton``, only where CUDA exists),
transformers' Reformer on the same weights/inputs, and dense ``F.scaled_dot_product_attention``.
"""

import os

import pytest
import torch

from reformer.bench.harness import env_int, model_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the Triton kernels are benchmarked only where they compile for a GPU
BACKENDS = ["torch", "triton"] if torch.cuda.is_available() else ["torch"]


@pytest.fixture
def bench_config():
    seq_len = env_int("REFORMER_BENCH_LEN", 256)
    preset = os.environ.get("REFORMER_BENCH_PRESET", "small")
    hashes = os.environ.get("REFORMER_BENCH_HASHES")
    return model_config(preset, seq_len, num_hashes=int(hashes) if hashes else None)


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    import reformer_kernels

    torch.manual_seed(0)
    previous = reformer_kernels.get_backend()
    yield
    reformer_kernels.set_backend(previous)
