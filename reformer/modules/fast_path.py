"""The one predicate that lets a fast path stand in for modules, and the CPU row-block helpers.

A fused or blocked path reads the weights of the modules it stands in for instead of calling them. That is only
invisible when each module is exactly the torch class the path assumes: no forward hooks (global or on the
module), no parametrizations, no wrapper or replacement (a PEFT LoRA layer, a quantized linear, accelerate's
hooks that replace ``module.forward``). ``plain_modules`` checks exactly that; everywhere else the modules are
called, so hooks fire and wrappers compute.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

from reformer_kernels.cpu_linear import needs_grad, onednn_applicable, row_blocks

# Rows per block of the blocked CPU paths (LayerNorm + projections, output projection, feed-forward and its
# reversible backward, final LayerNorm + head): a block's [rows, FF] intermediate stays in cache instead of a
# [L, FF] tensor that is page-faulted in on every call (block sizes measured in benchmarks/README.md).
CPU_BLOCK_ROWS = 2048

# the module classes the fast paths know how to stand in for
_PLAIN_TYPES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.ReLU)


def _global_hooks_present() -> bool:
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def unhooked(*modules: nn.Module) -> bool:
    """True when no module has hooks or an instance-level ``forward``: a caller may change how it computes inside
    them (e.g. fuse a container's output with the next module) without anyone observing the difference."""
    if _global_hooks_present():
        return False
    return not any(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
        for module in modules
    )


def plain_modules(*modules: nn.Module) -> bool:
    """True when every module is exactly ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` / ``nn.ReLU`` (not a
    subclass), with no
    hooks, no parametrizations and its class's own ``forward``: a fast path reading their weights then computes
    exactly what calling them would."""
    return unhooked(*modules) and all(
        type(module) in _PLAIN_TYPES and not parametrize.is_parametrized(module) for module in modules
    )


def linear(module: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``module(x)`` (then ReLU): through oneDNN on large fp32 CPU inputs when ``module`` is a plain ``nn.Linear``
    (``reformer_kernels.cpu_linear``; same numbers up to fp32 summation order), else by calling the module."""
    if plain_modules(module):
        from reformer_kernels.cpu_linear import linear as cpu_linear

        return cpu_linear(x, module.weight, module.bias, relu)
    out = module(x)
    return torch.relu(out) if relu else out


def blocked_cpu(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether a blocked no-grad CPU path may run over ``x`` in place of ``modules``: plain modules, no gradient
    needed, large fp32 contiguous CPU input (oneDNN)."""
    if not plain_modules(*modules):
        return False
    params = [p for m in modules for p in m.parameters(recurse=False)]
    weight = next(p for m in modules for p in m.parameters(recurse=False) if p.dim() == 2)
    return not needs_grad(x, *params) and onednn_applicable(x, weight) and all(p.dtype == x.dtype for p in params)


def dropout_keep_mask(shape: tuple[int, ...], p: float, training: bool, device: torch.device) -> torch.Tensor | None:
    """The keep mask that ``F.dropout(x, p, training)`` draws for a contiguous ``x`` of ``shape``, as a bool tensor
    (1 byte per element instead of F.dropout's fp32 noise), so that a blocked path can apply it row block by row
    block (``dropout_noise``) with F.dropout's exact numbers and RNG consumption.

    F.dropout on CPU draws ``empty_like(x).bernoulli_(1 - p)``: one draw over the elements in order, whose values
    do not depend on the tensor's dtype (bool and fp32 draws give the same mask and leave the generator in the same
    state; ``tests/model/test_train_memory.py`` checks it). None where F.dropout draws nothing (``p == 0``, not
    training, empty); all False for ``p == 1`` (F.dropout multiplies by zero without drawing)."""
    if not training or p == 0 or math.prod(shape) == 0:
        return None
    if p == 1:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


def dropout_noise(keep: torch.Tensor | None, p: float, dtype: torch.dtype) -> torch.Tensor | None:
    """F.dropout's noise ``keep / (1 - p)`` for a block of a ``dropout_keep_mask`` (None: no dropout), computed as
    F.dropout computes it: the dropout is ``x * noise`` and its backward ``grad * noise``, bit for bit."""
    if keep is None:
        return None
    noise = keep.to(dtype)
    return noise.div_(1.0 - p) if p < 1 else noise


__all__ = [
    "CPU_BLOCK_ROWS",
    "blocked_cpu",
    "dropout_keep_mask",
    "dropout_noise",
    "linear",
    "plain_modules",
    "row_blocks",
    "unhooked",
]
