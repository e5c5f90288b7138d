"""``reformer-bench``: our Reformer vs transformers' Reformer vs dense attention, over sequence length.

    reformer-bench                                   # default sweep on the device present
    reformer-bench --mode train --lengths 16384 65536
    reformer-bench --preset small --layers 12 --num-hashes 4 --set lsh_num_chunks_after=1

Every measurement (one implementation at one length) runs in a fresh subprocess, so its peak
memory is its own: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
on CPU the subprocess's peak RSS (``VmHWM``, reset before the step). Times are the best of
``--repeats`` steps after one warm-up step; speed-ups and memory ratios compare implementations
measured in the same run. ``--rounds N`` repeats the whole sweep N times, interleaved, and keeps each
measurement's fastest round and its largest peak memory: on a machine whose speed drifts from minute
to minute, every implementation then gets its best minute, not whichever minute it happened to run in.
Results go to ``<out>/reformer-bench_<device>_<mode>.json`` and a PNG plot of time and memory against
sequence length.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
LABELS = {"ours": "reformer-kernels", "transformers": "transformers", "dense": "dense SDPA"}


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    from .harness import DTYPES, IMPLS, PRESETS

    parser = argparse.ArgumentParser(
        prog="reformer-bench",
        description="Sweep sequence length: time, tokens/s and peak memory of this package's Reformer vs "
        "transformers' Reformer (same weights) vs dense attention.",
    )
    parser.add_argument(
        "--preset", default="small", choices=sorted(PRESETS), help="model configuration (default: small)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_parse_override,
        metavar="KEY=VALUE",
        help="override a config field (Python literal), e.g. --set num_buckets=[16,32]; repeatable",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="number of layers (repeats the preset's local/LSH pattern)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    parser.add_argument("--num-hashes", type=int, default=None, help="LSH hash rounds (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--mode", default="eval", choices=("eval", "train"), help="eval forward or train step (fwd+bwd)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to compare")
    parser.add_argument(
        "--dense-max-len", type=int, default=4096, help="skip dense attention above this length (it is O(L^2) in time)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per measurement (default: torch's; 1 gives the steadiest "
        "ratios on a shared machine)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (best is reported)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sweep this many times, interleaved; each measurement reports its fastest "
        "round and its largest peak memory (steadier ratios on a machine whose speed drifts)",
    )
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results"), help="output directory for JSON and PNG"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument(
        "--attention-throughput",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time the attention op alone and report GB/s and FLOP/s (auto: on CUDA only)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per measurement subprocess")
    parser.add_argument(
        "--malloc",
        choices=("default", "retain"),
        default="default",
        help="glibc malloc policy of the measurement subprocesses. 'retain' (MALLOC_MMAP_MAX_=0, "
        "large MALLOC_TRIM_THRESHOLD_) serves tensors > 32 MB from the reused heap instead of fresh "
        "mmaps that page-fault on every step; applies to every implementation alike",
    )
    parser.add_argument(
        "--no-tensor-peak",
        action="store_true",
        help="CPU: skip the extra profiled step that measures the peak of live tensor memory",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh subprocess per measurement (faster; "
        "peak memory is then not isolated between measurements)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="wrap our model (impl 'ours' only) in torch.compile before timing; the compilation (one step) is "
        "timed separately (compile_s) and excluded from the warm-up and the timed steps",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _validate(args: argparse.Namespace) -> None:
    if any(length < 1 for length in args.lengths):
        raise SystemExit(f"reformer-bench: --lengths must be positive; got {args.lengths}")
    if args.repeats < 1:
        raise SystemExit("reformer-bench: --repeats must be >= 1")
    if args.rounds < 1:
        raise SystemExit("reformer-bench: --rounds must be >= 1")
    if args.batch_size < 1:
        raise SystemExit("reformer-bench: --batch-size must be >= 1")
    if args.num_hashes is not None and args.num_hashes < 1:
        raise SystemExit("reformer-bench: --num-hashes must be >= 1")
    if args.layers is not None and args.layers < 1:
        raise SystemExit("reformer-bench: --layers must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("reformer-bench: --threads must be >= 1")


def _worker(spec_json: str) -> int:
    """Subprocess entry: run one case, print its result as the last line of stdout."""
    print(json.dumps(run_spec(json.loads(spec_json))))
    return 0


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement (``harness.run_case`` plus optional attention throughput); errors are returned."""
    from .harness import attention_throughput, run_case

    spec = dict(spec)
    throughput = spec.pop("attention_throughput", False)
    try:
        result = run_case(**spec)
        if throughput and spec["impl"] == "ours":
            result["attention"] = attention_throughput(
                spec["preset"],
                spec["seq_len"],
                batch_size=spec["batch_size"],
                num_hashes=spec.get("num_hashes"),
                overrides=spec.get("overrides"),
                dtype=spec["dtype"],
                device=spec["device"],
                mode=spec["mode"],
            )
    except Exception as error:  # reported to the parent, which prints it in the table
        result = {"impl": spec["impl"], "seq_len": spec["seq_len"], "error": f"{type(error).__name__}: {error}"}
    return result


MALLOC_RETAIN = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _run_subprocess(spec: dict[str, Any], timeout: float, malloc: str = "default") -> dict[str, Any]:
    command = [sys.executable, "-m", "reformer.bench.cli", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if malloc == "retain":
        env.update(MALLOC_RETAIN)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": spec["impl"], "seq_len": spec["seq_len"], "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if completed.returncode < 0 else " | ".join(tail)
        return {"impl": spec["impl"], "seq_len": spec["seq_len"], "error": f"exit {completed.returncode}: {reason}"}
    return json.loads(lines[-1])


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per measurement from several rounds of the same sweep (same order in every round):
    the fastest successful round, with the largest peak memory of all successful rounds, every round's
    time (``round_times_s``) and the first round's logits check and attention throughput. A measurement
    that failed in every round keeps its first error."""
    merged = []
    for attempts in zip(*rounds):
        ok = [r for r in attempts if "error" not in r]
        if not ok:
            merged.append(attempts[0])
            continue
        best = dict(min(ok, key=lambda r: r["time_s"]))
        best["round_times_s"] = [r["time_s"] for r in ok]
        for key in ("peak_mb", "peak_total_mb", "tensor_peak_mb"):
            values = [r[key] for r in ok if key in r]
            if values:
                best[key] = max(values)
        for r in ok:  # measured in the first round only
            best.update((key, r[key]) for key in ("max_abs_diff_vs_transformers", "attention") if key in r)
        merged.append(best)
    return merged


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_table(results: list[dict[str, Any]], memory_label: str) -> str:
    """Markdown table: one row per (length, implementation), ratios vs transformers at the same length."""
    tensors = any("tensor_peak_mb" in r for r in results)
    header = "| L | implementation | time (s) | CPU time (s) | tokens/s | " + memory_label
    header += " | peak tensors (MB) |" if tensors else " |"
    header += " speed-up vs transformers | memory vs transformers |"
    header += " tensor memory vs transformers |" if tensors else ""
    columns = 10 if tensors else 8
    lines = [header, "|---:|---|" + "---:|" * (columns - 2)]
    baseline = {r["seq_len"]: r for r in results if r["impl"] == "transformers" and "error" not in r}

    def ratio(r, base, key):
        return r[key] / base[key] if base and key in r and base.get(key) else None

    for r in results:
        label = LABELS.get(r["impl"], r["impl"])
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {label} | {r['error']} |" + " |" * (columns - 3))
            continue
        base = baseline.get(r["seq_len"])
        speedup = base["time_s"] / r["time_s"] if base else None
        cells = [
            str(r["seq_len"]),
            label,
            f"{r['time_s']:.3f}",
            _fmt(r.get("cpu_time_s"), "{:.3f}"),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_mb']:,.0f}",
        ]
        if tensors:
            cells.append(_fmt(r.get("tensor_peak_mb"), "{:,.0f}"))
        cells += [_fmt(speedup, "{:.2f}x"), _fmt(ratio(r, base, "peak_mb"), "{:.2f}")]
        if tensors:
            cells.append(_fmt(ratio(r, base, "tensor_peak_mb"), "{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_attention_table(results: list[dict[str, Any]]) -> str:
    rows = [r for r in results if "attention" in r]
    if not rows:
        return ""
    lines = [
        "| L | attention op | time (ms) | GB/s | TFLOP/s | % peak BW | % peak FLOP/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for a in r["attention"]:
            lines.append(
                f"| {r['seq_len']} | {a['layer']} {a['pass']} | {a['time_s'] * 1e3:.2f} | {a['gb_per_s']:.1f} | "
                f"{a['tflop_per_s']:.2f} | {_fmt(a.get('bw_fraction'), '{:.0%}')} | "
                f"{_fmt(a.get('flop_fraction'), '{:.0%}')} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str, title: str, memory_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in LABELS:
        rows = sorted((r for r in results if r["impl"] == impl and "error" not in r), key=lambda r: r["seq_len"])
        if not rows:
            continue
        lengths = [r["seq_len"] for r in rows]
        ax_time.plot(lengths, [r["time_s"] for r in rows], marker="o", label=LABELS[impl])
        (line,) = ax_mem.plot(lengths, [r["peak_mb"] for r in rows], marker="o", label=LABELS[impl])
        if all("tensor_peak_mb" in r for r in rows):
            ax_mem.plot(
                lengths,
                [max(r["tensor_peak_mb"], 1e-3) for r in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{LABELS[impl]} (live tensors)",
            )
    tensors = any("tensor_peak_mb" in r for r in results)
    mem_label = "peak memory above start (MB)" if tensors else memory_label
    for axis, ylabel in ((ax_time, "time per step (s)"), (ax_mem, mem_label)):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    _validate(args)
    if args.malloc != "default" and args.in_process:
        raise SystemExit("reformer-bench: --malloc needs subprocess measurements (drop --in-process)")

    import torch

    from .harness import transformers_available

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("reformer-bench: --device cuda requested but CUDA is not available")
    impls = list(dict.fromkeys(args.impls))
    if not transformers_available():
        print(
            "reformer-bench: transformers is not installed: skipping the transformers and dense columns "
            "(pip install transformers to compare)"
        )
        impls = [impl for impl in impls if impl == "ours"]
        if not impls:
            raise SystemExit("reformer-bench: nothing to run")
    throughput = args.attention_throughput == "on" or (
        args.attention_throughput == "auto" and device.startswith("cuda")
    )
    overrides = dict(args.overrides)
    memory_label = "peak alloc (MB)" if device.startswith("cuda") else "peak RSS above start (MB)"
    threads = args.threads or torch.get_num_threads()
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else f"{_cpu_name()}, {threads} threads"
    print(
        f"reformer-bench: {args.mode} on {device} ({hardware}), preset {args.preset}, dtype {args.dtype}, "
        f"batch {args.batch_size}, lengths {args.lengths}"
    )

    load_before = _load_average()
    if load_before is not None and load_before > (os.cpu_count() or 1):
        print(
            f"reformer-bench: warning: load average {load_before:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU and timings will be noisy (CPU-time column and ratios are steadier)"
        )
    cases = [
        (length, impl)
        for length in args.lengths
        for impl in impls
        if not (impl == "dense" and length > args.dense_max_len)
    ]
    rounds: list[list[dict[str, Any]]] = []
    started = time.perf_counter()
    total = args.rounds * len(cases)
    for round_index in range(args.rounds):
        rounds.append([])
        for index, (length, impl) in enumerate(cases, 1):
            # the logits check and the tensor peak (an extra profiled step) need one round only
            spec = dict(
                impl=impl,
                preset=args.preset,
                seq_len=length,
                mode=args.mode,
                batch_size=args.batch_size,
                num_hashes=args.num_hashes,
                num_layers=args.layers,
                overrides=overrides,
                dtype=args.dtype,
                device=device,
                repeats=args.repeats,
                attention_throughput=throughput and round_index == 0,
                threads=args.threads,
                parity=round_index == 0 and impl == "ours" and "transformers" in impls and length == min(args.lengths),
                tensor_peak=round_index == 0 and not args.no_tensor_peak and not device.startswith("cuda"),
            )
            if args.compile and impl == "ours":
                spec["compile"] = True
            print(
                f"[{round_index * len(cases) + index}/{total}] {LABELS[impl]:<16} L={length:<6} ...",
                end=" ",
                flush=True,
            )
            result = run_spec(spec) if args.in_process else _run_subprocess(spec, args.timeout, args.malloc)
            rounds[-1].append(result)
            if "error" in result:
                print(f"failed: {result['error']}", flush=True)
            else:
                parity = result.get("max_abs_diff_vs_transformers")
                parity = "" if parity is None else f", max |logits - transformers'| = {parity:.1e}"
                if "compile_s" in result:
                    parity += f", compiled in {result['compile_s']:.1f} s (not timed)"
                print(
                    f"{result['time_s']:.3f} s, {result['peak_mb']:,.0f} MB  ({result['description']}{parity})",
                    flush=True,
                )
    elapsed = time.perf_counter() - started
    results = merge_rounds(rounds)

    table = format_table(results, memory_label)
    print()
    print(table)
    attention_table = format_attention_table(results)
    if attention_table:
        print()
        print(attention_table)
    rounds_note = f" ({args.rounds} rounds: each row its fastest round)" if args.rounds > 1 else ""
    print(f"\n{total} measurements in {elapsed:.0f} s{rounds_note}")

    os.makedirs(args.out, exist_ok=True)
    compiled = "_compiled" if args.compile else ""
    stem = os.path.join(args.out, f"reformer-bench_{device.split(':')[0]}_{args.mode}{compiled}")
    meta = dict(
        command="reformer-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device,
        hardware=hardware,
        torch=torch.__version__,
        python=platform.python_version(),
        preset=args.preset,
        overrides=overrides,
        layers=args.layers,
        num_hashes=args.num_hashes,
        dtype=args.dtype,
        mode=args.mode,
        batch_size=args.batch_size,
        repeats=args.repeats,
        rounds=args.rounds,
        threads=args.threads,
        memory=memory_label,
        elapsed_s=elapsed,
        load_average=[load_before, _load_average()],
        malloc=args.malloc,
        compile=args.compile,
    )
    with open(stem + ".json", "w") as handle:
        json.dump(
            dict(meta=meta, results=results, table=table, **({"rounds": rounds} if args.rounds > 1 else {})),
            handle,
            indent=2,
        )
    print(f"wrote {stem}.json")
    if not args.no_plot:
        title = f"Reformer {args.preset} ({args.mode}, {args.dtype}, batch {args.batch_size}) on {hardware}"
        plot(results, stem + ".png", title, memory_label)
        print(f"wrote {stem}.png")
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
