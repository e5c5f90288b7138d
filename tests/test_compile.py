"""Ahead-of-time compile test: every registered kernel builds for real GPUs, without a GPU.

For every ``KernelSpec`` of ``kernel_registry.all_kernel_specs()`` and for sm_80 and sm_90a, the
Triton compiler must produce a cubin with no local-memory spills whose shared memory fits the
architecture, and specs with ``uses_mma=True`` must contain tensor-core MMA instructions in the
SASS (HMMA on sm_80; HGMMA or HMMA on sm_90a). The suite sets ``TRITON_INTERPRET=1`` on CPU
machines, which turns ``triton.jit`` kernels into interpreter functions at import, so the
compilation runs in one subprocess without it (two compile workers, an empty Triton cache each
run: nothing cached can hide a failure). See ``python -m reformer_kernels.aot`` for the same table.
"""

from __future__ import annotations

import importlib

import pytest

from reformer_kernels import aot, kernel_registry
from reformer_kernels.kernel_registry import KernelSpec

ARCHS = tuple(aot.ARCHS)


def _spec_names() -> list[str]:
    # at collection: an empty registry or a missing module fails here too (and in the test below)
    try:
        return [spec.name for spec in kernel_registry.all_kernel_specs()]
    except Exception:  # noqa: BLE001 - reported by test_registry_is_complete
        return []


SPEC_NAMES = _spec_names()


def test_registry_is_complete():
    assert kernel_registry._OP_MODULES, "kernel_registry._OP_MODULES is empty"
    for module_name in kernel_registry._OP_MODULES:
        module = importlib.import_module(module_name)  # a listed module that is missing fails here
        specs = module.kernel_specs()
        assert specs, f"{module_name}.kernel_specs() returned no kernels"
        assert all(isinstance(spec, KernelSpec) for spec in specs)
    names = [spec.name for spec in kernel_registry.all_kernel_specs()]
    assert names, "the kernel registry is empty"
    assert len(names) == len(set(names)), f"duplicate spec names: {sorted(n for n in names if names.count(n) > 1)}"
    assert names == SPEC_NAMES


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], aot.CompileResult]:
    results = aot.compile_in_subprocess(ARCHS, jobs=2, timeout=900)
    return {(r.name, r.arch): r for r in results}


def test_every_spec_and_arch_compiled(compiled):
    assert SPEC_NAMES, "the kernel registry is empty"
    assert set(compiled) == {(name, arch) for name in SPEC_NAMES for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_kernel_compiles(compiled, name, arch):
    result = compiled[(name, arch)]
    assert result.ok, f"{name} failed to compile for {arch}:\n{result.error}"
    assert result.cubin_bytes > 0
    assert not result.spills, (
        f"{name} spills on {arch}: {result.registers} registers, {result.stack_bytes} B stack, "
        f"{result.local_bytes} B local, {result.local_stores} STL / {result.local_loads} LDL"
    )
    assert result.shared_fits, (
        f"{name} needs {result.shared_bytes} B shared memory on {arch} (max {aot.MAX_SHARED_BYTES[arch]})"
    )
    if result.uses_mma:
        assert result.has_mma, f"{name} uses no tensor-core MMA on {arch}; SASS MMA opcodes: {result.mma_opcodes}"


# --- the checks themselves must be able to fail -------------------------------------------------

SASS = """
        /*0100*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
        /*0110*/                   STL [R1+0x464], R4 ;
        /*0120*/              @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0130*/                   HGMMA.64x32x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0140*/                   LDL.LU R40, [R1+0x4] ;
"""


def test_sass_parsing():
    opcodes = [m.group(1) for m in aot._SASS_OPCODE_RE.finditer(SASS)]
    assert opcodes == ["HFMA2", "STL", "HMMA", "HGMMA", "LDL"]
    assert sorted({op for op in opcodes if op.endswith("MMA")}) == ["HGMMA", "HMMA"]


def test_result_flags():
    base = dict(
        name="k",
        arch="sm_80",
        ok=True,
        uses_mma=True,
        registers=64,
        stack_bytes=0,
        local_bytes=0,
        local_stores=0,
        local_loads=0,
        shared_bytes=1024,
        cubin_bytes=10,
        mma_opcodes=["HMMA"],
    )
    assert aot.CompileResult(**base).passes
    assert not aot.CompileResult(**{**base, "stack_bytes": 16}).passes
    assert not aot.CompileResult(**{**base, "local_stores": 1}).passes
    assert not aot.CompileResult(**{**base, "mma_opcodes": []}).passes
    assert not aot.CompileResult(**{**base, "arch": "sm_90a", "mma_opcodes": ["IMMA"], "shared_bytes": 300_000}).passes
    assert aot.CompileResult(**{**base, "uses_mma": False, "mma_opcodes": []}).passes


def test_interpreted_kernel_is_refused():
    """Under TRITON_INTERPRET=1 the kernels are interpreter functions: compile_spec must say so."""
    from reformer_kernels.backend import triton_interpreting

    if not triton_interpreting():
        pytest.skip("kernels are real JITFunctions in this process")
    spec = kernel_registry.all_kernel_specs()[0]
    result = aot.compile_spec(spec, "sm_80")
    assert not result.ok and "TRITON_INTERPRET" in result.error
