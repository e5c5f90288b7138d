"""How long a decoding step's weight products take when the weights were last read some milliseconds ago.

A cached one-token step multiplies one row by every weight matrix of the model once (the small preset: 34
products, 9.25 MiB of fp32 weights), and the next step does it again a few milliseconds later. Whether the weights
are still in the CPU's caches then decides a large part of the step: a product that streams its weight from L3
runs several times faster than one that waits for memory. This script takes the model's ``nn.Linear`` weights
(``reformer-bench``'s generate set-up: same preset and weights) and times passes of all its one-row products
(``F.linear``, as the step calls it), each pass after a busy wait of ``gap`` milliseconds that touches no memory
(a loop on the clock). With no gap the weights stay cached; if a gap that reads nothing still slows the pass
down, the caches are being emptied by something else than the step (other tenants of a shared L3).

    python -m benchmarks.step_weight_reuse --gaps 0 1 3 10
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from reformer.bench.harness import build_model, model_config, step_statistics


def _busy_wait(milliseconds: float) -> None:
    end = time.perf_counter() + milliseconds / 1e3
    while time.perf_counter() < end:
        pass


def time_passes(preset: str, gaps: list[float], passes: int) -> dict:
    config = model_config(preset, 1024, mode="generate", new_tokens=8)
    model, description = build_model("ours", config, seed=0, dtype=torch.float32, device="cpu")
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    rows = [torch.randn(1, module.in_features) for module in linears]  # one [1, in] row per product
    rows_by_gap = []
    with torch.no_grad():
        for gap in gaps:
            times = []
            for _ in range(passes):
                _busy_wait(gap)
                start = time.perf_counter()
                for module, row in zip(linears, rows):
                    F.linear(row, module.weight, module.bias)
                times.append(time.perf_counter() - start)
            stats = step_statistics(times)
            rows_by_gap.append(dict(gap_ms=gap, p10_ms=stats["p10"] * 1e3, median_ms=stats["median"] * 1e3))
    return dict(
        description=description,
        preset=preset,
        products=len(linears),
        weight_mib=sum(module.weight.numel() * module.weight.element_size() for module in linears) / 2**20,
        passes=passes,
        rows=rows_by_gap,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--gaps", nargs="+", type=float, default=[0, 1, 3, 10], help="busy waits (ms)")
    parser.add_argument("--passes", type=int, default=40, help="timed passes per gap")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = time_passes(args.preset, args.gaps, args.passes)
    print(f"{result['products']} one-row products, {result['weight_mib']:.2f} MiB of weights ({result['description']})")
    print("| busy wait before each pass (ms) | pass p10 (ms) | pass median (ms) |")
    print("|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['gap_ms']:g} | {row['p10_ms']:.3f} | {row['median_ms']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
