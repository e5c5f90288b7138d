"""Share of a step's CPU time spent in matrix products (linear layers and the attention's batched products).

One eval forward or training step of a ``reformer-bench`` preset runs under ``torch.profiler`` after warm-up steps;
each ATen/oneDNN op's *self* CPU time is summed, and the products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, oneDNN's
``_linear_pointwise``) are set against the step's total. With one thread the total is the step's CPU time. With
``--isa avx2`` the measurement runs in a subprocess whose torch, oneDNN and MKL use their AVX2 code
(``reformer_kernels.cpu_info.isa_environment``), as ``reformer-bench --isa avx2`` does.

    python -m benchmarks.gemm_share --impl ours --mode eval --length 16384 --isa native
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from reformer.bench.harness import preset_step
from reformer_kernels.cpu_info import isa_environment

# ops whose self time is a matrix product: linear layers (MKL addmm/mm, oneDNN) and batched products (bmm, einsum)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "mkldnn::_linear_pointwise")


def gemm_share(impl: str, mode: str, preset: str, length: int, threads: int, warmup: int, top: int) -> dict:
    torch.set_num_threads(threads)
    step, _ = preset_step(impl, preset, length, mode)
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    by_time = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return dict(
        impl=impl,
        mode=mode,
        preset=preset,
        length=length,
        threads=threads,
        total_self_cpu_s=total_us / 1e6,
        gemm_self_cpu_s=gemm_us / 1e6,
        gemm_share=gemm_us / total_us,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        top_ops=[(e.key, e.self_cpu_time_total / 1e6, e.count) for e in by_time],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="ours", choices=["ours", "transformers"])
    parser.add_argument("--mode", default="eval", choices=["eval", "train"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--isa", default="native", choices=["native", "avx2"])
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.isa != "native" and not args.worker:
        # the ISA variables are read when torch, oneDNN and MKL load: measure in a fresh process
        command = [sys.executable, "-m", "benchmarks.gemm_share", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run([*command, "--worker"], env={**os.environ, **isa_environment(args.isa)}).returncode
    result = gemm_share(args.impl, args.mode, args.preset, args.length, args.threads, args.warmup, args.top)
    result["isa"] = args.isa
    print(
        f"{args.impl} {args.mode} L={args.length} {args.isa} ({result['cpu_capability']}), {args.threads} thread(s): "
        f"step {result['total_self_cpu_s']:.3f} s CPU, products {result['gemm_self_cpu_s']:.3f} s = "
        f"{100 * result['gemm_share']:.0f}%"
    )
    for name, seconds, count in result["top_ops"]:
        print(f"  {name:40s} {seconds * 1e3:9.1f} ms  x{count}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
