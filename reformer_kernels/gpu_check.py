"""The GPU check, in one command on a CUDA machine: ``python -m reformer_kernels.gpu_check``.

It runs, each part in its own subprocess with its own timeout (a part that fails or times out is
recorded and the others still run; the whole check stays inside ``--budget`` seconds, 450 by default,
so that it ends within 8 minutes on one H100/H200):

1. ``kernel_tests``: the kernel tests (``tests/ops``) on the compiled kernels (``TRITON_INTERPRET=0``);
2. ``model_parity_triton``: the whole-model tests on backend ``triton`` (parity with the PyTorch path
   and transformers, forward and backward);
3. ``bench_<mode>_<dtype>``: the default ``reformer-bench`` sweep, eval and train, float32 and bfloat16;
4. ``attention_<dtype>``: the attention kernels alone, achieved GB/s and TFLOP/s against the device's
   peak (``reformer-bench --attention-throughput on``).

It writes ``<out>/gpu_check.json`` (versions, device, per part: command, status, duration, output tail
and figures) and prints a short table. Exit status 0 only if every part passed; on a machine without
CUDA it says so and exits 2. Run it from a source checkout (the tests live in ``tests/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "reformer-kernels/gpu-check/1"
DEFAULT_BUDGET_S = 450.0
OUTPUT_TAIL_CHARS = 4000
NO_CUDA_EXIT = 2

# Dense peak figures per device (vendor datasheets): (TFLOP/s fp16/bf16 tensor core, TFLOP/s fp32, GB/s).
GPU_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989.0, 67.0, 4800.0),
    "H100 SXM": (989.0, 67.0, 3350.0),
    "H100 PCIe": (756.0, 51.0, 2000.0),
    "H100": (989.0, 67.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 19.5, 2039.0),
    "A100 80GB PCIe": (312.0, 19.5, 1935.0),
    "A100": (312.0, 19.5, 1555.0),
    "L40S": (362.0, 91.6, 864.0),
    "L4": (121.0, 30.3, 300.0),
    "A10": (125.0, 31.2, 600.0),
    "V100": (125.0, 15.7, 900.0),
    "T4": (65.0, 8.1, 320.0),
}


def gpu_peak(name: str, dtype) -> tuple[float | None, float | None]:
    """``(peak FLOP/s, peak bytes/s)`` of a GPU by (sub)name for ``dtype``, or ``(None, None)`` if unknown."""
    import torch

    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            tensor_tflops, fp32_tflops, gbps = GPU_PEAKS[key]
            tflops = fp32_tflops if dtype == torch.float32 else tensor_tflops
            return tflops * 1e12, gbps * 1e9
    return None, None


@dataclass
class Part:
    """One subprocess of the check."""

    name: str
    description: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "command"  # "pytest": figures from pytest's summary; "bench": from reformer-bench's JSON
    bench_json: str | None = None
    needs: str | None = None  # a path (relative to cwd) that must exist, else the part is skipped


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line (``3 passed, 1 skipped in 2.1s``); empty if none."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|error|skipped)", line):
            counts = {}
            for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line):
                counts["errors" if word.startswith("error") else word] = int(number)
            return counts
    return {}


def bench_figures(path: str) -> dict[str, Any]:
    """The rows of a ``reformer-bench`` JSON file, reduced to what the report shows."""
    with open(path) as handle:
        data = json.load(handle)
    rows, attention = [], []
    baseline = {r["seq_len"]: r for r in data["results"] if r["impl"] == "transformers" and "error" not in r}
    for r in data["results"]:
        row = {"seq_len": r["seq_len"], "impl": r["impl"]}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(time_s=r["time_s"], peak_mb=r.get("peak_mb"), tokens_per_s=r.get("tokens_per_s"))
            base = baseline.get(r["seq_len"])
            if base:
                row["speedup_vs_transformers"] = base["time_s"] / r["time_s"]
            if "max_abs_diff_vs_transformers" in r:
                row["max_abs_diff_vs_transformers"] = r["max_abs_diff_vs_transformers"]
        rows.append(row)
        attention += [dict(a, seq_len=r["seq_len"]) for a in r.get("attention", [])]
    figures: dict[str, Any] = {"rows": rows, "table": data.get("table", "")}
    if attention:
        figures["attention"] = attention
    return figures


def _read_tail(path: str, chars: int = OUTPUT_TAIL_CHARS) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - chars))
        return handle.read().decode("utf-8", "replace")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_part(part: Part, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``part`` (its own process group, killed whole on timeout); never raises for the part's failures."""
    timeout = part.timeout_s if timeout_s is None else timeout_s
    record: dict[str, Any] = dict(
        name=part.name,
        description=part.description,
        command=" ".join(part.command),
        timeout_s=timeout,
        env={key: value for key, value in part.env.items()},
    )
    if part.needs and not os.path.exists(part.needs):
        return dict(
            record,
            status="skipped",
            returncode=None,
            duration_s=0.0,
            output_tail="",
            figures={},
            reason=f"{part.needs} not found (run from a source checkout)",
        )
    if timeout <= 0:
        return dict(
            record,
            status="skipped",
            returncode=None,
            duration_s=0.0,
            output_tail="",
            figures={},
            reason="time budget spent",
        )
    env = dict(os.environ)
    env.update(part.env)
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False) as log:
        log_path = log.name
    try:
        with open(log_path, "wb") as log:
            try:
                process = subprocess.Popen(
                    part.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            except OSError as error:
                return dict(
                    record, status="failed", returncode=None, duration_s=0.0, output_tail=str(error), figures={}
                )
            try:
                returncode = process.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(process)
                try:
                    returncode = process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    returncode = None
                timed_out = True
        duration = time.perf_counter() - started
        tail = _read_tail(log_path)
    finally:
        os.unlink(log_path)
    status = "timed_out" if timed_out else ("passed" if returncode == 0 else "failed")
    record.update(status=status, returncode=returncode, duration_s=duration, output_tail=tail, figures={})
    if timed_out:
        record["reason"] = f"timed out after {timeout:.0f} s"
    if part.kind == "pytest":
        counts = parse_pytest_summary(tail)
        record["figures"] = counts
        if status == "passed" and not counts.get("passed"):
            record.update(status="failed", reason="no test passed (all skipped or none collected)")
    elif part.kind == "bench" and part.bench_json and os.path.exists(part.bench_json):
        try:
            record["figures"] = bench_figures(part.bench_json)
        except (OSError, ValueError, KeyError) as error:
            record["figures"] = {"error": f"unreadable {part.bench_json}: {error}"}
        failed_rows = [r for r in record["figures"].get("rows", []) if "error" in r and r["impl"] == "ours"]
        if status == "passed" and failed_rows:
            record.update(status="failed", reason=f"{len(failed_rows)} measurement(s) of ours failed")
    return record


def default_parts(out_dir: str, python: str = sys.executable, timeouts: dict[str, float] | None = None) -> list[Part]:
    """The check's parts, writing benchmark output under ``out_dir``."""
    timeouts = timeouts or {}
    compiled = {"TRITON_INTERPRET": "0"}
    parts = [
        Part(
            "kernel_tests",
            "kernel tests on the compiled Triton kernels (tests/ops, TRITON_INTERPRET=0)",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops"],
            120.0,
            compiled,
            kind="pytest",
            needs="tests/ops",
        ),
        Part(
            "model_parity_triton",
            "whole-model tests on backend triton (vs the PyTorch path and transformers, fwd + bwd)",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/model/test_triton_model.py",
                "tests/model/test_parity.py::test_triton_backend_parity",
            ],
            75.0,
            dict(compiled, REFORMER_BACKEND="triton"),
            kind="pytest",
            needs="tests/model",
        ),
    ]
    bench = [python, "-m", "reformer.bench.cli", "--in-process", "--no-plot", "--repeats", "3"]
    for mode in ("eval", "train"):
        for dtype in ("float32", "bfloat16"):
            directory = os.path.join(out_dir, f"bench_{mode}_{dtype}")
            parts.append(
                Part(
                    f"bench_{mode}_{dtype}",
                    f"reformer-bench default sweep, {mode}, {dtype}",
                    [*bench, "--mode", mode, "--dtype", dtype, "--attention-throughput", "off", "--out", directory],
                    45.0,
                    compiled,
                    kind="bench",
                    bench_json=os.path.join(directory, f"reformer-bench_cuda_{mode}.json"),
                )
            )
    for dtype in ("float32", "bfloat16"):
        directory = os.path.join(out_dir, f"attention_{dtype}")
        parts.append(
            Part(
                f"attention_{dtype}",
                f"attention kernels alone ({dtype}): GB/s and TFLOP/s vs peak, fwd and fwd+bwd",
                [
                    *bench,
                    "--impls",
                    "ours",
                    "--lengths",
                    "16384",
                    "65536",
                    "--mode",
                    "train",
                    "--dtype",
                    dtype,
                    "--attention-throughput",
                    "on",
                    "--out",
                    directory,
                ],
                30.0,
                compiled,
                kind="bench",
                bench_json=os.path.join(directory, "reformer-bench_cuda_train.json"),
            )
        )
    for part in parts:
        if part.name in timeouts:
            part.timeout_s = timeouts[part.name]
    return parts


def run_parts(parts: list[Part], budget_s: float, reserve_s: float = 5.0) -> list[dict[str, Any]]:
    """Run every part in order; each gets its own timeout, cut to what is left of ``budget_s``."""
    deadline = time.perf_counter() + budget_s
    records = []
    for part in parts:
        left = deadline - time.perf_counter() - reserve_s
        timeout = min(part.timeout_s, left) if left >= 1.0 else 0.0
        print(f"gpu_check: {part.name} (timeout {max(timeout, 0):.0f} s) ...", end=" ", flush=True)
        record = run_part(part, timeout)
        print(f"{record['status']} in {record['duration_s']:.1f} s", flush=True)
        records.append(record)
    return records


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(versions, device)`` of this machine (CUDA device 0)."""
    import platform

    import torch

    versions = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=_version("triton"),
        transformers=_version("transformers"),
        reformer_kernels=_version("reformer-kernels"),
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        versions["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        versions["driver"] = None
    props = torch.cuda.get_device_properties(0)
    peak_bf16, peak_bw = gpu_peak(props.name, torch.bfloat16)
    peak_fp32, _ = gpu_peak(props.name, torch.float32)
    device = dict(
        name=props.name,
        capability=f"{props.major}.{props.minor}",
        memory_gib=props.total_memory / 2**30,
        multiprocessors=props.multi_processor_count,
        peak_tflops_bf16=peak_bf16 / 1e12 if peak_bf16 else None,
        peak_tflops_fp32=peak_fp32 / 1e12 if peak_fp32 else None,
        peak_gb_per_s=peak_bw / 1e9 if peak_bw else None,
    )
    return versions, device


def build_result(
    records: list[dict[str, Any]],
    versions: dict[str, Any],
    device: dict[str, Any],
    budget_s: float,
    elapsed_s: float,
    command: str,
) -> dict[str, Any]:
    return dict(
        schema=SCHEMA,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        versions=versions,
        device=device,
        budget_s=budget_s,
        elapsed_s=elapsed_s,
        parts=records,
        ok=bool(records) and all(r["status"] == "passed" for r in records),
    )


def _summary(record: dict[str, Any]) -> str:
    figures = record.get("figures") or {}
    if record["status"] in ("skipped", "timed_out") or (record["status"] == "failed" and record.get("reason")):
        note = record.get("reason", "")
    else:
        note = ""
    if "rows" in figures:
        longest = max((r["seq_len"] for r in figures["rows"]), default=None)
        ours = next((r for r in figures["rows"] if r["seq_len"] == longest and r["impl"] == "ours"), None)
        if ours and "error" not in ours:
            text = f"L={longest}: ours {ours['time_s'] * 1e3:.1f} ms"
            if ours.get("speedup_vs_transformers"):
                text += f", {ours['speedup_vs_transformers']:.2f}x transformers"
            if ours.get("peak_mb") is not None:
                text += f", {ours['peak_mb']:,.0f} MB"
            note = f"{note}; {text}" if note else text
        elif ours:
            note = f"{note}; L={longest}: ours {ours['error']}" if note else f"L={longest}: ours {ours['error']}"
    elif figures and all(isinstance(v, int) for v in figures.values()):
        counts = ", ".join(f"{v} {k}" for k, v in figures.items())
        note = f"{counts}; {note}" if note else counts
    return note or ("exit " + str(record.get("returncode")) if record["status"] == "failed" else "")


def format_report(result: dict[str, Any]) -> str:
    """A short markdown report: device, one row per part, the attention kernels' throughput."""
    device = result["device"]
    versions = result["versions"]
    lines = [
        f"GPU check on {device.get('name')} (sm {device.get('capability')}), torch {versions.get('torch')} "
        f"(CUDA {versions.get('torch_cuda')}), triton {versions.get('triton')}: "
        f"{'all parts passed' if result['ok'] else 'FAILED'} in {result['elapsed_s']:.0f} s",
        "",
        "| part | status | time (s) | result |",
        "|---|---|---:|---|",
    ]
    for record in result["parts"]:
        lines.append(f"| {record['name']} | {record['status']} | {record['duration_s']:.1f} | {_summary(record)} |")
    attention = [
        (record["name"], entry)
        for record in result["parts"]
        for entry in (record.get("figures") or {}).get("attention", [])
    ]
    if attention:
        lines += [
            "",
            "| part | L | attention op | time (ms) | GB/s | TFLOP/s | % peak BW | % peak FLOP/s |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name, a in attention:
            bw = f"{a['bw_fraction']:.0%}" if a.get("bw_fraction") is not None else "-"
            fl = f"{a['flop_fraction']:.0%}" if a.get("flop_fraction") is not None else "-"
            lines.append(
                f"| {name} | {a['seq_len']} | {a['layer']} {a['pass']} | {a['time_s'] * 1e3:.2f} | "
                f"{a['gb_per_s']:.0f} | {a['tflop_per_s']:.1f} | {bw} | {fl} |"
            )
    return "\n".join(lines)


def _parse_timeout(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout expects PART=SECONDS; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reformer_kernels.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu_check"))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", nargs="+", default=None, metavar="PART", help="run only these parts")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        type=_parse_timeout,
        metavar="PART=SECONDS",
        help="override one part's timeout (repeatable)",
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
            "nothing to check. Run this on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    os.makedirs(args.out, exist_ok=True)
    parts = default_parts(args.out, timeouts=dict(args.timeout))
    names = [part.name for part in parts]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"gpu_check: unknown part(s) {unknown}; parts: {names}")
        parts = [part for part in parts if part.name in args.only]
    started = time.perf_counter()
    versions, device = environment()
    print(f"gpu_check: {device['name']} (sm {device['capability']}), budget {args.budget:.0f} s", flush=True)
    records = run_parts(parts, args.budget - (time.perf_counter() - started))
    command = "python -m reformer_kernels.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    result = build_result(records, versions, device, args.budget, time.perf_counter() - started, command.strip())
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print()
    print(format_report(result))
    print(f"\nwrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
