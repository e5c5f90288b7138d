"""The one-command GPU check (reformer_kernels/gpu_check.py), exercised without a GPU: the refusal on a
CPU machine, per-part timeouts, failure isolation, the JSON schema and the report built from fake parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from reformer_kernels import gpu_check
from reformer_kernels.gpu_check import Part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_VERSIONS = dict(python="3.11", torch="2.13.0", torch_cuda="12.8", triton="3.9.0", transformers="5.24.0")
FAKE_DEVICE = dict(
    name="NVIDIA H200",
    capability="9.0",
    memory_gib=139.8,
    multiprocessors=132,
    peak_tflops_bf16=989.0,
    peak_tflops_fp32=67.0,
    peak_gb_per_s=4800.0,
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_refuses_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    completed = subprocess.run(
        [sys.executable, "-m", "reformer_kernels.gpu_check", "--out", "unused"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert completed.returncode == gpu_check.NO_CUDA_EXIT != 0
    assert "no CUDA device" in completed.stderr and "nothing to check" in completed.stderr
    assert not os.path.exists(os.path.join(ROOT, "unused"))


def test_part_timeout_kills_the_whole_process_group(tmp_path):
    # the part starts a grandchild and both sleep far past the timeout: recorded as timed out, no hang,
    # and the grandchild is gone too
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    started = time.perf_counter()
    record = gpu_check.run_part(Part("sleeper", "sleeps past its timeout", _python(code), timeout_s=2.0))
    assert time.perf_counter() - started < 20
    assert record["status"] == "timed_out" and "timed out after 2 s" in record["reason"]
    assert record["duration_s"] >= 2.0 and "started" in record["output_tail"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        pytest.fail("the part's grandchild survived the timeout")


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    parts = [
        Part("fails", "exits 3", _python("import sys; print('boom'); sys.exit(3)"), 30.0),
        Part("skipped_missing", "needs a path", _python("print(1)"), 30.0, needs=str(tmp_path / "nope")),
        Part("passes", "pytest-like", _python("print('7 passed, 2 skipped in 1.50s')"), 30.0, kind="pytest"),
        Part("nothing_passed", "all skipped", _python("print('4 skipped in 0.10s')"), 30.0, kind="pytest"),
    ]
    records = gpu_check.run_parts(parts, budget_s=120.0)
    assert [r["status"] for r in records] == ["failed", "skipped", "passed", "failed"]
    assert records[0]["returncode"] == 3 and "boom" in records[0]["output_tail"]
    assert "not found" in records[1]["reason"]
    assert records[2]["figures"] == {"passed": 7, "skipped": 2}
    assert "no test passed" in records[3]["reason"]


def test_spent_budget_skips_parts_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    records = gpu_check.run_parts([Part("late", "", _python(f"open({str(marker)!r}, 'w')"), 30.0)], budget_s=0.0)
    assert records[0]["status"] == "skipped" and records[0]["reason"] == "time budget spent"
    assert not marker.exists()


def _fake_bench_json(path, with_attention):
    results = [
        dict(impl="ours", seq_len=1024, time_s=0.002, peak_mb=10.0, tokens_per_s=512000.0),
        dict(impl="transformers", seq_len=1024, time_s=0.010, peak_mb=40.0, tokens_per_s=102400.0),
        dict(impl="ours", seq_len=65536, time_s=0.020, peak_mb=300.0, tokens_per_s=3276800.0),
        dict(impl="transformers", seq_len=65536, error="out of memory"),
    ]
    if with_attention:
        results[2]["attention"] = [
            dict(layer="lsh", time_s=0.001, gb_per_s=2400.0, tflop_per_s=50.0, bw_fraction=0.5, flop_fraction=0.05)
            | {"pass": "fwd"}
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta={}, results=results, table="| fake |")))


def test_result_schema_and_report_from_fake_parts(tmp_path, monkeypatch):
    bench_json = tmp_path / "bench" / "reformer-bench_cuda_eval.json"
    attention_json = tmp_path / "attention" / "reformer-bench_cuda_train.json"
    _fake_bench_json(bench_json, with_attention=False)
    _fake_bench_json(attention_json, with_attention=True)
    parts = [
        Part("kernel_tests", "tests", _python("print('120 passed, 3 skipped in 95.20s')"), 30.0, kind="pytest"),
        Part("bench_eval_float32", "sweep", _python("print('ok')"), 30.0, kind="bench", bench_json=str(bench_json)),
        Part("attention_bfloat16", "attn", _python("print('ok')"), 30.0, kind="bench", bench_json=str(attention_json)),
        Part(
            "model_parity_triton",
            "parity",
            _python("print('1 failed, 5 passed in 3.00s'); exit(1)"),
            30.0,
            kind="pytest",
        ),
    ]
    monkeypatch.setattr(gpu_check, "default_parts", lambda out_dir, timeouts=None: parts)
    monkeypatch.setattr(gpu_check, "environment", lambda: (FAKE_VERSIONS, FAKE_DEVICE))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--budget", "120"]) == 1  # one part failed
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["schema"] == gpu_check.SCHEMA and result["ok"] is False
    assert result["versions"] == FAKE_VERSIONS and result["device"] == FAKE_DEVICE
    assert set(result) >= {"date", "command", "budget_s", "elapsed_s", "parts"}
    assert [p["name"] for p in result["parts"]] == [p.name for p in parts]
    for record in result["parts"]:
        assert set(record) >= {"name", "command", "timeout_s", "status", "returncode", "duration_s", "output_tail"}
    kernel, bench, attention, parity = result["parts"]
    assert kernel["status"] == "passed" and kernel["figures"] == {"passed": 120, "skipped": 3}
    assert parity["status"] == "failed" and parity["figures"] == {"failed": 1, "passed": 5}
    rows = {(r["impl"], r["seq_len"]): r for r in bench["figures"]["rows"]}
    assert rows[("ours", 1024)]["speedup_vs_transformers"] == pytest.approx(5.0)
    assert rows[("transformers", 65536)]["error"] == "out of memory"
    assert attention["figures"]["attention"][0]["seq_len"] == 65536

    report = gpu_check.format_report(result)
    assert report.startswith("GPU check on NVIDIA H200 (sm 9.0)") and "FAILED" in report
    lines = report.splitlines()
    assert any(line.startswith("| kernel_tests | passed |") and "120 passed, 3 skipped" in line for line in lines)
    assert any(line.startswith("| bench_eval_float32 | passed |") and "L=65536: ours 20.0 ms" in line for line in lines)
    assert any(line.startswith("| model_parity_triton | failed |") and "1 failed" in line for line in lines)
    assert "| attention_bfloat16 | 65536 | lsh fwd | 1.00 | 2400 | 50.0 | 50% | 5% |" in lines


def test_bench_part_with_a_failed_measurement_of_ours_fails(tmp_path):
    path = tmp_path / "reformer-bench_cuda_eval.json"
    _fake_bench_json(path, with_attention=False)
    data = json.loads(path.read_text())
    data["results"][0] = dict(impl="ours", seq_len=1024, error="RuntimeError: CUDA error")
    path.write_text(json.dumps(data))
    record = gpu_check.run_part(Part("bench", "", _python("print(1)"), 30.0, kind="bench", bench_json=str(path)))
    assert record["status"] == "failed" and "1 measurement(s) of ours failed" in record["reason"]


def test_default_parts_fit_the_eight_minute_limit(tmp_path):
    parts = gpu_check.default_parts(str(tmp_path))
    names = [p.name for p in parts]
    assert names[:2] == ["kernel_tests", "model_parity_triton"]
    assert {"bench_eval_float32", "bench_eval_bfloat16", "bench_train_float32", "bench_train_bfloat16"} <= set(names)
    assert {"attention_float32", "attention_bfloat16"} <= set(names)
    assert sum(p.timeout_s for p in parts) <= gpu_check.DEFAULT_BUDGET_S < 8 * 60
    for part in parts:
        assert part.env.get("TRITON_INTERPRET") == "0"
    assert gpu_check.default_parts(str(tmp_path), timeouts={"kernel_tests": 300.0})[0].timeout_s == 300.0


def test_parse_pytest_summary():
    assert gpu_check.parse_pytest_summary("...\n== 3 passed, 1 skipped, 2 errors in 2.10s ==\n") == dict(
        passed=3, skipped=1, errors=2
    )
    assert gpu_check.parse_pytest_summary("no summary here") == {}


def test_gpu_peaks():
    assert gpu_check.gpu_peak("NVIDIA H200", torch.bfloat16) == (989e12, 4800e9)
    assert gpu_check.gpu_peak("NVIDIA H100 80GB HBM3 SXM", torch.float32) == (67e12, 3350e9)
    assert gpu_check.gpu_peak("Some CPU", torch.float32) == (None, None)
