"""oneDNN vs MKL on the model's fp32 linear shapes, under each CPU ISA setting.

    python -m benchmarks.linear_backends                      # native ISA and AVX2 code paths, 2 rounds
    python -m benchmarks.linear_backends --isa native --rounds 3 --out linear.json

``reformer_kernels/cpu_linear.py`` runs the model's large fp32 matrix multiplies through oneDNN or
MKL, whichever this measurement found faster for the CPU's ISA. Each ISA setting runs in its own
subprocess (the restricting environment variables, ``reformer_kernels.cpu_info.ISA_ENV``, must be set
before torch loads); the settings alternate round by round, and inside a process the two backends
alternate sample by sample, so drift of the shared machine's speed hits both alike. Every row reports
the median time per call of each backend over all samples of all rounds, the spread (min-max of the
per-sample MKL/oneDNN ratio) and the faster backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

# (op, in_features, out_features) of the crime-and-punishment / ``small`` model (hidden 256, 2 x 64
# heads, FF 512, vocab 320) as reformer/modeling_reformer.py calls them: fused projections of a
# local layer (3 x 128) and of an LSH layer (2 x 128), the output projection, the feed-forward with
# its ReLU, the LM head over both streams, the input gradients of the backward (256 -> 128 for the
# output projection, 384 -> 256 for the local projections) and a wider 256 -> 768 shape; weight
# gradients as ``[out, in]`` of ``grad_out^T @ inputs``.
LINEAR_SHAPES = (
    ("linear", 256, 384),
    ("linear", 256, 256),
    ("linear", 128, 256),
    ("linear_relu", 256, 512),
    ("linear", 512, 256),
    ("linear", 512, 320),
    ("linear", 256, 768),
    ("linear", 256, 128),
    ("linear", 384, 256),
    ("weight_grad", 128, 256),
    ("weight_grad", 256, 384),
    ("weight_grad", 256, 256),
    ("weight_grad", 256, 512),
    ("weight_grad", 512, 256),
    ("weight_grad", 512, 320),
)
ROWS = (1024, 2048, 4096, 16384)


def _case_functions(op: str, rows: int, in_features: int, out_features: int):
    import torch

    from reformer_kernels import cpu_linear

    generator = torch.Generator().manual_seed(rows + in_features + out_features)
    if op == "weight_grad":
        grad_out = torch.randn(rows, out_features, generator=generator)
        inputs = torch.randn(rows, in_features, generator=generator)
        return (
            lambda: cpu_linear._weight_grad_onednn(grad_out, inputs),
            lambda: cpu_linear._weight_grad_mkl(grad_out, inputs),
        )
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    relu = op == "linear_relu"
    return (
        lambda: cpu_linear._linear_onednn(x, weight, bias, relu),
        lambda: cpu_linear._linear_mkl(x, weight, bias, relu),
    )


def measure_cases(samples: int, target_s: float, rows_list=ROWS, shapes=LINEAR_SHAPES) -> list[dict[str, Any]]:
    """In this process: per case, ``samples`` alternating samples of each backend (seconds per call)."""
    import torch

    from reformer_kernels import cpu_info

    results = []
    for op, in_features, out_features in shapes:
        for rows in rows_list:
            onednn, mkl = _case_functions(op, rows, in_features, out_features)
            for function in (onednn, mkl, onednn, mkl):  # warm-up: primitive caches, page faults
                function()
            start = time.perf_counter()
            onednn()
            calls = max(1, round(target_s / max(time.perf_counter() - start, 1e-6)))
            times: dict[str, list[float]] = {"onednn": [], "mkl": []}
            for sample in range(samples):
                order = (("onednn", onednn), ("mkl", mkl)) if sample % 2 == 0 else (("mkl", mkl), ("onednn", onednn))
                for name, function in order:
                    start = time.perf_counter()
                    for _ in range(calls):
                        function()
                    times[name].append((time.perf_counter() - start) / calls)
            results.append(
                dict(op=op, rows=rows, in_features=in_features, out_features=out_features, calls=calls, **times)
            )
    return [
        dict(
            r,
            torch_capability=torch.backends.cpu.get_cpu_capability(),
            threads=torch.get_num_threads(),
            isa=cpu_info.effective_isa(),
        )
        for r in results
    ]


def summarize(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per case from the rounds of one ISA setting: medians over all samples, ratio spread."""
    rows = []
    for attempts in zip(*per_round):
        onednn = [t for r in attempts for t in r["onednn"]]
        mkl = [t for r in attempts for t in r["mkl"]]
        ratios = [m / o for r in attempts for o, m in zip(r["onednn"], r["mkl"])]
        first = attempts[0]
        rows.append(
            dict(
                op=first["op"],
                rows=first["rows"],
                in_features=first["in_features"],
                out_features=first["out_features"],
                onednn_ms=statistics.median(onednn) * 1e3,
                mkl_ms=statistics.median(mkl) * 1e3,
                mkl_over_onednn=statistics.median(mkl) / statistics.median(onednn),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                faster="mkl" if statistics.median(mkl) < statistics.median(onednn) else "onednn",
            )
        )
    return rows


def format_rows(isa_label: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"### {isa_label}",
        "| op | rows | in -> out | oneDNN (ms) | MKL (ms) | MKL / oneDNN (median) | per-sample range | faster |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['rows']} | {r['in_features']} -> {r['out_features']} | {r['onednn_ms']:.3f} | "
            f"{r['mkl_ms']:.3f} | {r['mkl_over_onednn']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
            f"{r['faster']} |"
        )
    return "\n".join(lines)


def _run_worker(isa: str, samples: int, target_s: float, threads: int | None) -> list[dict[str, Any]]:
    from reformer_kernels.cpu_info import isa_environment

    env = dict(os.environ)
    env.update(isa_environment(isa))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = [sys.executable, "-m", "benchmarks.linear_backends", "--worker", "--samples", str(samples)]
    command += ["--target-ms", str(target_s * 1e3)] + (["--threads", str(threads)] if threads else [])
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(completed.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=("native", "avx2"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=6, help="samples per backend per case and round")
    parser.add_argument("--target-ms", type=float, default=15.0, help="length of one sample")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write every sample and the summary as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure_cases(args.samples, args.target_ms / 1e3)))
        return 0

    from reformer_kernels import cpu_info

    info = cpu_info.cpu_info()
    print(f"linear_backends: {cpu_info.describe(info)}", flush=True)
    raw: dict[str, list[list[dict[str, Any]]]] = {isa: [] for isa in args.isa}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for isa in args.isa:
            print(f"round {round_index + 1}/{args.rounds}: {isa} ...", flush=True)
            raw[isa].append(_run_worker(isa, args.samples, args.target_ms / 1e3, args.threads))
    summary = {isa: summarize(rounds) for isa, rounds in raw.items()}
    for isa, rows in summary.items():
        print()
        print(format_rows(cpu_info.isa_label(isa, info), rows))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(cpu=info, rounds=args.rounds, summary=summary, raw=raw), handle, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
