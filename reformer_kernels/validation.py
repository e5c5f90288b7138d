"""Input validation shared by the ops and the model.

Two kinds of checks live here:

- Argument checks that read only Python values, shapes, dtypes and devices (``check_tensor``,
  ``check_int``, ...): they raise ``TypeError`` for a wrong type and ``ValueError`` for a wrong
  value, naming the argument, before any work is done.
- Checks that read tensor *values* (``check_index_range``, ``check_permutation``): on CPU tensors
  they compute the answer and raise a ``ValueError``; on other devices reading the answer on the
  host would synchronise with the device, so they enqueue an asynchronous device assert
  (``torch._assert_async``) instead, which fails the stream (a ``RuntimeError`` at the next
  synchronisation) when the condition is false.

Every value check goes through ``_host_checks_allowed`` (the one switch point): while
``torch.compile`` traces, a host read of a tensor value would break the graph, so the checks
become device asserts on every device there. Eager behaviour does not depend on it.

Accepted dtypes (all ops, all backends): ids and indices (``buckets``, ``sorted_idx``,
``position_ids``, ``input_ids``) are int32 or int64; masks are bool, integer or floating tensors
whose nonzero entries mean "keep" (what the model passes through from the user); float inputs are
any floating dtype on the PyTorch path (the Triton kernels take fp16, bf16 and fp32).
"""

from __future__ import annotations

import numbers

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
_INDEX_NAMES = "int32 or int64"


def _host_checks_allowed() -> bool:
    """Whether value checks may read tensor values on the host (CPU tensors, eager mode).

    The single switch point for compilation: under ``torch.compile`` every value check is a device
    assert instead (no host read, no graph break)."""
    return not torch.compiler.is_compiling()


def _bound(value, name: str) -> str:
    """``value`` for a device-assert message, or ``name`` while ``torch.compile`` traces: a size formatted into a
    string would specialize the compiled code to it (a recompilation per sequence length)."""
    return name if torch.compiler.is_compiling() else str(value)


def _device_assert(condition: torch.Tensor, message: str) -> None:
    """Fail the device stream if the 0-dim bool tensor ``condition`` is false (no host synchronisation)."""
    torch._assert_async(condition, message)


# ------------------------------------------------------------------------------------------------
# checks that read tensor values
# ------------------------------------------------------------------------------------------------


# at most this many values are read as a list by check_index_range (a decoding step's ids), more are reduced first
_FEW_VALUES = 64


def check_index_range(values: torch.Tensor, upper: int, name: str) -> None:
    """``0 <= values < upper`` for an integer tensor ``values``.

    CPU tensors: a ``ValueError`` naming ``name`` and the range of the values found. Other devices
    (and under ``torch.compile``): an asynchronous device assert with the same wording, no host sync.
    """
    if values.numel() == 0:
        return
    if values.device.type == "cpu" and _host_checks_allowed():
        if values.numel() <= _FEW_VALUES:
            # a decoding step's few ids: read at once (one call instead of a reduction and two reads)
            flat = values.reshape(-1).tolist()
            low, high = min(flat), max(flat)
        else:
            low, high = torch.aminmax(values)
            low, high = int(low), int(high)
        if low < 0 or high >= upper:
            raise ValueError(f"{name} must be in [0, {upper}); got values in [{low}, {high}]")
        return
    inside = values >= 0
    if values.is_floating_point() or upper <= torch.iinfo(values.dtype).max:
        # (an upper bound past the dtype's range holds for every value: comparing with it would overflow)
        inside &= values < upper
    _device_assert(inside.all(), f"{name} must be in [0, {_bound(upper, 'upper')})")


def check_values(ok: torch.Tensor, message: str, describe=None) -> None:
    """Every entry of the bool tensor ``ok`` is true.

    CPU tensors in eager mode: a ``ValueError`` with ``message`` (and ``describe()``, which may read the
    values, after a semicolon); other devices and under ``torch.compile``: an asynchronous device assert with
    ``message`` (no host sync, no graph break).
    """
    if ok.numel() == 0:
        return
    if ok.device.type == "cpu" and _host_checks_allowed():
        if not bool(ok.all()):
            raise ValueError(message if describe is None else f"{message}; {describe()}")
        return
    _device_assert(ok.all(), message)


def check_permutation(indices: torch.Tensor, name: str, what: str = "") -> None:
    """Every row of ``indices`` (its last dimension, length ``N``) is a permutation of ``[0, N)``.

    One vectorised pass: the range check, then a scatter of ``True`` at every index, which covers
    all ``N`` slots of a row exactly when no index repeats. CPU: ``ValueError`` naming the first bad
    row; other devices: asynchronous device asserts (no host sync). ``what`` is appended to the
    message (where the indices come from).
    """
    n = indices.shape[-1]
    if indices.numel() == 0:
        return
    check_index_range(indices, n, name)
    rows = indices.reshape(-1, n)
    # out-of-range entries (on the device path, where the range check above did not stop the call)
    # are clamped so that the scatter never writes outside the row
    slots = rows.to(torch.int64).clamp_(0, n - 1)
    seen = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, slots, True)
    message = f"{name} must be a permutation of [0, {_bound(n, 'N')}) in every row (each value exactly once){what}"
    if indices.device.type == "cpu" and _host_checks_allowed():
        complete = seen.all(1)
        if not bool(complete.all()):
            bad = int((~complete).nonzero()[0, 0])
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), indices.shape[:-1]))
            raise ValueError(f"{message}; row {where} repeats a value and misses another")
        return
    _device_assert(seen.all(), message)


# ------------------------------------------------------------------------------------------------
# argument checks (no tensor values read)
# ------------------------------------------------------------------------------------------------


def check_tensor(value, name: str, *, dim: int | None = None, shape_doc: str = "") -> torch.Tensor:
    """``value`` is a tensor (``TypeError``) with ``dim`` dimensions (``ValueError``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor{' ' + shape_doc if shape_doc else ''}; got {type(value).__name__}"
        )
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be a {shape_doc or f'{dim}-D'} tensor; got shape {tuple(value.shape)}")
    return value


def check_float_tensor(value: torch.Tensor, name: str) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {value.dtype}")


def check_index_dtype(value: torch.Tensor, name: str) -> None:
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an {_INDEX_NAMES} tensor; got {value.dtype}")


def check_mask(mask, name: str, shape: tuple[int, ...], device: torch.device, other: str = "query") -> None:
    """An optional keep-mask: ``None``, or a bool / integer / floating tensor of ``shape`` on ``device``
    (the device of ``other``); nonzero entries are kept."""
    if mask is None:
        return
    check_tensor(mask, name)
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating-point tensor; got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [batch, length] = {tuple(shape)}; got {tuple(mask.shape)}")
    check_same_device(mask, name, device, other)


def check_same_device(value: torch.Tensor, name: str, device: torch.device, other: str = "query") -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {other} is on {device}")


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    """A Python (or numpy) integer, not a bool (``TypeError``), ``>= minimum`` (``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """A Python bool (``TypeError`` otherwise: a string such as ``'no'`` would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return value


def check_probability(value, name: str, *, allow_one: bool = False) -> float:
    """A real number (``TypeError``) in ``[0, 1)``, or ``[0, 1]`` with ``allow_one`` (``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}; got {value}")
    return value
