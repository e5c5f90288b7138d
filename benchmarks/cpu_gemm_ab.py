"""Whole-model A/B of the CPU GEMM library choice: ``REFORMER_CPU_GEMM=auto`` against ``onednn``.

    python -m benchmarks.cpu_gemm_ab --mode train --length 16384 --pairs 10
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m benchmarks.cpu_gemm_ab

``reformer_kernels/cpu_linear.py`` reads ``REFORMER_CPU_GEMM`` at every call, so one process can
alternate the two settings step by step on the same model, input and heap: each pair of adjacent steps
(order alternating) gives one auto/onednn time ratio, which drift of a shared machine's speed affects
far less than separate runs. ``onednn`` is the library every product used before the choice by CPU kind
(``cpu_linear.gemm_library``). Prints the median and range of the paired ratios (wall and CPU time) and
what ``auto`` chose.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="train", choices=("eval", "train"))
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the samples as JSON here")
    args = parser.parse_args(argv)

    import torch

    from reformer.bench import harness
    from reformer_kernels import cpu_info, cpu_linear

    if args.threads:
        torch.set_num_threads(args.threads)
    step, _ = harness.preset_step("ours", args.preset, args.length, args.mode)
    variable = cpu_linear.GEMM_ENV_VAR
    for library in ("auto", "onednn"):  # warm-up
        os.environ[variable] = library
        step()
    samples: dict[str, list[tuple[float, float]]] = {"auto": [], "onednn": []}
    for index in range(args.pairs):
        for library in ("auto", "onednn") if index % 2 == 0 else ("onednn", "auto"):
            os.environ[variable] = library
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            samples[library].append((time.perf_counter() - start, time.process_time() - cpu_start))
    wall = [a[0] / o[0] for a, o in zip(samples["auto"], samples["onednn"])]
    cpu = [a[1] / o[1] for a, o in zip(samples["auto"], samples["onednn"])]
    info = cpu_info.cpu_info()
    print(f"cpu_gemm_ab: {cpu_info.describe(info)}, {torch.get_num_threads()} threads")
    print(f"{args.preset} {args.mode} L={args.length}, {args.pairs} pairs, load average {os.getloadavg()[0]:.1f}")
    for library, values in samples.items():
        print(
            f"  {library:<6} wall median {statistics.median(v[0] for v in values):.3f} s "
            f"(min {min(v[0] for v in values):.3f}), CPU median {statistics.median(v[1] for v in values):.3f} s"
        )
    print(f"  auto / onednn, paired: wall median {statistics.median(wall):.3f} (range {min(wall):.3f}-{max(wall):.3f})")
    print(f"  auto / onednn, paired: CPU  median {statistics.median(cpu):.3f} (range {min(cpu):.3f}-{max(cpu):.3f})")
    os.environ[variable] = "auto"
    choices = {op: cpu_linear.gemm_library(op) for op in ("linear", "weight_grad")}
    print(f"  auto: {choices}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(args=vars(args), cpu=info, samples=samples, choices=choices), handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
