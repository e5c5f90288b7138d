"""The one predicate that lets a fast path stand in for modules, and the CPU row-block helpers.

A fused or blocked path reads the weights of the modules it stands in for instead of calling them. That is only
invisible when each module is exactly the torch class the path assumes: no forward hooks (global or on the
module), no parametrizations, no wrapper or replacement (a PEFT LoRA layer, a quantized linear, accelerate's
hooks that replace ``module.forward``). ``plain_modules`` checks exactly that; everywhere else the modules are
called, so hooks fire and wrappers compute.

Under ``torch.compile`` the blocked paths do not run (``eager_fast_paths``: row blocks, streams updated in
place, scratch buffers): the compiler fuses and schedules the modules' operations itself. A plain linear
layer still runs through oneDNN there (``linear``: one operator in the graph), which is faster on CPU than
the MKL matrix product the compiler would call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from reformer_kernels.cpu_linear import (
    enough_rows,
    needs_grad,
    onednn_applicable,
    onednn_linear,
    onednn_linear_backward,
    row_blocks,
)

# Rows per block of the blocked CPU paths (LayerNorm + projections, output projection, feed-forward and its
# reversible backward, final LayerNorm + head): a block's [rows, FF] intermediate stays in cache instead of a
# [L, FF] tensor that is page-faulted in on every call (block sizes measured in benchmarks/README.md).
CPU_BLOCK_ROWS = 2048

# the module classes the fast paths know how to stand in for
_PLAIN_TYPES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.ReLU)


def eager_fast_paths() -> bool:
    """Whether the blocked CPU paths (row blocks, streams updated in place, scratch buffers) may run: not while
    ``torch.compile`` traces (a constant there, so compiled code takes the unblocked path)."""
    return not torch.compiler.is_compiling()


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


def _parametrized(module: nn.Module) -> bool:
    """``parametrize.is_parametrized(module)`` for a module of one of ``_PLAIN_TYPES`` (called once per module and
    decoding step, so without its ``getattr`` that raises inside ``nn.Module.__getattr__``): registering a
    parametrization stores a non-empty ``ModuleDict`` as the submodule ``parametrizations`` (it also swaps in a
    subclass, which the exact type check rejects anyway)."""
    parametrizations = module._modules.get("parametrizations")
    return isinstance(parametrizations, nn.ModuleDict) and len(parametrizations) > 0


def plain_modules(*modules: nn.Module) -> bool:
    """True when every module is exactly ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` / ``nn.ReLU`` (not a
    subclass), with no
    hooks, no parametrizations and its class's own ``forward``: a fast path reading their weights then computes
    exactly what calling them would."""
    return unhooked(*modules) and all(type(module) in _PLAIN_TYPES and not _parametrized(module) for module in modules)


def linear(module: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``module(x)`` (then ReLU): through oneDNN on large fp32 CPU inputs when ``module`` is a plain ``nn.Linear``
    (``reformer_kernels.cpu_linear``; same numbers up to fp32 summation order), else by calling the module.

    Under ``torch.compile`` the oneDNN product is the registered op ``reformer::onednn_linear`` (the compiler
    cannot lower ``mkldnn._linear_pointwise`` on unpacked weights, and would otherwise call MKL's ``mm``)."""
    if not enough_rows(x):
        # too few rows for oneDNN (e.g. a decoding step's one row through a hooked or wrapped module): the module's
        # own product, by calling it, with no predicate to evaluate
        out = module(x)
        return torch.relu(out) if relu else out
    if plain_modules(module):
        if not eager_fast_paths():
            if onednn_applicable(x, module.weight):
                return torch.ops.reformer.onednn_linear(x, module.weight, module.bias, relu)
            out = F.linear(x, module.weight, module.bias)
            return torch.relu(out) if relu else out
        from reformer_kernels.cpu_linear import linear as cpu_linear

        return cpu_linear(x, module.weight, module.bias, relu)
    out = module(x)
    return torch.relu(out) if relu else out


# ------------------------------------------------------------------------------------------------
# the oneDNN linear layer as registered operators (for torch.compile; the same computation as
# reformer_kernels.cpu_linear.linear and its autograd.Function)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("reformer::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``x @ weight^T + bias`` (then ReLU) through oneDNN (``cpu_linear.onednn_linear``)."""
    return onednn_linear(x, weight, bias, relu)


@_onednn_linear_op.register_fake
def _(x, weight, bias, relu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("reformer::onednn_linear_backward", mutates_args=())
def _onednn_linear_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of ``onednn_linear`` (``out``: its output, needed with ``relu``), through oneDNN
    as ``cpu_linear``'s autograd.Function computes them."""
    return onednn_linear_backward(grad_out, x, weight, out, relu)


@_onednn_linear_backward_op.register_fake
def _(grad_out, x, weight, out, relu):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        weight.new_empty(weight.shape[0]),
    )


def _onednn_linear_setup_context(ctx, inputs, output):
    x, weight, bias, relu = inputs
    ctx.relu, ctx.has_bias = relu, bias is not None
    ctx.save_for_backward(x, weight, output if relu else None)


def _onednn_linear_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.reformer.onednn_linear_backward(grad_out, x, weight, out, ctx.relu)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None


_onednn_linear_op.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup_context)


def blocked_cpu(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether a blocked no-grad CPU path may run over ``x`` in place of ``modules``: plain modules, no gradient
    needed, large fp32 contiguous CPU input (oneDNN), eager mode (``eager_fast_paths``)."""
    # the cheapest condition first: this runs for every layer of every decoding step, where it fails on the rows
    if not enough_rows(x) or not (eager_fast_paths() and plain_modules(*modules)):
        return False
    params = [p for m in modules for p in m.parameters(recurse=False)]
    weight = next(p for m in modules for p in m.parameters(recurse=False) if p.dim() == 2)
    return not needs_grad(x, *params) and onednn_applicable(x, weight) and all(p.dtype == x.dtype for p in params)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``, without the call where it returns ``x`` itself (eval, ``p == 0``): a decoding
    step makes a dozen of these calls."""
    return x if not training or p == 0 else F.dropout(x, p=p, training=training)


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
    "dropout",
    "dropout_keep_mask",
    "dropout_noise",
    "eager_fast_paths",
    "linear",
    "plain_modules",
    "row_blocks",
    "unhooked",
]
