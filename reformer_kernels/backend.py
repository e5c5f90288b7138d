"""Backend switch: which implementation of each op runs.

- ``torch``:  the pure-PyTorch reference path (runs anywhere, the CPU path).
- ``triton``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``auto``:   Triton for CUDA tensors when Triton is importable, PyTorch otherwise.

The process-wide default comes from the environment variable ``REFORMER_BACKEND`` (read at
import); ``set_backend(name)`` changes it and ``with backend(name):`` changes it for a block.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "torch", "triton")
_ENV_VAR = "REFORMER_BACKEND"


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, one of {BACKENDS}; got {type(name).__name__}")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}; got {name!r}")
    return name


_current = _check_name(os.environ.get(_ENV_VAR, "auto"), f"environment variable {_ENV_VAR}")


def get_backend() -> str:
    """The backend name currently selected (``auto``, ``torch`` or ``triton``)."""
    return _current


def set_backend(name: str) -> None:
    """Select the backend for all ops in this process."""
    global _current
    _current = _check_name(name, "backend name")


@contextlib.contextmanager
def backend(name: str):
    """Context manager selecting a backend for the ops called inside the block."""
    global _current
    previous = _current
    _current = _check_name(name, "backend name")
    try:
        yield
    finally:
        _current = previous


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it does not say whether a GPU exists)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor | None, supported: Callable[[], bool] | None = None) -> bool:
    """Decide, for one op call on ``tensors``, whether the Triton implementation runs.

    ``auto`` picks Triton only for CUDA tensors, and only when ``supported()`` (the kernel's own
    check of dtype and sizes) says the kernel accepts the call; otherwise the PyTorch path runs.
    ``triton`` forces the kernel, which needs CUDA tensors or the Triton interpreter
    (``TRITON_INTERPRET=1``) for CPU tensors; anything else is an error raised here, before a
    kernel launch, and an unsupported call gets the kernel wrapper's own error.
    """
    name = _current
    if name == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if name == "auto":
        return on_cuda and triton_available() and (supported is None or supported())
    if not triton_available():
        raise RuntimeError("backend 'triton' was selected but Triton is not installed")
    if not on_cuda and not triton_interpreting():
        raise ValueError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU "
            "tensors in the Triton interpreter"
        )
    return True
