"""CPU kind and ISA detection (reformer_kernels/cpu_info.py): on this machine and on fake /proc/cpuinfo files."""

from __future__ import annotations

import pytest
import torch

from reformer_kernels import cpu_info

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: something else
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8
"""
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: sse avx avx2 fma
"""


def _write(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_this_machine_is_detected_consistently_with_proc_cpuinfo():
    info = cpu_info.cpu_info()
    fields = cpu_info.read_cpuinfo()
    assert info["model_name"] and info["isa"] in cpu_info.ISA_LEVELS
    assert info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    if not fields:
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(fields["flags"].split())
    assert info["model_name"] == fields["model name"] and info["vendor"] == fields["vendor_id"]
    assert info["family"] == int(fields["cpu family"]) and info["model"] == int(fields["model"])
    expected = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    if expected:
        assert info["hardware_isa"] == expected
    assert ("avx512f" in flags) == ("avx512f" in info["avx512_flags"])
    assert 1 <= info["usable_cpus"] <= info["logical_cpus"]
    line = cpu_info.describe(info)
    assert info["model_name"] in line and cpu_info.ISA_NAMES[info["isa"]] in line


@pytest.mark.parametrize(
    "text, vendor, hardware, core",
    [
        (ZEN4, "AuthenticAMD", "avx512", "Zen 4"),
        (SAPPHIRE_RAPIDS, "GenuineIntel", "amx", None),
        (AVX2_ONLY, "AuthenticAMD", "avx2", "Zen 3"),
    ],
    ids=["zen4", "sapphire-rapids", "avx2-only"],
)
def test_fake_cpus(tmp_path, text, vendor, hardware, core):
    info = cpu_info.cpu_info(_write(tmp_path, text), environ={})
    assert info["vendor"] == vendor and info["hardware_isa"] == hardware and info["microarchitecture"] == core
    # the first processor's fields only
    assert info["model_name"] != "something else"
    # torch's AVX512 capability is its highest level: it does not cap an AMX CPU
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert info["isa"] == hardware and not info["isa_restricted"]


def test_environment_caps_restrict_the_effective_isa(tmp_path):
    path = _write(tmp_path, ZEN4)
    info = cpu_info.cpu_info(path, environ=cpu_info.isa_environment("avx2"))
    assert info["isa"] == "avx2" and info["isa_restricted"] and info["hardware_isa"] == "avx512"
    assert info["env_isa_caps"] == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    assert cpu_info.isa_label("avx2", info) == "AVX2 code paths on an AVX-512 CPU"
    assert "restricted from AVX-512" in cpu_info.describe(info)
    assert cpu_info.cpu_info(path, environ={"DNNL_MAX_CPU_ISA": "ALL"})["isa_restricted"] is False
    avx2_cpu = cpu_info.cpu_info(_write(tmp_path, AVX2_ONLY), environ={})
    assert cpu_info.isa_label("avx2", avx2_cpu) == "AVX2 code paths (native)"
    with pytest.raises(ValueError, match="isa"):
        cpu_info.isa_environment("avx1024")


@pytest.mark.parametrize(
    "value, level",
    [
        ("AVX2", "avx2"),
        ("avx2", "avx2"),
        ("AVX512_CORE", "avx512"),
        ("AVX512_CORE_AMX", "amx"),
        ("AVX512_E1", "avx512"),
        ("AVX10_1_512_AMX_FP16", "amx"),
        ("SSE41", "sse"),
        ("default", "sse"),
        ("ALL", None),
        ("", None),
        ("SVE256", None),
    ],
)
def test_isa_names(value, level):
    assert cpu_info.isa_from_name(value) == level


def test_parse_probe_output():
    text = (
        "onednn_verbose,v1,info,oneDNN v3.12.0 (commit x)\n"
        "onednn_verbose,v1,info,cpu,isa:Intel AVX2\n"
        "onednn_verbose,v1,primitive,exec,cpu,inner_product,brg_matmul:avx2,...\n"
        'PROBE {"torch_capability": "AVX2"}\n'
    )
    assert cpu_info.parse_probe_output(text) == {"onednn_isa": "Intel AVX2", "torch_capability": "AVX2"}


def test_probe_sees_the_avx2_restriction_take_effect():
    # a fresh process under isa_environment("avx2"): torch and oneDNN both report AVX2
    info = cpu_info.cpu_info()
    if info["hardware_isa"] not in ("avx512", "amx"):
        pytest.skip("needs a CPU above AVX2")
    import os

    probe = cpu_info.probe_libraries({**os.environ, **cpu_info.isa_environment("avx2")})
    assert probe["torch_capability"] == "AVX2", probe
    if probe.get("onednn_isa") is not None:
        assert "AVX2" in probe["onednn_isa"] and "512" not in probe["onednn_isa"], probe
