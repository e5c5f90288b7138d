"""What CPU this is, and which vector ISA the CPU code paths actually use.

Benchmark tables name the CPU and its ISA level, because the fp32 GEMMs that dominate the model's
CPU time run different code per ISA (oneDNN: AVX2 / AVX-512 / AMX kernels; MKL: its own dispatch;
torch's vectorized ops: ``torch.backends.cpu.get_cpu_capability()``).

* ``cpu_info()``: vendor, model name, CPUID family/model, microarchitecture where known, cores, the
  hardware ISA level from ``/proc/cpuinfo`` flags, torch's capability, the ISA caps that environment
  variables put on torch / oneDNN / MKL, and the effective level (the lowest of all of them).
* ``isa_environment("avx2")``: the variables that make torch, oneDNN and MKL run their AVX2 code on a
  newer CPU (set before torch is imported, i.e. in a subprocess). A measurement taken that way is
  labelled ``isa_label``: "AVX2 code paths on an AVX-512 CPU", never a different CPU.
* ``probe_libraries(env)``: in a fresh Python, torch's capability and the ISA oneDNN reports it
  dispatches to (``ONEDNN_VERBOSE``), i.e. a check that a restriction took effect.

Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

# ordered from oldest to newest; "amx" CPUs also have AVX-512
ISA_LEVELS = ("sse", "avx", "avx2", "avx512", "amx")
ISA_NAMES = {"sse": "SSE", "avx": "AVX", "avx2": "AVX2", "avx512": "AVX-512", "amx": "AMX"}
# environment variables that cap the ISA of torch's kernels, oneDNN and MKL (read when each loads)
ISA_ENV_VARS = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

# AMD CPUID family -> ((first model, last model, name), ...). Cloud VMs often report only "AMD EPYC"
# as the model name; the family/model pair still identifies the core (AMD's processor programming
# reference manuals list the model ranges per family).
_AMD_CORES = {
    0x17: ((0x00, 0x2F, "Zen/Zen+"), (0x30, 0xFF, "Zen 2")),
    0x19: (
        (0x00, 0x0F, "Zen 3"),
        (0x10, 0x1F, "Zen 4"),
        (0x20, 0x5F, "Zen 3"),
        (0x60, 0x7F, "Zen 4"),
        (0xA0, 0xAF, "Zen 4"),
    ),
    0x1A: ((0x00, 0xFF, "Zen 5"),),
}


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of the first processor in ``path`` (empty if unreadable, e.g. not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as handle:
            for line in handle:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def isa_from_flags(flags: set[str] | frozenset[str]) -> str:
    """The highest ISA level of ``ISA_LEVELS`` that the CPU flags show."""
    if "amx_tile" in flags and "avx512f" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags:
        return "avx"
    return "sse"


def isa_from_name(value: str | None) -> str | None:
    """The level an ISA-capping variable's value allows (``None``: no cap), e.g. ``AVX512_CORE`` -> avx512."""
    if value is None or not value.strip():
        return None
    name = value.strip().upper()
    if name == "ALL":
        return None
    if name == "DEFAULT":  # ATEN_CPU_CAPABILITY=default: torch's non-vectorized kernels
        return "sse"
    if "AMX" in name:
        return "amx"
    if name.startswith(("AVX512", "AVX10")):
        return "avx512"
    if name.startswith("AVX2"):
        return "avx2"
    if name.startswith("AVX"):
        return "avx"
    if name.startswith("SSE"):
        return "sse"
    return None  # not an x86 level (e.g. torch's ZVECTOR, SVE256)


def _min_level(*levels: str | None) -> str:
    present = [level for level in levels if level is not None]
    return min(present, key=ISA_LEVELS.index)


def microarchitecture(vendor: str, family: int | None, model: int | None) -> str | None:
    """The core generation from the CPUID family/model where known (AMD Zen), else ``None``."""
    if vendor != "AuthenticAMD" or family is None or model is None:
        return None
    for first, last, name in _AMD_CORES.get(family, ()):
        if first <= model <= last:
            return name
    return None


def vendor_and_core(cpuinfo_path: str = "/proc/cpuinfo") -> tuple[str | None, str | None]:
    """``(vendor_id, core generation or None)`` of the first processor in ``cpuinfo_path``."""
    fields = read_cpuinfo(cpuinfo_path)
    vendor = fields.get("vendor_id")
    return vendor, microarchitecture(vendor or "", _int(fields.get("cpu family")), _int(fields.get("model")))


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def torch_capability() -> str | None:
    """``torch.backends.cpu.get_cpu_capability()`` of this process (e.g. ``AVX512``), or ``None``."""
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return None


def env_isa_caps(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ISA-capping variables set in ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in ISA_ENV_VARS if environ.get(name)}


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo", environ: dict[str, str] | None = None) -> dict[str, Any]:
    """This CPU and the ISA levels its code paths use (see the module docstring)."""
    import platform

    fields = read_cpuinfo(cpuinfo_path)
    flags = frozenset(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    family, model = _int(fields.get("cpu family")), _int(fields.get("model"))
    hardware = isa_from_flags(flags) if flags else None
    capability = torch_capability()
    caps = env_isa_caps(environ)
    capped = [isa_from_name(value) for value in caps.values()]
    # torch's highest x86 capability is AVX512 (it has no AMX level): only a lower one is a cap
    torch_level = isa_from_name(capability)
    capped.append(None if torch_level == "avx512" else torch_level)
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = os.cpu_count()
    info = dict(
        model_name=fields.get("model name") or platform.processor() or "unknown CPU",
        vendor=vendor or None,
        family=family,
        model=model,
        stepping=_int(fields.get("stepping")),
        microarchitecture=microarchitecture(vendor, family, model),
        logical_cpus=os.cpu_count(),
        usable_cpus=usable_cores,
        hardware_isa=hardware,
        avx512_flags=sorted(flag for flag in flags if flag.startswith("avx512")),
        amx_flags=sorted(flag for flag in flags if flag.startswith("amx")),
        torch_capability=capability,
        env_isa_caps=caps,
        isa=_min_level(hardware, *capped) if hardware else torch_level,
    )
    info["isa_restricted"] = info["isa"] != hardware
    return info


def effective_isa(environ: dict[str, str] | None = None) -> str | None:
    """The ISA level this process's CPU code runs at (``cpu_info()["isa"]``)."""
    return cpu_info(environ=environ)["isa"]


def isa_environment(isa: str) -> dict[str, str]:
    """Environment variables that restrict torch, oneDNN and MKL to ``isa`` (``native``: none)."""
    if isa not in ISA_ENV:
        raise ValueError(f"isa must be one of {sorted(ISA_ENV)}; got {isa!r}")
    return dict(ISA_ENV[isa])


def isa_label(isa: str, info: dict[str, Any]) -> str:
    """How a measurement under ``isa_environment(isa)`` on the CPU ``info`` is described."""
    hardware = info.get("hardware_isa")
    if isa == "native" or hardware is None:
        level = info.get("isa") or hardware
        return f"{ISA_NAMES.get(level, level)} code paths (native)"
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(hardware):
        raise ValueError(f"isa {isa!r} is above this CPU's {hardware!r}")
    if isa == hardware:
        return f"{ISA_NAMES[isa]} code paths (native)"
    return f"{ISA_NAMES[isa]} code paths on an {ISA_NAMES[hardware]} CPU"


def describe(info: dict[str, Any], probe: dict[str, Any] | None = None) -> str:
    """One line: model, core, CPUs and ISA levels (with the probe's oneDNN ISA when given)."""
    core = f" [{info['microarchitecture']}]" if info.get("microarchitecture") else ""
    ident = ""
    if info.get("family") is not None:
        ident = f" (family {info['family']} model {info['model']})"
    parts = [f"torch {probe.get('torch_capability') if probe else info.get('torch_capability')}"]
    if probe and probe.get("onednn_isa"):
        parts.append(f"oneDNN {probe['onednn_isa']}")
    mkl_cap = info.get("env_isa_caps", {}).get("MKL_ENABLE_INSTRUCTIONS")
    if mkl_cap:
        parts.append(f"MKL capped at {mkl_cap}")
    level = ISA_NAMES.get(info.get("isa"), info.get("isa"))
    restricted = f", restricted from {ISA_NAMES.get(info['hardware_isa'])}" if info.get("isa_restricted") else ""
    return (
        f"{info['model_name']}{core}{ident}, {info.get('usable_cpus')} CPUs, "
        f"ISA {level}{restricted} ({'; '.join(parts)})"
    )


_PROBE_SCRIPT = r"""
import json, torch
result = {"torch_capability": torch.backends.cpu.get_cpu_capability()}
try:
    x = torch.randn(64, 32)
    torch.ops.mkldnn._linear_pointwise(x, torch.randn(16, 32), None, "none", [], "")
except (AttributeError, RuntimeError) as error:
    result["onednn_error"] = str(error)
print("\nPROBE " + json.dumps(result), flush=True)
"""


def parse_probe_output(text: str) -> dict[str, Any]:
    """The probe's JSON line plus the ISA from oneDNN's ``onednn_verbose,...,cpu,isa:<name>`` line."""
    result: dict[str, Any] = {"onednn_isa": None}
    for line in text.splitlines():
        if line.startswith("PROBE "):
            result.update(json.loads(line[len("PROBE ") :]))
        elif line.startswith(("onednn_verbose", "dnnl_verbose")) and ",isa:" in line:
            result["onednn_isa"] = line.split(",isa:", 1)[1].strip()
    return result


@functools.lru_cache(maxsize=8)
def _probe(env_items: tuple[tuple[str, str], ...], timeout: float) -> dict[str, Any]:
    env = dict(env_items)
    env["ONEDNN_VERBOSE"] = "1"
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {timeout:.0f} s"}
    result = parse_probe_output(completed.stdout)
    if completed.returncode != 0:
        result["error"] = (completed.stderr.strip().splitlines() or ["no output"])[-1]
    return result


def probe_libraries(env: dict[str, str] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """In a fresh Python with ``env`` (default: this environment): torch's capability and oneDNN's ISA."""
    env = dict(os.environ if env is None else env)
    return dict(_probe(tuple(sorted(env.items())), timeout))


def main() -> int:
    info = cpu_info()
    probe = probe_libraries()
    print(describe(info, probe))
    print(json.dumps(dict(info, probe=probe), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
