"""How the functional ops call their registered operators (``torch.library``).

Each op's implementations are registered operators (``reformer_kernels::<name>``), so that ``torch.compile``
traces each call as one node whose fake implementation gives the output shapes, and autograd runs the
registered backward. In eager inference nothing needs the dispatcher: ``call`` then runs the operator's
implementation function directly, which saves the dispatcher round trip (~20-30 us a call on the CI CPU, a few
percent of a one-token decoding step, which makes about ten op calls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def call(op, implementation: Callable, *args):
    """``op(*args)`` while ``torch.compile`` traces or when an input needs a gradient (autograd runs the
    registered backward), else ``implementation(*args)``: the same function the operator runs."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in _flat(args))
    ):
        return op(*args)
    return implementation(*args)


def _flat(args):
    for arg in args:
        if isinstance(arg, (list, tuple)):
            yield from arg
        else:
            yield arg
