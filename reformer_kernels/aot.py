"""Ahead-of-time compilation of every registered kernel for real GPU targets, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` runs
the whole Triton → PTX → ptxas pipeline on the CPU. For each ``KernelSpec`` of
``kernel_registry.all_kernel_specs()`` and each target (sm_80, sm_90a) this module builds the
cubin and reads from it, with the tools shipped inside the triton wheel
(``triton/backends/nvidia/bin``):

- registers, stack, local memory (``cuobjdump -res-usage``) and local loads/stores (``STL``/``LDL``
  in the SASS): any of them non-zero means the kernel spills (the kernels declare no local arrays;
  ptxas puts spills in the stack frame);
- shared memory (the compiled kernel's ``metadata.shared``: Triton allocates it dynamically, so
  ``cuobjdump`` shows 0);
- tensor-core MMA instructions in the SASS (``cuobjdump -sass``: ``HMMA`` on sm_80, ``HGMMA`` or
  ``HMMA`` on sm_90a).

``triton.jit`` returns an interpreter function when ``TRITON_INTERPRET=1`` is set at decoration
time (the test suite sets it without a GPU), so compilation must run in a process where it is
unset: ``compile_in_subprocess`` (used by ``tests/test_compile.py``) and the CLI, which re-runs
itself without it, do that, each with a fresh, temporary Triton cache so that no earlier result
can hide a failure.

CLI::

    python -m reformer_kernels.aot [--arch sm_80 sm_90a] [--jobs 2] [--filter lsh_hash] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

ARCHS = {"sm_80": 80, "sm_90a": 90}
# largest dynamic shared memory one CTA may use (A100: 163 KB, H100: 227 KB)
MAX_SHARED_BYTES = {"sm_80": 166912, "sm_90a": 232448}
# tensor-core matrix instructions a target may use for tl.dot
MMA_OPCODES = {"sm_80": ("HMMA", "IMMA"), "sm_90a": ("HGMMA", "HMMA", "IGMMA", "IMMA")}
# one SASS instruction line: "/*0a40*/  @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;"
_SASS_OPCODE_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
_RES_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclass
class CompileResult:
    name: str
    arch: str
    ok: bool
    uses_mma: bool
    error: str = ""
    registers: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    local_stores: int = -1
    local_loads: int = -1
    shared_bytes: int = -1
    cubin_bytes: int = 0
    num_warps: int = 0
    num_stages: int = 0
    mma_opcodes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return self.local_bytes != 0 or self.stack_bytes != 0 or self.local_stores != 0 or self.local_loads != 0

    @property
    def shared_fits(self) -> bool:
        return 0 <= self.shared_bytes <= MAX_SHARED_BYTES[self.arch]

    @property
    def passes(self) -> bool:
        """Compiled, no spills, shared memory within the limit, MMA where the spec needs it."""
        return self.ok and not self.spills and self.shared_fits and (self.has_mma or not self.uses_mma)

    @property
    def has_mma(self) -> bool:
        return any(op in MMA_OPCODES[self.arch] for op in self.mma_opcodes)


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found in the triton wheel at {path}")
    return path


def _cubin_report(cubin: bytes) -> tuple[dict[str, int], list[str]]:
    """(resource usage, sorted MMA opcodes) of one cubin, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run(
            [_nvidia_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_nvidia_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    usage: dict[str, int] = {}
    for line in res.splitlines():
        if "REG:" in line:
            usage = {key: int(value) for key, value in _RES_RE.findall(line)}
    if not usage:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{res}")
    opcodes = [m.group(1) for m in _SASS_OPCODE_RE.finditer(sass)]
    if not opcodes:
        raise RuntimeError("cuobjdump -sass printed no instructions")
    # local-memory traffic: register spills (the kernels declare no local arrays)
    usage["STL"] = sum(op == "STL" for op in opcodes)
    usage["LDL"] = sum(op == "LDL" for op in opcodes)
    # the base opcode (before the first '.') ending in MMA: HMMA, HGMMA, IMMA, ... (not HFMA2.MMA)
    return usage, sorted({op for op in opcodes if op.endswith("MMA")})


def _attrs(spec) -> dict:
    """Divisibility hints as the JIT derives them: aligned pointers, ints named by the spec."""
    arg_names = spec.kernel.arg_names
    hinted = [name for name, ty in spec.signature.items() if ty.startswith("*")] + list(spec.divisible_by_16)
    for name in hinted:
        if name not in spec.signature:
            raise ValueError(f"{spec.name}: divisible_by_16 names {name!r}, which is not in the signature")
    return {(arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}


def compile_spec(spec, arch: str) -> CompileResult:
    """Compile one ``KernelSpec`` for ``arch`` (``"sm_80"`` or ``"sm_90a"``) in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    started = time.perf_counter()
    result = CompileResult(
        name=spec.name,
        arch=arch,
        ok=False,
        uses_mma=spec.uses_mma,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
    )
    if not isinstance(spec.kernel, JITFunction):
        result.error = (
            f"{spec.name}: kernel is a {type(spec.kernel).__name__}, not a JITFunction "
            "(was the module imported with TRITON_INTERPRET=1?)"
        )
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            source = ASTSource(
                fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=_attrs(spec)
            )
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", ARCHS[arch], 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        cubin = compiled.asm.get("cubin")
        if not cubin:
            result.error = "no cubin produced"
            return result
        usage, opcodes = _cubin_report(cubin)
    except Exception as exc:  # noqa: BLE001 - report any compiler failure per kernel
        result.error = f"{type(exc).__name__}: {exc}"[:4000]
        return result
    result.ok = True
    result.cubin_bytes = len(cubin)
    result.registers = usage.get("REG", -1)
    result.stack_bytes = usage.get("STACK", -1)
    result.local_bytes = usage.get("LOCAL", -1)
    result.local_stores = usage["STL"]
    result.local_loads = usage["LDL"]
    result.shared_bytes = int(compiled.metadata.shared)
    result.mma_opcodes = opcodes
    result.seconds = time.perf_counter() - started
    return result


def _compile_indexed(job: tuple[int, str, str]) -> dict:
    index, name, arch = job
    from .kernel_registry import all_kernel_specs

    spec = all_kernel_specs()[index]
    if spec.name != name:
        raise RuntimeError(f"registry changed while compiling: expected {name}, got {spec.name}")
    return asdict(compile_spec(spec, arch))


def compile_all(archs=tuple(ARCHS), jobs: int = 2, name_filter: str = "") -> list[CompileResult]:
    """Compile every registered spec (whose name contains ``name_filter``) for every arch here.

    Must run without ``TRITON_INTERPRET``; raises ``RuntimeError`` otherwise.
    """
    from .backend import triton_interpreting
    from .kernel_registry import all_kernel_specs

    if triton_interpreting():
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset; use compile_in_subprocess()")
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}; got {arch!r}")
    specs = all_kernel_specs()
    jobs_list = [(i, s.name, a) for i, s in enumerate(specs) if name_filter in s.name for a in archs]
    if jobs <= 1 or len(jobs_list) <= 1:
        rows = [_compile_indexed(job) for job in jobs_list]
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_indexed, jobs_list))
    return [CompileResult(**row) for row in rows]


def compile_in_subprocess(
    archs=tuple(ARCHS), jobs: int = 2, name_filter: str = "", timeout: float = 600
) -> list[CompileResult]:
    """Run ``compile_all`` in a fresh Python without ``TRITON_INTERPRET`` and an empty Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache_dir = tempfile.mkdtemp(prefix="reformer-aot-cache-")
    env["TRITON_CACHE_DIR"] = cache_dir
    env["TRITON_ALWAYS_COMPILE"] = "1"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "reformer_kernels.aot", "--json", "--jobs", str(jobs), "--arch", *archs]
    if name_filter:
        cmd += ["--filter", name_filter]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo_root, timeout=timeout)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    payload = proc.stdout[proc.stdout.index("[") :] if "[" in proc.stdout else proc.stdout
    return [CompileResult(**row) for row in json.loads(payload)]


def format_table(results: list[CompileResult]) -> str:
    """One line per (kernel, arch): warps, registers, spill (stack bytes / local stores), shared memory, MMA."""
    header = f"{'kernel':52s} {'arch':7s} {'warps':>5s} {'regs':>4s} {'spill':>11s} {'smem':>7s}  {'mma':12s} status"
    lines = [header, "-" * len(header)]
    for r in results:
        if not r.ok:
            lines.append(f"{r.name:52s} {r.arch:7s} FAILED: {r.error.splitlines()[0] if r.error else ''}")
            continue
        spill = f"{r.stack_bytes}B/{r.local_stores}st" if r.spills else "no"
        mma = ",".join(r.mma_opcodes) if r.mma_opcodes else "-"
        status = "ok" if r.passes else "FAIL"
        lines.append(
            f"{r.name:52s} {r.arch:7s} {r.num_warps:5d} {r.registers:4d} {spill:>11s} {r.shared_bytes:7d}  {mma:12s} "
            f"{status}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reformer_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    parser.add_argument("--filter", default="", help="only kernels whose spec name contains this")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    from .backend import triton_interpreting

    if triton_interpreting():
        results = compile_in_subprocess(tuple(args.arch), args.jobs, args.filter)
    else:
        results = compile_all(tuple(args.arch), args.jobs, args.filter)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
    return 0 if results and all(r.passes for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
