"""Backend switch: which implementation of each op runs.

- ``torch``:  the pure-PyTorch reference path (runs anywhere, the CPU path).
- ``triton``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``auto``:   Triton for CUDA tensors when Triton is importable and the kernel supports the call,
  PyTorch otherwise.

The choice is context-local (a ``contextvars.ContextVar``): ``with backend(name):`` selects a backend
for the code inside the block, in this thread (or asyncio task) only, so two threads can run
different backends at the same time. Code that did not choose one runs the process default:
``set_backend(name)`` sets it, and it starts from the environment variable ``REFORMER_BACKEND``
(read at import; unset or empty means ``auto``). A new thread starts without a choice of its own
(Python gives it a fresh context), i.e. on the process default.

Under ``torch.compile`` the choice is made while tracing, so the compiled code must be guarded on it:
TorchDynamo cannot read a ``ContextVar``, so each ``with backend(...)`` block also records its choice in a
per-thread mirror that Dynamo reads (and guards on, as it guards on the process default): compiled code
traced on one backend is not reused on another, it is recompiled. The mirror follows the blocks entered
in the thread, so two asyncio tasks of one thread that select different backends around compiled code
should not interleave inside their blocks (eager code always reads the ``ContextVar`` itself).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
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


def _default_from_environment() -> str:
    value = os.environ.get(_ENV_VAR, "")
    # unset and empty (e.g. ``REFORMER_BACKEND= python ...``) both mean "no choice": auto
    if value.strip() == "":
        return "auto"
    return _check_name(value, f"environment variable {_ENV_VAR}")


# the process default, for contexts that did not choose a backend
_default = _default_from_environment()
# the choice of the current context (a ``with backend(...)`` block), None where none was made
_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("reformer_kernels_backend", default=None)


class _ThreadChoice(threading.local):
    """The innermost ``backend(...)`` block's choice in this thread (None: none), for code traced by Dynamo."""

    name: str | None = None


_thread_choice = _ThreadChoice()


def get_backend() -> str:
    """The backend the ops called here run (``auto``, ``torch`` or ``triton``): the enclosing
    ``with backend(...)`` block's choice, else the process default."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ContextVar.get; it reads (and guards on) the per-thread mirror instead
        choice = _thread_choice.name
    else:
        choice = _choice.get()
    return _default if choice is None else choice


def set_backend(name: str) -> None:
    """Set the process default: the backend of every context that did not choose one with ``backend``."""
    global _default
    _default = _check_name(name, "backend name")


@contextlib.contextmanager
def backend(name: str):
    """Context manager selecting a backend for the ops called inside the block (this context only)."""
    name = _check_name(name, "backend name")
    token = _choice.set(name)
    previous, _thread_choice.name = _thread_choice.name, name
    try:
        yield
    finally:
        _choice.reset(token)
        _thread_choice.name = previous


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


def use_triton(*tensors: torch.Tensor | None, unsupported: Callable[[], str | None] | None = None) -> bool:
    """Decide, for one op call on ``tensors``, whether the Triton implementation runs.

    ``unsupported()`` is the kernel's own check of dtype and sizes: ``None`` when the kernel takes the
    call, else the reason it does not. ``auto`` picks Triton only for CUDA tensors the kernel
    supports; otherwise the PyTorch path runs. ``triton`` forces the kernel, which needs CUDA
    tensors or the Triton interpreter (``TRITON_INTERPRET=1``) for CPU tensors; anything else, and a
    call the kernel does not support, is a ``ValueError`` raised here (before any kernel launch)
    that says why.
    """
    name = get_backend()
    if name == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if name == "auto":
        return on_cuda and triton_available() and (unsupported is None or unsupported() is None)
    if not triton_available():
        raise RuntimeError("backend 'triton' was selected but Triton is not installed")
    if not on_cuda and not triton_interpreting():
        raise ValueError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU "
            "tensors in the Triton interpreter"
        )
    if not on_cuda and torch.compiler.is_compiling():
        # the interpreter's kernels are Python functions that run on real tensors: the compiler cannot trace them
        raise ValueError(
            "backend 'triton' under torch.compile needs CUDA tensors (the Triton interpreter's kernels cannot be "
            "traced); use backend 'torch' or 'auto' for CPU tensors"
        )
    reason = None if unsupported is None else unsupported()
    if reason is not None:
        raise ValueError(f"backend 'triton': {reason}")
    return True
