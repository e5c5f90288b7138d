"""Scoped scratch tensors: large temporaries reused from call to call inside one model pass.

On CPU a fresh tensor of >= 32 MB is a fresh ``mmap`` (glibc), page-faulted in on first touch: at
L=16384 with 4 hash rounds the attention op's visiting-order output is 32 MB, and its 8,192 page faults
cost more than the arithmetic that fills it. A caller that knows none of the temporaries outlives the
next call (the model's no-grad layer pass, see ``reformer.modeling_reformer._LayerStack``) opens a
``scratch_scope()``; inside it ``scratch_empty`` returns the same buffer for the same slot, shape and
dtype every time. Outside a scope it is ``torch.empty``. Scopes are per thread.
"""

from __future__ import annotations

import contextlib
import threading

import torch


class _Pool(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] | None = None


_pool = _Pool()


@contextlib.contextmanager
def scratch_scope():
    """Reuse scratch buffers until the scope closes (then they are released)."""
    previous, _pool.buffers = _pool.buffers, {}
    try:
        yield
    finally:
        _pool.buffers = previous


def scratch_active() -> bool:
    return _pool.buffers is not None


def scratch_empty(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor; inside a ``scratch_scope`` the same one for the same slot/shape/dtype/device.

    Callers must not use the result after their next request of the same slot.
    """
    if _pool.buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, tuple(shape), dtype, torch.device(device))
    buffer = _pool.buffers.get(key)
    if buffer is None:
        buffer = _pool.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer
