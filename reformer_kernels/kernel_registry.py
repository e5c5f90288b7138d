"""The single list of Triton kernels and their default launch configurations.

The ahead-of-time compile test (``tests/test_compile.py``) and the benchmarks both read it: every
kernel that ships is compiled here for sm_80 and sm_90a, checked for spills and, for attention
kernels, for tensor-core MMA instructions.

Each op's ``triton.py`` defines ``kernel_specs() -> list[KernelSpec]``; add its module to
``_OP_MODULES`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

_OP_MODULES: list[str] = [
    "reformer_kernels.ops.lsh_hash.triton",
    "reformer_kernels.ops.bucket_sort.triton",
    "reformer_kernels.ops.chunked_attention.triton",
    "reformer_kernels.ops.axial_pos.triton",
    "reformer_kernels.ops.decode_attention.triton",
]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one configuration, as the GPU compiler must build it.

    ``signature`` maps every non-constexpr argument name to its Triton type string
    (``"*fp16"``, ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``); ``constexprs`` gives every
    ``tl.constexpr`` argument its default value, and may also pin an int argument the JIT would
    specialise (it compiles an int equal to 1, e.g. a unit stride, as a constant).

    Like the JIT for tensors from PyTorch's allocator, the AOT compile assumes every pointer is
    16-byte aligned; ``divisible_by_16`` names the int arguments that are multiples of 16 in the
    typical launch (the JIT specialises on that too, e.g. row strides of head_dim 64).
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    uses_mma: bool = False
    divisible_by_16: tuple[str, ...] = ()


def all_kernel_specs() -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for module_name in _OP_MODULES:
        specs.extend(importlib.import_module(module_name).kernel_specs())
    return specs
